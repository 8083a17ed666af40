"""Review of body file reuse (app/datasources/sqlite/body_files.py): interleavings under which a peek or a claim
returned a message with another message's body. Real database, real directory; monkeypatch only widens windows or
injects a failure."""

from __future__ import annotations

import asyncio
import errno
import threading
from pathlib import Path

import pytest

from app.datasources.interface import DatasourceError, NewMessage
from app.datasources.sqlite.body_files import BodyFiles, ReadGuard
from app.datasources.sqlite.rows import SCAN_BATCH
from app.datasources.wakeups import Signals
from tests.app.datasources.test_sqlite_body_files import NOW, Q, large, open_db, reopen, stored_names
from tests.app.datasources.test_sqlite_body_reuse import LEASE, wait_for


async def test_a_peek_that_began_before_the_first_file_body_is_still_guarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_enter`` registers nothing while ``in_use`` is False (no file body yet since open). A peek's guard is entered
    in the reader thread and its statement runs after, beside the writer: the first large put can commit between the
    two, so the peek names a file its guard does not cover; that file is freed and written over before the peek reads
    it."""
    db = tmp_path / "d.db"
    ds = await open_db(db)  # a new database: no file body yet
    old, new = large(1), large(2)
    entered, statement = threading.Event(), threading.Event()
    named, go_on = threading.Event(), threading.Event()
    real_enter, real_read = ReadGuard.enter, BodyFiles._read

    def enter_then_pause(self: ReadGuard) -> None:
        real_enter(self)
        if threading.current_thread().name.startswith("sqlite-reader") and not entered.is_set():
            entered.set()  # the reader thread is preempted between its guard and its statement
            statement.wait(10)

    def read_later(self: BodyFiles, name: str) -> bytes:
        named.set()
        go_on.wait(10)
        return real_read(self, name)

    monkeypatch.setattr(ReadGuard, "enter", enter_then_pause)
    monkeypatch.setattr(BodyFiles, "_read", read_later)
    try:
        assert not ds.store.body_files.in_use
        peeking = asyncio.ensure_future(ds.queues.peek(Q, limit=1, now_ms=NOW))
        await wait_for(entered.is_set)
        await ds.queues.put([NewMessage("old", Q, {}, old, 4, None, NOW)])  # the first file body since open
        [name] = stored_names(db)
        statement.set()  # the peek's statement names the file
        await wait_for(named.is_set)
        assert await ds.queues.purge(Q) == 1
        await wait_for(lambda: name in ds.store.body_files.spares())
        await ds.queues.put([NewMessage("new", Q, {}, new, 4, None, NOW)])
        go_on.set()
        got = await peeking
        assert [(g.message_id, g.body == old, g.body == new) for g in got] in ([("old", True, False)], [])
    finally:
        statement.set()
        go_on.set()
        await ds.close()


async def test_a_failed_peek_does_not_make_a_later_peek_read_a_reused_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A selector peek that raises mid-scan (here an EIO reading a body file, which load_if_present turns into a
    DatasourceError) leaves its cursor un-reset in the traceback's frame: while the error is referenced (a log record,
    an error report, a reference cycle until the next collection) the reader connection keeps that read snapshot.
    The next peek's guard is entered at the current epoch, but its statement reads the old snapshot, which still
    names a file freed (and reused) since."""
    db = tmp_path / "d.db"
    ds = await open_db(db)
    old, new = large(1), large(2)
    try:
        await ds.queues.put([NewMessage("old", Q, {}, old, 4, None, NOW)])
        await ds.queues.put([NewMessage(f"s{i}", Q, {}, b"s", 4, None, NOW) for i in range(SCAN_BATCH + 10)])
        [name] = stored_names(db)
        real = BodyFiles._read

        def failing(self: BodyFiles, file: str) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(BodyFiles, "_read", failing)
        with pytest.raises(DatasourceError) as failed:
            await ds.queues.peek(Q, limit=10, now_ms=NOW, selector=lambda headers: True)
        monkeypatch.setattr(BodyFiles, "_read", real)
        [got] = await ds.queues.claim(Q, owner="o", limit=1, lease_ms=LEASE, now_ms=NOW)
        assert got.message_id == "old"
        await ds.queues.ack([got.message_id], [got.lease])
        await wait_for(lambda: name in ds.store.body_files.spares())
        await ds.queues.put([NewMessage("new", Q, {}, new, 4, None, NOW)])
        assert name in stored_names(db)  # "new" went over the freed file
        peeked = await ds.queues.peek(Q, limit=1, now_ms=NOW)
        expected = {"old": old, "new": new}
        assert [(p.message_id, p.body == expected.get(p.message_id, b"s")) for p in peeked] in ([("s0", True)], [])
        del failed
    finally:
        await ds.close()


async def test_a_put_reported_failed_after_its_commit_does_not_give_its_file_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Store._finish`` reports a committed write as failed when its ``after`` hook raises ("a bug in a hook must not
    stop the writer"); ``write_naming`` then takes the failure for a rollback and discards the put's files, now into
    the spares. The committed row still names the file, and the next large body is written over it."""
    db = tmp_path / "d.db"
    ds = await open_db(db)
    old, new = large(1), large(2)
    try:
        real_notify = Signals.notify

        def failing_notify(self: Signals, key: str) -> None:
            raise RuntimeError("a bug in a wake-up hook")

        monkeypatch.setattr(Signals, "notify", failing_notify)
        with pytest.raises(RuntimeError):
            await ds.queues.put([NewMessage("old", Q, {}, old, 4, None, NOW)])
        monkeypatch.setattr(Signals, "notify", real_notify)
        assert len(stored_names(db)) == 1  # the put committed nonetheless
        await ds.queues.put([NewMessage("new", Q, {}, new, 4, None, NOW)])
        ds = await reopen(ds, db)
        got = await ds.queues.claim(Q, owner="o", limit=2, lease_ms=LEASE, now_ms=NOW)
        assert [(g.message_id, g.body == old, g.body == new) for g in got] in (
            [("old", True, False), ("new", False, True)],
            [("new", False, True)],  # (left out as gone would at least not be another message's body)
        )
    finally:
        await ds.close()
