"""Body files reused and bodies not read back (app/datasources/sqlite/body_files.py, "Reuse"), on a real database
and a real directory: a freed file is written over by the next large body, but never while a claim or a peek that
may have seen its name has yet to read it, and never unless deletions are durable at once; the bodies just written
are handed to a claim from memory, within a bound."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from app.datasources.interface import DatasourceOptions, NewMessage, StoredMessage
from app.datasources.registry import open_datasource
from app.datasources.sqlite import SqliteDatasource
from app.datasources.sqlite.body_files import READ_BACK_SAVED_BYTES, SPARE_FILES_MAX, BodyFiles
from tests.app.datasources.test_sqlite_body_files import NOW, Q, files, large, open_db, reopen, stored_names

LEASE = 30_000


async def put_claim_ack(ds: SqliteDatasource, db: Path, message_id: str, body: bytes) -> tuple[StoredMessage, str]:
    """Store one message, claim it and ACK it; return it and the name of the file its body went to."""
    await ds.queues.put([NewMessage(message_id, Q, {}, body, 4, None, NOW)])
    [name] = stored_names(db)
    [got] = await ds.queues.claim(Q, owner="o", limit=1, lease_ms=LEASE, now_ms=NOW)
    await ds.queues.ack([got.message_id], [got.lease])
    await wait_for(lambda: name not in files(db) or name in ds.store.body_files.spares())  # freed after the commit
    return got, name


async def test_a_freed_file_is_written_over_by_the_next_large_body(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    try:
        seen: set[str] = set()
        for i in range(5):
            body = large(i) + b"p" * (500 - i * 100)  # shorter each time: the spare is cut to the new length
            got, name = await put_claim_ack(ds, db, f"m{i}", body)
            assert got.body == body
            seen.add(name)
        assert len(seen) == 1 and files(db) == seen  # one file, written five times
        ds = await reopen(ds, db)  # read from the file, not from memory: the cut took
        await ds.queues.put([NewMessage("last", Q, {}, b"x" * (len(large(0)) // 2), 4, None, NOW)])
        ds = await reopen(ds, db)
        [got] = await ds.queues.claim(Q, owner="o", limit=1, lease_ms=LEASE, now_ms=NOW)
        assert got.body == b"x" * (len(large(0)) // 2)
    finally:
        await ds.close()


async def test_without_durable_commits_no_file_is_reused(tmp_path: Path) -> None:
    """With synchronous NORMAL a power loss may undo the deletion that freed a file: the row would come back naming a
    file that holds another message's body. So each body gets a new file, as before."""
    db = tmp_path / "d.db"
    ds = await open_datasource(f"sqlite:///{db}", DatasourceOptions(sqlite_synchronous="NORMAL"))
    assert isinstance(ds, SqliteDatasource)
    try:
        seen: set[str] = set()
        for i in range(3):
            _, name = await put_claim_ack(ds, db, f"m{i}", large(i))
            seen.add(name)
        assert len(seen) == 3 and files(db) == set()  # a new file each time, the old one unlinked
    finally:
        await ds.close()


