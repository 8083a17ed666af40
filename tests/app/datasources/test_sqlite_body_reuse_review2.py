"""Second review of body file reuse (app/datasources/sqlite/body_files.py, store.py, queues.py). Real database, real
directory; monkeypatch only widens windows or injects a failure."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path
from types import MappingProxyType

import pytest

from app.datasources.interface import Changes, NewMessage
from tests.app.datasources.test_sqlite_body_files import (
    NOW,
    Q,
    files,
    large,
    open_db,
    stored_names,
)
from tests.app.datasources.test_sqlite_body_reuse import put_claim_ack, wait_for


@pytest.mark.parametrize("how", ["put", "apply"])
async def test_a_cancelled_put_whose_write_then_fails_leaves_no_file_behind(tmp_path: Path, how: str) -> None:
    """``write_naming`` discards a put's files only on ``Exception``. A caller cancelled while its write waits in the
    writer queue gets CancelledError; the write still runs, and if it then fails (here: a message id already stored,
    as SQLITE_FULL or an I/O error would), nobody discards its files: they are neither named by a row nor spares, so
    close() leaves them behind (and, when reused spares, they are lost to reuse)."""
    db = tmp_path / "d.db"
    ds = await open_db(db)
    entered, gate = threading.Event(), threading.Event()
    try:
        await ds.queues.put([NewMessage("dup", Q, {}, b"small", 4, None, NOW)])

        def hold(conn: object) -> None:  # keeps the writer busy while the put's write waits in the queue
            entered.set()
            gate.wait(10)

        holding = ds.store.write(hold)
        await wait_for(entered.is_set)
        again = [NewMessage("dup", Q, {}, large(1), 4, None, NOW)]  # refused by the UNIQUE message_id
        if how == "put":
            storing = asyncio.ensure_future(ds.queues.put(again))
        else:
            storing = asyncio.ensure_future(ds.apply(Changes(queue=again)))
        await wait_for(lambda: len(ds.store._pending) == 1)  # its file is written, its write queued
        storing.cancel()  # e.g. the client went away, or the gateway's shutdown grace ran out
        with pytest.raises(asyncio.CancelledError):
            await storing
        gate.set()
        await holding
        await ds.store.write(lambda conn: None)  # the put's write has run (and failed)
    finally:
        gate.set()
        await ds.close()
    assert stored_names(db) == set()
    assert files(db) == set()  # only files that stored rows name may be left after close()


@pytest.mark.parametrize("how", ["put", "apply"])
async def test_a_put_that_fails_while_its_write_is_built_leaves_no_file_behind(tmp_path: Path, how: str) -> None:
    """``put`` and ``apply`` write the bodies first, then build the write (``put_write``: the headers as JSON,
    ``publish_write``) outside ``write_naming``'s try: whatever raises there leaves the files written for nothing,
    named by no row, neither spares nor discarded. Here the headers are a read-only Mapping (the declared type is
    ``Mapping[str, str]``), which the JSON encoder refuses."""
    db = tmp_path / "d.db"
    ds = await open_db(db)
    try:
        message = NewMessage("m", Q, MappingProxyType({"k": "v"}), large(1), 4, None, NOW)
        with pytest.raises(TypeError):
            if how == "put":
                await ds.queues.put([message])
            else:
                await ds.apply(Changes(queue=[message]))
    finally:
        await ds.close()
    assert stored_names(db) == set()
    assert files(db) == set()


async def test_a_spare_that_cannot_be_opened_for_a_moment_is_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``write_one`` takes a spare out of the list, and if writing over it raises OSError it assumes "the spare was
    removed or cannot be written: it is gone". But ``_write`` unlinks only what it opened: an ``os.open`` refused for
    a moment (EMFILE, ENFILE, ENOMEM) leaves the spare on disk, in no list and named by no row; the put goes
    on with a new file and succeeds, and close() leaves the spare behind."""
    db = tmp_path / "d.db"
    ds = await open_db(db)
    try:
        _, spare = await put_claim_ack(ds, db, "m0", large(0))
        assert ds.store.body_files.spares() == {spare}
        real_open = os.open
        refused: list[str] = []

        def open_once_refused(path: str, flags: int, *args: int, **kwargs: int) -> int:
            if str(path).endswith(spare) and not flags & os.O_CREAT and not refused:
                refused.append(str(path))
                raise OSError(errno.EMFILE, "Too many open files")
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_once_refused)
        await ds.queues.put([NewMessage("m1", Q, {}, large(1), 4, None, NOW)])
        monkeypatch.setattr(os, "open", real_open)
        assert refused  # the spare was tried, refused once, and the put went to a new file
        [kept] = stored_names(db)
        assert kept != spare
    finally:
        await ds.close()
    assert files(db) == stored_names(db)  # only files that stored rows name may be left after close()
