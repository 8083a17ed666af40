"""Large bodies as files beside the SQLite database (app/datasources/sqlite/body_files.py), on a real database and
a real directory: stored before the commit that names them, read back by claims and peeks, removed once their
message is gone by any path, and never left behind by a put that did not commit."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from app.datasources.interface import (
    Changes,
    DatasourceError,
    DatasourceOptions,
    DatasourceUnavailable,
    NewMessage,
    Release,
)
from app.datasources.registry import open_datasource
from app.datasources.sqlite import SqliteDatasource
from app.datasources.sqlite.body_files import FILE_BODY_MIN

NOW = 1_700_000_000_000
Q = "/queue/large"


async def open_db(path: Path) -> SqliteDatasource:
    ds = await open_datasource(f"sqlite:///{path}", DatasourceOptions())
    assert isinstance(ds, SqliteDatasource)
    return ds


async def reopen(ds: SqliteDatasource, db: Path) -> SqliteDatasource:
    """As after a restart: the bodies just written are no longer in memory, so claims and peeks read their files."""
    await ds.close()
    return await open_db(db)


def bodies_dir(db: Path) -> Path:
    return Path(f"{db}-bodies")


def files(db: Path) -> set[str]:
    return set(os.listdir(bodies_dir(db)))


def large(n: int) -> bytes:
    return os.urandom(FILE_BODY_MIN) + str(n).encode()


def stored_names(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT body FROM stompgate_messages_bodies WHERE typeof(body) = 'text'").fetchall()
    finally:
        conn.close()
    return {row[0] for row in rows}


async def test_a_large_body_is_a_file_named_by_its_row_and_goes_with_its_ack(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    small, big = b"s" * (FILE_BODY_MIN - 1), large(1)
    try:
        await ds.queues.put([NewMessage("small", Q, {}, small, 4, None, NOW), NewMessage("big", Q, {}, big, 4, None, NOW)])
        [name] = files(db)
        assert (bodies_dir(db) / name).read_bytes() == big
        assert stored_names(db) == {name}  # the committed row names the file
        assert (bodies_dir(db) / name).stat().st_mode & 0o777 == 0o600
        got = await ds.queues.claim(Q, owner="o", limit=5, lease_ms=30_000, now_ms=NOW)
        assert [(g.message_id, g.body) for g in got] == [("small", small), ("big", big)]
        peeked = await ds.queues.peek(Q, limit=5, now_ms=NOW + 60_000)  # leases lapsed: both claimable again
        assert [p.body for p in peeked] == [small, big]
        await ds.queues.ack([g.message_id for g in got], [g.lease for g in got])
    finally:
        await ds.close()  # waits for the body threads, so the unlink after the ACK's commit is done
    assert files(db) == set()


async def test_files_go_with_purge_and_expiry_and_stay_with_requeue_and_dead_letter(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    try:
        await ds.queues.put([NewMessage(f"p{i}", Q, {}, large(i), 4, None, NOW) for i in range(3)])
        await ds.queues.put([NewMessage("e", "/queue/expiring", {}, large(9), 4, NOW + 10, NOW)])
        [first] = await ds.queues.claim(Q, owner="o", limit=1, lease_ms=30_000, now_ms=NOW)
        await ds.queues.release([first.message_id], Release.DEAD_LETTER, [first.lease])
        [second] = await ds.queues.claim(Q, owner="o", limit=1, lease_ms=30_000, now_ms=NOW)
        await ds.queues.release([second.message_id], Release.REQUEUE, [second.lease])
        assert len(files(db)) == 4
        [dead] = await ds.queues.claim(Q + ".DLQ", owner="o", limit=1, lease_ms=30_000, now_ms=NOW)
        assert dead.body == first.body  # moved with its message
        assert await ds.queues.purge(Q) == 2
        assert await ds.queues.claim("/queue/expiring", owner="o", limit=1, lease_ms=30_000, now_ms=NOW + 20) == []
        await ds.queues.ack([dead.message_id], [dead.lease])
    finally:
        await ds.close()
    assert files(db) == set()


async def test_a_put_that_does_not_commit_leaves_no_file(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    try:
        await ds.queues.put([NewMessage("dup", Q, {}, large(1), 4, None, NOW)])
        kept = files(db)
        spares = ds.store.body_files.spares
        with pytest.raises(DatasourceError):  # the same message_id again: the insert fails, the batch rolls back
            await ds.queues.put([NewMessage("other", Q, {}, large(2), 4, None, NOW), NewMessage("dup", Q, {}, large(3), 4, None, NOW)])
        assert files(db) - spares() == kept and len(spares()) == 2  # kept for reuse, named by nothing
        with pytest.raises(DatasourceError):  # a COMMIT's puts: all or nothing, files too
            await ds.apply(Changes(queue=[NewMessage("t1", Q, {}, large(4), 4, None, NOW), NewMessage("dup", Q, {}, large(5), 4, None, NOW)]))
        assert files(db) - spares() == kept and len(spares()) == 2  # written over the spares, and spares again
        await ds.apply(Changes(queue=[NewMessage("t2", Q, {}, large(6), 4, None, NOW)]))
        assert files(db) - spares() == stored_names(db) and len(stored_names(db)) == 2
    finally:
        await ds.close()
    assert files(db) == stored_names(db)  # the spares go at close


async def test_files_no_row_names_are_removed_at_open_and_others_are_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    try:
        await ds.queues.put([NewMessage("kept", Q, {}, large(1), 4, None, NOW)])
    finally:
        await ds.close()
    orphan = bodies_dir(db) / ("ab" * 16)  # as a crash between a body's file and its row's commit leaves it
    orphan.write_bytes(b"never stored")
    foreign = bodies_dir(db) / "README.txt"  # not a name the store gives: not the store's to remove
    foreign.write_text("an operator's note")
    kept = stored_names(db)
    ds = await open_db(db)
    try:
        assert files(db) == kept | {"README.txt"}
        [got] = await ds.queues.claim(Q, owner="o", limit=1, lease_ms=30_000, now_ms=NOW)
        assert got.message_id == "kept" and got.body.endswith(b"1")
    finally:
        await ds.close()


async def test_a_message_whose_file_went_meanwhile_is_left_out_and_a_foreign_name_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    try:
        await ds.queues.put([NewMessage(f"m{i}", Q, {}, large(i), 4, None, NOW) for i in range(2)])
        ds = await reopen(ds, db)
        m = ds.store.messages
        seq_of = {row[0]: row[1] for row in await ds.store.read(lambda c: c.execute(f"SELECT message_id, seq FROM {m}").fetchall())}
        name = await ds.store.read(
            lambda c: c.execute(f"SELECT body FROM {m}_bodies WHERE seq = ?", (seq_of["m0"],)).fetchone()[0]
        )
        os.unlink(bodies_dir(db) / name)  # as if its message was deleted while the body was being read
        assert [p.message_id for p in await ds.queues.peek(Q, limit=5, now_ms=NOW)] == ["m1"]
        assert [c.message_id for c in await ds.queues.claim(Q, owner="o", limit=5, lease_ms=30_000, now_ms=NOW)] == ["m1"]
        # a name the store never gives (a changed database) is refused, never opened as a path
        await ds.store.write(
            lambda c: c.execute(f"UPDATE {m}_bodies SET body = '../../etc/passwd' WHERE seq = ?", (seq_of["m0"],))
        )
        with pytest.raises(DatasourceError, match="not a body file's name"):
            await ds.queues.claim(Q, owner="o", limit=5, lease_ms=30_000, now_ms=NOW + 60_000)
    finally:
        await ds.close()


async def test_a_body_that_cannot_be_written_is_one_clear_error_and_nothing_is_stored(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    try:
        directory = bodies_dir(db)
        directory.rmdir()
        directory.write_text("not a directory")  # every create in it now fails (root ignores permissions)
        with pytest.raises(DatasourceUnavailable, match="cannot store a message body in"):
            await ds.queues.put([NewMessage("big", Q, {}, large(1), 4, None, NOW)])
        assert (await ds.queues.stats(Q, now_ms=NOW)).ready == 0
        await ds.queues.put([NewMessage("small", Q, {}, b"still fine", 4, None, NOW)])
        assert (await ds.queues.stats(Q, now_ms=NOW)).ready == 1
    finally:
        await ds.close()
