"""Review of the SQLite body files (app/datasources/sqlite/body_files.py): failure, cancellation and shutdown paths."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest

from app.datasources.interface import DatasourceError, DatasourceUnavailable, NewMessage
from app.datasources.sqlite.body_files import BodyFiles
from tests.app.datasources.test_sqlite_body_files import NOW, Q, files, large, open_db, reopen


async def test_a_claim_whose_body_cannot_be_read_gives_its_messages_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim is made (and answered) in the writer before its files are read. If a read fails (EIO, EMFILE...),
    the claim raises, and the messages it leased were handed to nobody: the gateway renews every lease it holds
    (Broker._renew_leases), so they must not stay leased, or they are stuck until the gateway restarts."""
    db = tmp_path / "d.db"
    ds = await open_db(db)
    try:
        await ds.queues.put([NewMessage("small", Q, {}, b"s", 4, None, NOW), NewMessage("big", Q, {}, large(1), 4, None, NOW)])
        ds = await reopen(ds, db)  # (else the body just written is taken from memory)
        real = BodyFiles._read

        def failing(self: BodyFiles, name: str) -> bytes:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(BodyFiles, "_read", failing)
        with pytest.raises(DatasourceError):
            await ds.queues.claim(Q, owner="gw", limit=5, lease_ms=30_000, now_ms=NOW)
        monkeypatch.setattr(BodyFiles, "_read", real)
        await ds.queues.renew("gw", lease_ms=30_000, now_ms=NOW + 20_000)  # the gateway's periodic renewal
        got = await ds.queues.claim(Q, owner="gw", limit=5, lease_ms=30_000, now_ms=NOW + 40_000)
        assert [g.message_id for g in got] == ["small", "big"]
    finally:
        await ds.close()


async def test_a_cancelled_put_leaves_no_file_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A put cancelled while a body thread writes its file: the file must go once written (write_bodies says so)."""
    db = tmp_path / "d.db"
    ds = await open_db(db)
    started, go = threading.Event(), threading.Event()
    real = BodyFiles.write_one

    def slow(self: BodyFiles, body: bytes) -> str:
        started.set()
        go.wait(10)
        return real(self, body)

    monkeypatch.setattr(BodyFiles, "write_one", slow)
    try:
        put = asyncio.ensure_future(ds.queues.put([NewMessage("big", Q, {}, large(1), 4, None, NOW)]))
        while not started.is_set():
            await asyncio.sleep(0.01)
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put
        go.set()
    finally:
        await ds.close()  # waits for the body threads
    assert files(db) == set()


async def test_a_put_caught_by_close_is_a_datasource_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() while a put's files are being written: the put fails as the datasource's failures do (the broker
    reports those as "Not stored"), not with the thread pool's RuntimeError, and leaves no file."""
    db = tmp_path / "d.db"
    ds = await open_db(db)
    started = threading.Event()
    real = BodyFiles.write_one

    def slow(self: BodyFiles, body: bytes) -> str:
        started.set()
        threading.Event().wait(0.3)
        return real(self, body)

    monkeypatch.setattr(BodyFiles, "write_one", slow)
    put = asyncio.ensure_future(ds.queues.put([NewMessage("big", Q, {}, large(1), 4, None, NOW)]))
    while not started.is_set():
        await asyncio.sleep(0.01)
    await ds.close()
    with pytest.raises(DatasourceUnavailable):
        await put
    assert files(db) == set()


async def test_a_new_bodies_directory_is_itself_made_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bodies directory is created at open; its name lives in its parent directory's data, which must be synced
    before a RECEIPT relies on a file in it (with sqlite_synchronous FULL, a RECEIPT survives power loss)."""
    db = tmp_path / "d.db"
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ds = await open_db(db)
    try:
        await ds.queues.put([NewMessage("big", Q, {}, large(1), 4, None, NOW)])  # RECEIPT from here
    finally:
        await ds.close()
    assert str(tmp_path) in synced
