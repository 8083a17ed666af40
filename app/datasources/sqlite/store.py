"""The SQLite store's engine: the two connections (one writer thread, one reader thread), the schema, and the group
commit every write goes through. Shared by the queue and topic halves; see the package docstring for the guarantees."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

from app.datasources.interface import DatasourceError, DatasourceOptions, DatasourceUnavailable, StoredMessage
from app.datasources.sqlite.body_files import BodyFiles

__all__ = ["Store", "Write", "database_path", "MIN_SQLITE"]

log = logging.getLogger("stompgate.sqlite")

T = TypeVar("T")

MIN_SQLITE = (3, 35, 0)  # UPDATE ... RETURNING
BODY_THREADS = 4  # threads writing body files (store.body_files)
MAX_BATCH_OPS = 2_000  # operations grouped into one transaction at most (bounds one commit's latency)
_SYNCHRONOUS = {"OFF", "NORMAL", "FULL", "EXTRA", "0", "1", "2", "3"}
# Settings under which a COMMIT is on disk when it returns (FULL, EXTRA): body files are reused only then.
_DURABLE_COMMITS = {"FULL", "EXTRA", "2", "3"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def database_path(url: str) -> str:
    """The file path in a ``sqlite:///...`` URL (``sqlite:////abs`` is absolute, ``sqlite:///rel`` relative)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqlite":
        raise DatasourceError(f"not a sqlite:// URL: {url!r}")
    if parts.netloc:
        raise DatasourceError(f"a sqlite URL has no host; write sqlite:///path/to/file.db, not {url!r}")
    if parts.query or parts.fragment:
        raise DatasourceError(f"a sqlite URL takes no query string; use DatasourceOptions instead ({url!r})")
    path = unquote(parts.path)[1:]  # drop the slash that separates the (empty) host from the path
    if not path or path == ":memory:":
        raise DatasourceError(f"a sqlite URL needs a database file path, e.g. sqlite:///./data/stompgate.db ({url!r})")
    return path



class _Op(Generic[T]):
    """One queued write: ``run`` executes in the writer thread inside the batch transaction; ``after`` runs on the
    event loop once the commit succeeded, ``undone`` once it is known that this write did not commit (whether or not
    its caller still waits for it)."""

    __slots__ = ("run", "future", "after", "undone", "early", "answered")

    def __init__(
        self,
        run: Callable[[sqlite3.Connection], T],
        future: asyncio.Future[T],
        after: Callable[[T], None] | None,
        early: bool = False,
        undone: Callable[[], None] | None = None,
    ) -> None:
        self.run = run
        self.future = future
        self.after = after
        self.undone = undone
        # An early op is answered as soon as it ran, before the COMMIT: used for claims, whose result need not be
        # durable (leases are reset on open, so a claim lost in a crash only means a redelivery) and whose latency
        # would otherwise include the group commit's fsync.
        self.early = early
        self.answered = False


# A write as the writer runs it: the step inside the batch transaction, and what runs on the event loop after the
# commit (wake-ups, the topic tail), given the step's result.
Write = tuple[Callable[[sqlite3.Connection], T], Callable[[T], None] | None]


def _discard_written(files: BodyFiles) -> Callable[[concurrent.futures.Future[tuple[str, bool]]], None]:
    def discard(write: concurrent.futures.Future[tuple[str, bool]]) -> None:
        if not write.cancelled() and write.exception() is None:
            files.discard([write.result()[0]], named_durably=False)

    return discard


