"""SQLite-only behaviour: durability, restart, kill -9, group commit, URL and directory errors."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.datasources.interface import Datasource, DatasourceError, DatasourceOptions, NewMessage, Release, ScanMark
from app.datasources.registry import open_datasource
from app.datasources.sqlite import SqliteDatasource, database_path
from app.datasources.sqlite.body_files import FILE_BODY_MIN

ROOT = Path(__file__).resolve().parents[3]
NOW = 1_700_000_000_000
Q = "/queue/durable"


def msg(n: int, destination: str = Q) -> NewMessage:
    return NewMessage(message_id=f"m{n}", destination=destination, headers={"n": str(n)}, body=b"x" * 256)


async def open_db(path: Path, **options: object) -> SqliteDatasource:
    ds = await open_datasource(f"sqlite:///{path}", DatasourceOptions(**options))  # type: ignore[arg-type]
    assert isinstance(ds, SqliteDatasource)
    return ds


async def test_messages_survive_close_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    await ds.queues.put([msg(n) for n in range(10)])
    await ds.topics.publish([msg(100, "/topic/t"), msg(101, "/topic/t")])
    await ds.topics.save_cursor("c/s", 2)
    await ds.close()
    ds = await open_db(db)
    try:
        got = await ds.queues.claim(Q, owner="o", limit=100, lease_ms=1000, now_ms=NOW)
        assert [m.message_id for m in got] == [f"m{n}" for n in range(10)]
        assert await ds.topics.last_position() == 2
        assert await ds.topics.publish([msg(102, "/topic/t")]) == [3]
        assert await ds.topics.load_cursor("c/s") == 2
    finally:
        await ds.close()


async def test_leases_of_a_previous_process_are_released_on_open(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    await ds.queues.put([msg(1), msg(2)])
    await ds.queues.claim(Q, owner="gone", limit=1, lease_ms=3_600_000, now_ms=NOW)
    await ds.close()
    ds = await open_db(db)
    try:
        got = await ds.queues.claim(Q, owner="new", limit=10, lease_ms=1000, now_ms=NOW)
        assert [(m.message_id, m.deliveries) for m in got] == [("m1", 2), ("m2", 1)]
    finally:
        await ds.close()


async def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    ds = await open_db(tmp_path / "d.db")
    try:
        before = ds.commits
        await asyncio.gather(*(ds.queues.put([msg(n)]) for n in range(300)))
        assert ds.commits - before < 30  # one commit per pending batch, not one per put
        assert (await ds.queues.stats(Q, now_ms=NOW)).ready == 300
    finally:
        await ds.close()


async def test_a_failing_call_does_not_spoil_its_batch(tmp_path: Path) -> None:
    ds = await open_db(tmp_path / "d.db")
    try:
        await ds.queues.put([msg(1)])
        results = await asyncio.gather(
            ds.queues.put([msg(2)]), ds.queues.put([msg(3), msg(1)]), ds.queues.put([msg(4)]), return_exceptions=True
        )
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], DatasourceError)
        peeked = await ds.queues.peek(Q, limit=10, now_ms=NOW)
        assert [m.message_id for m in peeked] == ["m1", "m2", "m4"]  # the failed put stored nothing
    finally:
        await ds.close()


async def test_dead_letter_and_requeue_survive_reopen(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    await ds.queues.put([msg(1), msg(2)])
    await ds.queues.claim(Q, owner="o", limit=2, lease_ms=1000, now_ms=NOW)
    await ds.queues.release(["m1"], Release.DEAD_LETTER)
    await ds.queues.release(["m2"], Release.REQUEUE)
    await ds.close()
    ds = await open_db(db)
    try:
        [dead] = await ds.queues.peek(Q + ".DLQ", limit=10, now_ms=NOW)
        assert (dead.message_id, dead.original_destination, dead.deliveries) == ("m1", Q, 0)
        [again] = await ds.queues.peek(Q, limit=10, now_ms=NOW)
        assert (again.message_id, again.deliveries) == ("m2", 1)
    finally:
        await ds.close()


async def test_an_ack_does_not_write_the_body_again_as_zeros(tmp_path: Path) -> None:
    """Debian's SQLite is built with secure_delete on: deleting a row overwrote its body with zeros, through the WAL
    and again at the checkpoint, so every ACK of a 1 MiB message wrote 1 MiB more. The store turns that off (FAST);
    RabbitMQ and Artemis do not scrub consumed messages from their journals either."""
    db = tmp_path / "d.db"
    wal = Path(f"{db}-wal")
    ds = await open_db(db)
    try:
        body = os.urandom(96 * 1024)  # 24 pages, under the WAL's checkpoint (1,000); under FILE_BODY_MIN: in SQLite
        assert len(body) < FILE_BODY_MIN
        await ds.queues.put([NewMessage("big", Q, {}, body, 4, None, NOW)])
        [got] = await ds.queues.claim(Q, owner="o", limit=1, lease_ms=30_000, now_ms=NOW)
        await ds.store.write(lambda conn: None)  # the claim is answered before its commit: wait for that commit
        before = wal.stat().st_size
        await ds.queues.ack([got.message_id], [got.lease])
        assert wal.stat().st_size - before < len(body) // 2  # zeroed, the body alone would be 24 pages more
    finally:
        await ds.close()


async def test_a_claim_does_not_write_a_long_body_again(tmp_path: Path) -> None:
    """A claim changes the row's size (it sets the owner), and SQLite then rewrites the row whole, overflow pages and
    all: a claim of a 1 MiB message wrote 1 MiB. Long bodies live in a table of their own, which claims do not touch."""
    db = tmp_path / "d.db"
    wal = Path(f"{db}-wal")
    ds = await open_db(db)
    try:
        body = os.urandom(96 * 1024)  # under FILE_BODY_MIN: in SQLite's bodies table
        assert len(body) < FILE_BODY_MIN
        await ds.queues.put([NewMessage("big", Q, {}, body, 4, None, NOW)])
        before = wal.stat().st_size
        [got] = await ds.queues.claim(Q, owner="o", limit=1, lease_ms=30_000, now_ms=NOW)
        await ds.store.write(lambda conn: None)  # the claim is answered before its commit: wait for that commit
        assert got.body == body
        assert wal.stat().st_size - before < len(body) // 4
        await ds.queues.release([got.message_id], Release.REQUEUE, [got.lease])
        [again] = await ds.queues.claim(Q, owner="o", limit=1, lease_ms=30_000, now_ms=NOW)
        assert again.body == body and again.deliveries == 2
        [peeked] = await ds.queues.peek(Q, limit=5, now_ms=NOW + 60_000)  # its lease lapsed: claimable, shown
        assert peeked.body == body
        await ds.queues.ack([again.message_id], [again.lease])
        bodies = await ds.store.read(lambda conn: conn.execute(f"SELECT count(*) FROM {ds.store.bodies}").fetchone()[0])
        assert bodies == 0  # the ACK took the body with it
    finally:
        await ds.close()


async def test_long_bodies_stored_in_the_row_by_an_earlier_build_are_still_delivered(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    body = os.urandom(64 * 1024)
    m = ds.store.messages
    try:  # a row as the earlier build wrote it: the body in the message row
        await ds.store.write(
            lambda conn: conn.execute(
                f"INSERT INTO {m} (message_id, destination, priority, published_at, headers, body) VALUES (?, ?, 4, ?, '{{}}', ?)",
                ("old", Q, NOW, body),
            )
        )
        await ds.queues.put([NewMessage("empty", Q, {}, b"", 4, None, NOW), NewMessage("new", Q, {}, body, 4, None, NOW)])
        got = await ds.queues.claim(Q, owner="o", limit=5, lease_ms=30_000, now_ms=NOW)
        assert [(g.message_id, g.body) for g in got] == [("old", body), ("empty", b""), ("new", body)]
        await ds.queues.ack([g.message_id for g in got], [g.lease for g in got])
        await ds.queues.put([NewMessage("purged", Q, {}, body, 4, None, NOW)])
        assert await ds.queues.purge(Q) == 1
        bodies = await ds.store.read(lambda conn: conn.execute(f"SELECT count(*) FROM {ds.store.bodies}").fetchone()[0])
        assert bodies == 0
    finally:
        await ds.close()


async def test_synchronous_option_is_applied(tmp_path: Path) -> None:
    ds = await open_db(tmp_path / "d.db", sqlite_synchronous="NORMAL")
    try:
        level = await ds.store.write(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
        assert level == 1  # NORMAL, on the writer connection
        mode = await ds.store.read(lambda conn: conn.execute("PRAGMA journal_mode").fetchone()[0])
        assert mode == "wal"
    finally:
        await ds.close()


async def test_bad_options_and_urls_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasourceError, match="sqlite_synchronous"):
        await open_db(tmp_path / "d.db", sqlite_synchronous="SOMETIMES")
    with pytest.raises(DatasourceError, match="namespace"):
        await open_db(tmp_path / "d.db", namespace="bad-name;")
    for url in ("sqlite://host/x.db", "sqlite:///", "sqlite:///:memory:", "sqlite:///x.db?mode=ro"):
        with pytest.raises(DatasourceError):
            database_path(url)
    assert database_path("sqlite:///./data/stompgate.db") == "./data/stompgate.db"
    assert database_path("sqlite:///rel/x.db") == "rel/x.db"
    assert database_path("sqlite:////abs/x.db") == "/abs/x.db"


async def test_parent_directory_is_created(tmp_path: Path) -> None:
    ds = await open_db(tmp_path / "a" / "b" / "d.db")
    await ds.close()
    assert (tmp_path / "a" / "b" / "d.db").exists()


async def test_unwritable_directory_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DatasourceError, match="cannot create the directory") as info:
        await open_db(blocker / "sub" / "d.db")
    assert "\n" not in str(info.value)
    if os.geteuid() != 0:  # root ignores directory permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(DatasourceError, match="writable"):
            await open_db(locked / "d.db")


async def test_closed_datasource_refuses_work(tmp_path: Path) -> None:
    ds: Datasource = await open_db(tmp_path / "d.db")
    await ds.close()
    await ds.close()  # idempotent
    with pytest.raises(DatasourceError):
        await ds.queues.put([msg(1)])


CHILD = textwrap.dedent(
    """
    import asyncio, random, sys
    from app.datasources.interface import DatasourceOptions, NewMessage
    from app.datasources.registry import open_datasource

    async def main() -> None:
        ds = await open_datasource(sys.argv[1], DatasourceOptions(sqlite_synchronous=sys.argv[2]))
        async def producer(p: int) -> None:
            n = 0
            while True:
                size = int(sys.argv[3]) if (n // 3) % 2 else 256  # large ones (files, with sys.argv[3]) and small
                batch = [NewMessage(f"p{p}-{n + i}", "/queue/k", {}, str(n + i).encode().ljust(size, b"y")) for i in range(1 + n % 3)]
                n += len(batch)
                await ds.queues.put(batch)
                sys.stdout.write("".join(m.message_id + "\\n" for m in batch))
                sys.stdout.flush()
                # producers out of step, so that the kill lands anywhere in the others' puts, not always just
                # after a group commit answered all of them at once
                await asyncio.sleep(random.random() / 500)
        await asyncio.gather(*(producer(p) for p in range(8)))

    asyncio.run(main())
    """
)


@pytest.mark.parametrize(("synchronous", "large"), [("FULL", 256), ("NORMAL", 256), ("FULL", FILE_BODY_MIN + 100)])
async def test_nothing_acknowledged_is_lost_after_kill_9(tmp_path: Path, synchronous: str, large: int) -> None:
    """With ``large`` over FILE_BODY_MIN, every other batch's bodies are files: each acknowledged message's body is
    read back whole, and no file is left that no message names."""
    db = tmp_path / "k.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, f"sqlite:///{db}", synchronous, str(large)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged: list[str] = []
    assert child.stdout is not None
    try:
        while len(acknowledged) < 2_000:
            line = child.stdout.readline()
            assert line, "the child stopped early"
            acknowledged.append(line.strip())
        child.send_signal(signal.SIGKILL)
        for line in child.stdout:  # whatever was printed before the kill counts too
            if line.endswith("\n"):
                acknowledged.append(line.strip())
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    stored = {row[0] for row in _rows(db, "SELECT message_id FROM stompgate_messages")}
    missing = [m for m in acknowledged if m not in stored]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
    ds = await open_db(db)  # and the database opens cleanly afterwards
    try:
        assert (await ds.queues.stats("/queue/k", now_ms=NOW)).ready == len(stored)
        claimed = await ds.queues.claim("/queue/k", owner="o", limit=len(stored), lease_ms=30_000, now_ms=NOW)
        assert len(claimed) == len(stored)
        for message in claimed:
            n = int(message.message_id.split("-")[1])
            assert message.body == str(n).encode().ljust(len(message.body), b"y")
            assert len(message.body) in (256, large)
        named = _rows(db, "SELECT body FROM stompgate_messages_bodies WHERE typeof(body) = 'text'")
        assert {row[0] for row in named} == set(os.listdir(f"{db}-bodies"))  # orphans removed at open
        assert (large > 256) == bool(named)
    finally:
        await ds.close()


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize("url", ["memory://", "sqlite"])
async def test_follow_from_none_starts_where_follow_was_called(tmp_path: Path, url: str) -> None:
    ds = await open_datasource(f"sqlite:///{tmp_path}/f.db" if url == "sqlite" else url, DatasourceOptions())
    try:
        await ds.topics.publish([msg(1, "/topic/t")])
        follower = ds.topics.follow(after=None)
        [position] = await ds.topics.publish([msg(2, "/topic/t")])  # before the first __anext__
        event = await asyncio.wait_for(anext(follower), 5)
        assert getattr(event, "position", None) == position
        await follower.aclose()  # type: ignore[attr-defined]
    finally:
        await ds.close()


async def test_a_rolled_back_claim_wakes_waiters_and_restarts_scans(tmp_path: Path) -> None:
    """A claim is answered before its batch commits; when the batch then rolls back, the claimed messages are ready
    again. A consumer waiting for work (whose idle wait can be a whole lease period) is woken, and a selector scan
    that had gone past them looks again."""
    ds = await open_db(tmp_path / "d.db")
    try:
        await ds.queues.put([msg(1)])
        token = ds.queues.wake_token(Q)
        results = await asyncio.gather(
            ds.queues.claim(Q, owner="a", limit=1, lease_ms=60_000, now_ms=NOW),  # answered early...
            ds.queues.put([msg(2), msg(1)]),  # ...then this duplicate id fails the batch: all of it rolls back
            return_exceptions=True,
        )
        assert [m.message_id for m in results[0]] == ["m1"]  # type: ignore[union-attr]
        assert isinstance(results[1], DatasourceError)
        await asyncio.wait_for(ds.queues.wait(Q, 60.0, token), 5.0)  # woken, not left to the 60 s idle wait
        mark = ScanMark()
        claimed = await ds.queues.claim(Q, owner="b", limit=1, lease_ms=1, now_ms=NOW, selector=lambda h: False, scan=mark)
        assert claimed == [] and mark.after is not None and not mark.more
    finally:
        await ds.close()


async def test_a_database_made_before_fenced_leases_opens_and_gains_the_lease_column(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE stompgate_messages (
            seq INTEGER PRIMARY KEY, message_id TEXT NOT NULL UNIQUE, destination TEXT NOT NULL,
            state INTEGER NOT NULL DEFAULT 0, priority INTEGER NOT NULL, expires_at INTEGER,
            published_at INTEGER NOT NULL, deliveries INTEGER NOT NULL DEFAULT 0, owner TEXT, lease_until INTEGER,
            original_destination TEXT, headers TEXT NOT NULL, body BLOB NOT NULL
        );
        INSERT INTO stompgate_messages (message_id, destination, priority, published_at, headers, body)
        VALUES ('m-old', '/queue/durable', 4, 0, '{}', x'00');
        """
    )
    conn.commit()
    conn.close()
    ds = await open_db(path)
    try:
        [got] = await ds.queues.claim(Q, owner="a", limit=1, lease_ms=1000, now_ms=NOW)
        assert got.message_id == "m-old" and got.lease == 1
        await ds.queues.ack([got.message_id], [got.lease])
        assert await ds.queues.peek(Q, limit=1, now_ms=NOW) == []
    finally:
        await ds.close()