async def test_spares_are_bounded_and_go_at_close(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    n = SPARE_FILES_MAX + 8
    try:
        await ds.queues.put([NewMessage(f"m{i}", Q, {}, large(i), 4, None, NOW) for i in range(n)])
        got = await ds.queues.claim(Q, owner="o", limit=n, lease_ms=LEASE, now_ms=NOW)
        await ds.queues.ack([g.message_id for g in got], [g.lease for g in got])
        assert stored_names(db) == set()
        await wait_for(lambda: len(files(db)) == SPARE_FILES_MAX)  # (the unlinks run on a body thread after the commit)
        assert files(db) == ds.store.body_files.spares()
    finally:
        await ds.close()
    assert files(db) == set()


@pytest.mark.parametrize("reader", ["claim", "peek"])
async def test_a_file_freed_while_a_reader_may_hold_its_name_is_not_written_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    """A claim (or a peek) names a file in its statement and reads it after, beside the writer. Here its message is
    purged in between and a new large message is stored: the file must not take the new body while the reader has
    yet to read it. The reader then sees the old body or nothing (its message is gone), never the new one."""
    db = tmp_path / "d.db"
    ds = await open_db(db)
    old, new = large(1), large(2)
    try:
        await ds.queues.put([NewMessage("old", Q, {}, old, 4, None, NOW)])
        ds = await reopen(ds, db)  # the body is read from its file
        [name] = files(db)
        named, go_on = threading.Event(), threading.Event()
        real = BodyFiles._read

        def read_later(self: BodyFiles, file: str) -> bytes:
            named.set()  # the statement named the file; the read waits for the purge and the new put
            go_on.wait(10)
            return real(self, file)

        monkeypatch.setattr(BodyFiles, "_read", read_later)
        if reader == "claim":
            reading: asyncio.Future[list[StoredMessage]] = asyncio.ensure_future(
                ds.queues.claim(Q, owner="o", limit=1, lease_ms=LEASE, now_ms=NOW)
            )
        else:
            reading = asyncio.ensure_future(ds.queues.peek(Q, limit=1, now_ms=NOW))
        await wait_for(named.is_set)
        assert await ds.queues.purge(Q) == 1
        await ds.store.write(lambda conn: None)
        await wait_for(lambda: name in ds.store.body_files.spares())  # freed: the purge's unlink step ran
        await ds.queues.put([NewMessage("new", Q, {}, new, 4, None, NOW)])
        go_on.set()
        got = await reading
        assert [g.body for g in got] in ([old], [])
        assert [g.message_id for g in got] in (["old"], [])
        monkeypatch.setattr(BodyFiles, "_read", real)
        ds = await reopen(ds, db)
        [fresh] = await ds.queues.claim(Q, owner="o", limit=1, lease_ms=LEASE, now_ms=NOW)
        assert (fresh.message_id, fresh.body) == ("new", new)
        # Once the reader was done, the freed file became a spare again: the next body may go over it.
        assert name not in stored_names(db) or fresh.message_id == "new"
    finally:
        go_on.set()
        await ds.close()


async def test_a_claim_soon_after_the_put_takes_the_body_from_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    reads: list[str] = []
    real = BodyFiles._read

    def counted(self: BodyFiles, name: str) -> bytes:
        reads.append(name)
        return real(self, name)

    monkeypatch.setattr(BodyFiles, "_read", counted)
    try:
        bodies = [large(i) for i in range(3)]
        await ds.queues.put([NewMessage(f"m{i}", Q, {}, body, 4, None, NOW) for i, body in enumerate(bodies)])
        got = await ds.queues.claim(Q, owner="o", limit=3, lease_ms=LEASE, now_ms=NOW)
        assert [g.body for g in got] == bodies and reads == []
        # a redelivery reads the file: the saved body went to the first claim
        again = await ds.queues.claim(Q, owner="o", limit=3, lease_ms=LEASE, now_ms=NOW + LEASE + 1)
        assert [g.body for g in again] == bodies and len(reads) == 3
    finally:
        await ds.close()


async def test_the_bodies_kept_in_memory_are_bounded(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    ds = await open_db(db)
    body_size = 1024 * 1024
    n = READ_BACK_SAVED_BYTES // body_size + 8
    try:
        for i in range(n):  # nobody claims them: only the newest are kept
            await ds.queues.put([NewMessage(f"m{i}", Q, {}, os.urandom(body_size), 4, None, NOW)])
        kept = ds.store.body_files._recent
        assert sum(map(len, kept.values())) <= READ_BACK_SAVED_BYTES and len(kept) == n - 8
        got = await ds.queues.claim(Q, owner="o", limit=n, lease_ms=LEASE, now_ms=NOW)
        assert len(got) == n and not kept  # the oldest read from their files, the rest from memory
    finally:
        await ds.close()


async def wait_for(condition: Callable[[], bool]) -> None:
    """Wait for a state another thread reaches, checking between event-loop turns (bounded: a hang is a failure)."""
    for _ in range(5_000):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("the condition was never met")