def _answer(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


class Store:
    """The two connections, the writer loop and the group commit. Shared by the queue and topic halves."""

    _inflight: asyncio.Future[None] | None = None  # the running batch, while it holds answered early ops

    def __init__(self, path: str, options: DatasourceOptions) -> None:
        self.path = path
        self.options = options
        ns = options.namespace
        if not _NAME.match(ns):
            raise DatasourceError(f"namespace {ns!r} is not a valid SQLite table name prefix (letters, digits, _)")
        synchronous = options.sqlite_synchronous.upper()
        if synchronous not in _SYNCHRONOUS:
            raise DatasourceError(f"sqlite_synchronous must be one of OFF, NORMAL, FULL, EXTRA, not {synchronous!r}")
        self.synchronous = synchronous
        self.messages = f"{ns}_messages"
        self.bodies = f"{ns}_messages_bodies"
        self.topic_log = f"{ns}_topic_log"
        self.cursors = f"{ns}_cursors"
        self.commits = 0  # committed write transactions; tests use it to see group commit at work
        self._writer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._reader_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")
        # Large bodies are written to files by threads of their own, so the writer goes on with claims and ACKs
        # meanwhile; several, because concurrent fdatasyncs share the file system's journal commits (64 files of
        # 1 MiB: 2.4 ms each one after the other, 1.2 ms each from four threads).
        self.body_files = BodyFiles(path, self.messages, reuse=synchronous in _DURABLE_COMMITS)
        self._body_pool = ThreadPoolExecutor(max_workers=BODY_THREADS, thread_name_prefix="sqlite-bodies")
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._pending: deque[_Op[Any]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._gone: list[str] = []  # writer thread: body files of the deletions committed by the running batch
        self._closing = False
        # writer-thread state (only touched by the writer thread)
        self.lease_floor: dict[str, int] = {}  # destination -> a lower bound of its earliest lease_until
        # Called in the writer thread after a rolled-back batch: claims answered early are undone, so their messages
        # are ready again, and whoever waits or scans must look again.
        self.on_rollback: list[Callable[[], None]] = []
        self.swept_at: dict[str, float] = {}  # destination -> monotonic time of the last expired-message sweep
        # owner -> destinations it claimed from since it last renewed nothing there; lets renew use the claim index
        # (destination, state) instead of an owner index that every claim and ack would have to maintain
        self.owner_destinations: dict[str, set[str]] = {}

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            self._shutdown_pools()
            raise DatasourceError(
                f"cannot create the directory {directory!r} for the SQLite database: {exc.strerror or exc}"
            ) from exc
        loop = asyncio.get_running_loop()
        try:
            self._writer = await loop.run_in_executor(self._writer_pool, self._open_writer)
            self._reader = await loop.run_in_executor(self._reader_pool, self._open_reader)
        except Exception as exc:
            await self._close_connections()
            self._shutdown_pools()
            if isinstance(exc, DatasourceError):
                raise
            if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
                raise DatasourceError(f"{self.path} is not a SQLite database ({exc})") from exc
            raise DatasourceError(
                f"cannot open the SQLite database {self.path!r} (is the directory {directory!r} writable?): {exc}"
            ) from exc
        self._loop = loop
        self._task = loop.create_task(self._writer_loop(), name="sqlite-writer")

    def call_on_loop(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the event loop (from the writer thread)."""
        self._loop.call_soon_threadsafe(callback)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise DatasourceError(f"SQLite refused WAL mode for {self.path!r} (journal_mode is {mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            # Debian builds SQLite with secure_delete on: every delete overwrote the row's body with zeros, through the
            # WAL and again at the checkpoint (an ACK of a 1 MiB message wrote 1 MiB more). FAST zeroes only what costs
            # no extra I/O; consumed messages are not scrubbed, as RabbitMQ and Artemis do not scrub their journals.
            conn.execute("PRAGMA secure_delete = FAST")
            m, t, c = self.messages, self.topic_log, self.cursors
            conn.executescript(
                f"""
                BEGIN IMMEDIATE;
                CREATE TABLE IF NOT EXISTS {m} (
                    seq INTEGER PRIMARY KEY,
                    message_id TEXT NOT NULL UNIQUE,
                    destination TEXT NOT NULL,
                    state INTEGER NOT NULL DEFAULT 0,          -- 0 ready, 1 leased
                    priority INTEGER NOT NULL,
                    expires_at INTEGER,
                    published_at INTEGER NOT NULL,
                    deliveries INTEGER NOT NULL DEFAULT 0,
                    owner TEXT,
                    lease_until INTEGER,
                    original_destination TEXT,
                    headers TEXT NOT NULL,
                    body BLOB NOT NULL,
                    lease INTEGER NOT NULL DEFAULT 0            -- bumped by every claim: the fencing token
                );
                CREATE INDEX IF NOT EXISTS {m}_claim ON {m} (destination, state, priority DESC, seq);
                CREATE INDEX IF NOT EXISTS {m}_expiry ON {m} (destination, expires_at) WHERE expires_at IS NOT NULL;
                CREATE TABLE IF NOT EXISTS {t} (
                    position INTEGER PRIMARY KEY,
                    message_id TEXT NOT NULL,
                    destination TEXT NOT NULL,
                    headers TEXT NOT NULL,
                    body BLOB NOT NULL,
                    priority INTEGER NOT NULL,
                    expires_at INTEGER,
                    published_at INTEGER NOT NULL
                );
                CREATE TABLE IF NOT EXISTS {c} (name TEXT PRIMARY KEY, position INTEGER NOT NULL);
                -- bodies over SIDE_BODY_MIN bytes live here, their message row holding an empty body: a claim, a
                -- requeue or a renewal rewrites the message row, and SQLite rewrites a row whole, overflow pages and
                -- all, when its size changes (a claim sets the owner): a 1 MiB body was written again by every claim
                CREATE TABLE IF NOT EXISTS {m}_bodies (seq INTEGER PRIMARY KEY, body BLOB NOT NULL);
                CREATE TRIGGER IF NOT EXISTS {m}_bodies_gone AFTER DELETE ON {m} WHEN length(OLD.body) = 0
                BEGIN DELETE FROM {m}_bodies WHERE seq = OLD.seq; END;
                {BodyFiles.schema(m)}
                UPDATE {m} SET state = 0, owner = NULL, lease_until = NULL WHERE state = 1;
                COMMIT;
                """
            )
            self.body_files.sweep(conn)
            conn.execute("BEGIN IMMEDIATE")  # check and change in one transaction: two openers cannot both add it
            columns = {row[1] for row in conn.execute(f"PRAGMA table_info({m})")}
            if "lease" not in columns:  # a database made before leases were fenced
                conn.execute(f"ALTER TABLE {m} ADD COLUMN lease INTEGER NOT NULL DEFAULT 0")
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_reader(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA query_only = ON")
        return conn

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task  # drains everything already queued
        await self._close_connections()
        self._shutdown_pools()
        self.body_files.drop_spares()

    async def _close_connections(self) -> None:
        loop = asyncio.get_running_loop()
        if self._writer is not None:
            await loop.run_in_executor(self._writer_pool, self._writer.close)
            self._writer = None
        if self._reader is not None:
            await loop.run_in_executor(self._reader_pool, self._reader.close)
            self._reader = None

    def _shutdown_pools(self) -> None:
        self._writer_pool.shutdown(wait=True)
        self._reader_pool.shutdown(wait=True)
        self._body_pool.shutdown(wait=True)

    async def write_bodies(self, bodies: list[bytes]) -> list[str]:
        """Store large bodies as synced files on the body threads, and then their names; returns the names. On
        failure, no file is left."""
        if self._closing:
            raise DatasourceUnavailable("the SQLite datasource is closed")
        loop = asyncio.get_running_loop()
        files = self.body_files
        # The pool's own futures: cancelling an asyncio wrapper of a write already running marks the wrapper
        # cancelled while the thread goes on and creates the file, which only the pool's future then reports.
        in_pool = [self._body_pool.submit(files.write_one, body) for body in bodies]
        writes = [asyncio.wrap_future(write, loop=loop) for write in in_pool]
        try:
            results = await asyncio.gather(*writes, return_exceptions=True)
        except asyncio.CancelledError:  # the writes go on in their threads: their files go once they are written
            for write in in_pool:
                write.add_done_callback(_discard_written(files))
            raise
        written = [result for result in results if isinstance(result, tuple)]
        names = [name for name, _ in written]
        try:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            if any(created for _, created in written):  # a reused file's name is durable already
                await self._in_body_thread(files.sync_directory)
        except BaseException:
            files.discard(names, named_durably=False)
            raise
        return names

    def write_naming(self, files: Sequence[str | None] | None, build: Callable[[], Write[T]]) -> asyncio.Future[T]:
        """``write`` the step ``build`` makes, which names body ``files`` (``write_bodies``'s). If building it fails,
        or it does not commit, nothing names the files, so they go; that is known in the writer, not from the caller,
        whose wait may have been cancelled while the write still runs. A write that committed keeps them, even if its
        ``after`` hook then failed: its rows name them."""
        undone = None if files is None else partial(self.body_files.discard, files)
        try:
            run, after = build()
            return self.write(run, after, undone=undone)
        except BaseException:  # not queued (building it failed, or the store is closing): nothing will name them
            if undone is not None:
                undone()
            raise

    async def read_bodies(self, messages: list[StoredMessage]) -> list[StoredMessage]:
        """Fill in the bodies a claim returned as file names: those just written from memory, the others read on
        the body threads (not in the writer, which every other claim and write waits for); see
        ``BodyFiles.load_if_present`` for a file deleted meanwhile."""
        if self.body_files.recall(messages):
            return messages
        return await self._in_body_thread(self.body_files.load_if_present, messages)

    def _in_body_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        try:
            return asyncio.get_running_loop().run_in_executor(self._body_pool, fn, *args)
        except RuntimeError as exc:  # the pool was shut down: close() ran while the caller waited
            raise DatasourceUnavailable("the SQLite datasource is closed") from exc

    # -- writes: the group commit ----------------------------------------------------------------------------------
    def write(
        self,
        run: Callable[[sqlite3.Connection], T],
        after: Callable[[T], None] | None = None,
        *,
        early: bool = False,
        undone: Callable[[], None] | None = None,
    ) -> asyncio.Future[T]:
        if self._closing:
            raise DatasourceUnavailable("the SQLite datasource is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append(_Op(run, future, after, early, undone))
        self._wakeup.set()
        return future

    async def _writer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        pending = self._pending
        while True:
            if not pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [pending.popleft() for _ in range(min(len(pending), MAX_BATCH_OPS))]
            try:
                early = any(op.early for op in batch)
                if early:
                    self._inflight = loop.create_future()
                try:
                    results = await loop.run_in_executor(self._writer_pool, self._run_batch, batch)
                finally:
                    if early and self._inflight is not None:
                        self._inflight.set_result(None)
                        self._inflight = None
            except BaseException as exc:  # the writer thread itself failed: fail the batch, keep serving
                error = exc if isinstance(exc, Exception) else DatasourceUnavailable("the SQLite writer stopped")
                results = [(False, error)] * len(batch)
                if not isinstance(exc, Exception):
                    for op in batch:
                        if not op.future.done():
                            op.future.set_exception(error)
                    raise
            gone, self._gone = self._gone, []
            self._finish(batch, results, gone)
            # Not kept while the loop waits for the next batch: a claim's results hold the bodies it read.
            del batch, results

    def _finish(self, batch: list[_Op[Any]], results: list[tuple[bool, Any]], gone: list[str]) -> None:
        """A batch committed: run its follow-ups, answer its callers, unlink the files its deletions left."""
        for op, (ok, value) in zip(batch, results):
            if not ok and op.undone is not None:
                try:
                    op.undone()
                except Exception:  # (a bug in a hook must not stop the writer)
                    log.exception("cleaning up after a write that did not commit failed")
            if ok and op.after is not None:
                try:
                    op.after(value)
                except Exception as exc:  # a bug in a hook must not stop the writer
                    ok, value = False, exc
            if op.future.done():  # the caller was cancelled; its write may still have committed
                continue
            if ok:
                op.future.set_result(value)
            else:
                op.future.set_exception(value)
        if gone:
            self._body_pool.submit(self.body_files.discard, gone)

    def _run_batch(self, batch: list[_Op[Any]]) -> list[tuple[bool, Any]]:
        conn = self._writer
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = []
            for op in batch:
                result = op.run(conn)
                results.append(result)
                if op.early:
                    op.answered = True
                    self._loop.call_soon_threadsafe(_answer, op.future, result)
            gone = self.body_files.take_gone(conn)
            conn.execute("COMMIT")
        except Exception as exc:  # (the COMMIT failed, or a step raised: the transaction is rolled back)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.lease_floor.clear()  # may describe rolled-back claims; forgetting it is always safe
            for hook in self.on_rollback:
                hook()
            if len(batch) == 1:
                return [(False, _translate(exc))]
            # Isolate the failing call. An early op already answered is not run again: its claim was rolled back, so
            # those messages are ready again and may be delivered twice (at-least-once), never leaked.
            return [
                (True, None) if op.answered else result
                for op in batch
                for result in ([(True, None)] if op.answered else self._run_batch([op]))
            ]
        self.commits += 1
        self._gone += gone  # the files of the bodies this commit deleted, unlinked by ``_finish``
        return [(True, r) for r in results]

    # -- reads -------------------------------------------------------------------------------------------------
    async def read(self, run: Callable[[sqlite3.Connection], T]) -> T:
        if self._closing or self._reader is None:
            raise DatasourceUnavailable("the SQLite datasource is closed")
        if self._inflight is not None:
            # A batch holding claims already answered is not committed yet: read after it, so that whoever saw a
            # claim's result also sees it in stats and peek.
            await asyncio.shield(self._inflight)
        reader = self._reader

        def call() -> T:
            try:
                return run(reader)
            except sqlite3.Error as exc:
                raise _translate(exc) from exc

        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, call)


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, sqlite3.IntegrityError):
        return DatasourceError(f"SQLite refused the write (a message_id already stored?): {exc}")
    if isinstance(exc, sqlite3.OperationalError):
        return DatasourceUnavailable(f"SQLite could not complete the operation: {exc}")
    if isinstance(exc, sqlite3.Error):
        return DatasourceError(f"SQLite error: {exc}")
    return exc
