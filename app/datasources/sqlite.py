"""Embedded datasource on SQLite (the default): ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``
(SQLAlchemy's form: three slashes then the path; the default is ``sqlite:///./data/stompgate.db``). The parent
directory is created when missing. One gateway process per database file.

Supports: every PollQueue and TailQueue operation; leases with expiry; dead-lettering to ``<destination>.DLQ``;
selectors evaluated in Python while scanning the backlog in delivery order (a subscription's scan resumes where
its last one stopped and examines at most ``SCAN_BUDGET`` rows per claim, see ``ScanMark``); a topic log with ``Gap`` reporting;
durable cursors. No native (MongoDB-style) selectors.

How it writes: WAL mode and ONE writer thread that owns the write connection. Every write (put, claim, ack, release,
renew, publish, cursor save) is queued; the writer takes everything pending, runs it in one transaction, commits
once (group commit) and only then resolves each caller. So ``put`` returns after the COMMIT that contains it, and
with ``PRAGMA synchronous`` FULL (``DatasourceOptions.sqlite_synchronous``) that commit is on disk; NORMAL survives
a killed process but not a power cut. Inspection (stats, peek, destinations, cursors, topic catch-up) uses a second,
read-only connection on its own thread and sees committed data only.

Atomicity: each call is all or nothing (a failing call is retried alone in its own transaction, so it cannot spoil
the batch it was grouped with); ``release`` with DEAD_LETTER is one UPDATE per message. A claim runs inside the
single writer, so no two claims ever return the same message.

Leases: a claim first requeues leases that expired before ``now_ms`` on its destination (the writer remembers the
earliest lease it granted, so this costs nothing on the hot path). On open, every lease of a previous process is
released (delivery counts kept): that process is gone.

Topics: ``topic_log`` holds at least ``topic_retention`` messages; the writer trims it every
``max(1, min(1000, topic_retention // 10))`` publishes, or when ``SqliteTailQueue.trim()`` is awaited.
Followers read backlogs from the database in batches, then follow an in-memory tail of recently committed messages.
Options used: ``topic_retention``, ``sqlite_synchronous``, ``namespace`` (table name prefix). Others are ignored.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

from app.datasources.interface import (
    Changes,
    Datasource,
    DatasourceError,
    DatasourceOptions,
    DatasourceUnavailable,
    Gap,
    HeaderFilter,
    NewMessage,
    PollQueue,
    Published,
    QueueStats,
    Release,
    ScanBook,
    ScanMark,
    Signals,
    StoredMessage,
    TailEvent,
    TailQueue,
    PEEK_SCAN_LIMIT,
    SCAN_BUDGET,
)

__all__ = ["SqliteDatasource", "SqlitePollQueue", "SqliteTailQueue", "open_datasource", "database_path"]

T = TypeVar("T")

MIN_SQLITE = (3, 35, 0)  # UPDATE ... RETURNING
MAX_BATCH_OPS = 2_000  # operations grouped into one transaction at most (bounds one commit's latency)
IN_CHUNK = 500  # ids per "IN (...)" statement, well under SQLITE_MAX_VARIABLE_NUMBER
SCAN_BATCH = 256  # rows fetched at a time while scanning with a selector or catching up a follower
TAIL_SIZE = 4_096  # recently committed topic messages kept in memory for followers
EXPIRED_SWEEP_S = 1.0  # how often a destination's expired messages are deleted (wall clock, at claim time)
_NO_LEASE = 1 << 62
_SYNCHRONOUS = {"OFF", "NORMAL", "FULL", "EXTRA", "0", "1", "2", "3"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MSG_COLUMNS = (
    "message_id, destination, headers, body, priority, expires_at, published_at, seq, deliveries, original_destination, "
    "lease"
)

# a message a consumer could take now: ready, or leased with its lease lapsed; and not expired
_READY_OR_LAPSED = "destination = ? AND (state = 0 OR lease_until <= ?) AND (expires_at IS NULL OR expires_at > ?)"

_encode_headers = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_decode_headers = json.JSONDecoder().decode


def _headers_text(headers: Mapping[str, str]) -> str:
    return _encode_headers(headers) if headers else "{}"


def _message(row: Sequence[Any]) -> StoredMessage:
    return StoredMessage(
        message_id=row[0],
        destination=row[1],
        headers=_decode_headers(row[2]),
        body=row[3],
        priority=row[4],
        expires_at=row[5],
        published_at=row[6],
        seq=row[7],
        deliveries=row[8],
        original_destination=row[9],
        lease=row[10],
    )


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


def _chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Op(Generic[T]):
    """One queued write: ``run`` executes in the writer thread inside the batch transaction; ``after`` runs on the
    event loop once the commit succeeded."""

    __slots__ = ("run", "future", "after", "early", "answered")

    def __init__(
        self,
        run: Callable[[sqlite3.Connection], T],
        future: asyncio.Future[T],
        after: Callable[[T], None] | None,
        early: bool = False,
    ) -> None:
        self.run = run
        self.future = future
        self.after = after
        # An early op is answered as soon as it ran, before the COMMIT: used for claims, whose result need not be
        # durable (leases are reset on open, so a claim lost in a crash only means a redelivery) and whose latency
        # would otherwise include the group commit's fsync.
        self.early = early
        self.answered = False


# A write as the writer runs it: the step inside the batch transaction, and what runs on the event loop after the
# commit (wake-ups, the topic tail), given the step's result.
_Write = tuple[Callable[[sqlite3.Connection], T], Callable[[T], None] | None]


def _answer(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


class _Store:
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
        self.topic_log = f"{ns}_topic_log"
        self.cursors = f"{ns}_cursors"
        self.commits = 0  # committed write transactions; tests use it to see group commit at work
        self._writer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        self._reader_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._pending: deque[_Op[Any]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
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
                UPDATE {m} SET state = 0, owner = NULL, lease_until = NULL WHERE state = 1;
                COMMIT;
                """
            )
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

    # -- writes: the group commit ----------------------------------------------------------------------------------
    def write(
        self, run: Callable[[sqlite3.Connection], T], after: Callable[[T], None] | None = None, *, early: bool = False
    ) -> asyncio.Future[T]:
        if self._closing:
            raise DatasourceUnavailable("the SQLite datasource is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append(_Op(run, future, after, early))
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
            for op, (ok, value) in zip(batch, results):
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
            conn.execute("COMMIT")
        except Exception as exc:
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



class SqlitePollQueue(PollQueue):
    def __init__(self, store: _Store) -> None:
        self._store = store
        self._signals = Signals()
        self._scans = ScanBook()  # touched only in the writer thread, with the writes and claims it tracks
        store.on_rollback.append(self._rolled_back)
        m = store.messages
        self._sql_put = (
            f"INSERT INTO {m} (message_id, destination, priority, expires_at, published_at, headers, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        ready = "destination = ? AND state = 0 AND (expires_at IS NULL OR expires_at > ?)"
        self._sql_claim = (
            f"UPDATE {m} SET state = 1, owner = ?, lease_until = ?, deliveries = deliveries + 1, lease = lease + 1 "
            f"WHERE seq IN (SELECT seq FROM {m} WHERE {ready} ORDER BY priority DESC, seq LIMIT ?) "
            f"RETURNING {_MSG_COLUMNS}"
        )
        self._sql_scan = f"SELECT priority, seq, headers FROM {m} WHERE {ready} ORDER BY priority DESC, seq"
        # resuming a scan after (priority p, seq s): the rest of p's band, then the lower priorities
        self._sql_scan_band = f"SELECT priority, seq, headers FROM {m} WHERE {ready} AND priority = ? AND seq > ? ORDER BY seq"
        self._sql_scan_below = (
            f"SELECT priority, seq, headers FROM {m} WHERE {ready} AND priority < ? ORDER BY priority DESC, seq"
        )
        self._sql_expire_leases = (
            f"UPDATE {m} SET state = 0, owner = NULL, lease_until = NULL "
            "WHERE destination = ? AND state = 1 AND lease_until <= ?"
        )
        self._sql_lease_floor = f"SELECT min(lease_until) FROM {m} WHERE destination = ? AND state = 1"
        self._sql_sweep = f"DELETE FROM {m} WHERE destination = ? AND state = 0 AND expires_at <= ?"
        self._sql_peek = f"SELECT {_MSG_COLUMNS} FROM {m} WHERE {_READY_OR_LAPSED} ORDER BY priority DESC, seq"

    # -- writer-thread helpers -------------------------------------------------------------------------------------
    def _rolled_back(self) -> None:
        """Claims answered early may have been undone: every scan looks again and every waiter is woken."""
        self._scans.requeue_all()
        self._store.call_on_loop(self._signals.notify_all)

    def _requeue_lapsed(self, conn: sqlite3.Connection, destination: str, now_ms: int) -> None:
        store = self._store
        floor = store.lease_floor.get(destination)
        if floor is not None and floor > now_ms:
            return
        if conn.execute(self._sql_expire_leases, (destination, now_ms)).rowcount:
            self._scans.requeue(destination)
        (earliest,) = conn.execute(self._sql_lease_floor, (destination,)).fetchone()
        store.lease_floor[destination] = _NO_LEASE if earliest is None else earliest

    def _sweep_expired(self, conn: sqlite3.Connection, destination: str, now_ms: int) -> None:
        now = time.monotonic()
        store = self._store
        if now - store.swept_at.get(destination, 0.0) < EXPIRED_SWEEP_S:
            return
        store.swept_at[destination] = now
        conn.execute(self._sql_sweep, (destination, now_ms))

    # -- PollQueue ----------------------------------------------------------------------------------------------
    async def put(self, messages: Sequence[NewMessage]) -> None:
        if messages:
            await self._store.write(*self.put_write(messages))

    def put_write(self, messages: Sequence[NewMessage]) -> _Write[None]:
        """The writer-thread step and the event-loop follow-up of a put (``SqliteDatasource.apply`` joins several)."""
        rows = [
            (
                m.message_id,
                m.destination,
                m.priority,
                m.expires_at,
                m.published_at,
                _headers_text(m.headers),
                m.body,
            )
            for m in messages
        ]
        sql = self._sql_put

        scans = self._scans

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(sql, rows)
            for row in rows:
                scans.put(row[1], row[2])

        destinations = {m.destination for m in messages}

        def after(_: None) -> None:
            for destination in destinations:
                self._signals.notify(destination)

        return run, after

    async def claim(
        self,
        destination: str,
        *,
        owner: str,
        limit: int,
        lease_ms: int,
        now_ms: int,
        selector: HeaderFilter | None = None,
        native_selector: Mapping[str, object] | None = None,
        scan: ScanMark | None = None,
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        lease_until = now_ms + lease_ms
        store = self._store

        def run(conn: sqlite3.Connection) -> list[StoredMessage]:
            self._requeue_lapsed(conn, destination, now_ms)
            self._sweep_expired(conn, destination, now_ms)
            if selector is None:
                rows = conn.execute(self._sql_claim, (owner, lease_until, destination, now_ms, limit)).fetchall()
            else:
                rows = self._claim_matching(conn, destination, owner, lease_until, now_ms, limit, selector, scan)
            if rows:
                store.owner_destinations.setdefault(owner, set()).add(destination)
                floor = store.lease_floor.get(destination, _NO_LEASE)
                store.lease_floor[destination] = min(floor, lease_until)
            out = [_message(row) for row in rows]
            out.sort(key=lambda s: (-s.priority, s.seq))  # RETURNING gives no order
            return out

        return await store.write(run, early=True)

    def _claim_matching(
        self,
        conn: sqlite3.Connection,
        destination: str,
        owner: str,
        lease_until: int,
        now_ms: int,
        limit: int,
        selector: HeaderFilter,
        scan: ScanMark | None,
    ) -> list[Any]:
        """Scan the ready backlog in delivery order for messages the selector takes. With a ``scan`` mark (a
        subscription's), start after it and examine at most ``SCAN_BUDGET`` rows: this runs in the single writer,
        so a deep backlog that does not match must not hold up everybody's writes."""
        chosen: list[int] = []
        budget = SCAN_BUDGET if scan is not None else None
        start = self._scans.resume_after(destination, scan) if scan is not None else None
        last = start
        more = False
        examined = 0
        for priority, seq, headers in self._scan_rows(conn, destination, now_ms, start):
            if budget is not None and examined >= budget:
                more = True
                break
            examined += 1
            last = (priority, seq)
            if selector(_decode_headers(headers)):
                chosen.append(seq)
                if len(chosen) == limit:
                    break
        if scan is not None:
            self._scans.record(destination, scan, last, more)
        rows: list[Any] = []
        m = self._store.messages
        for chunk in _chunks(chosen):
            marks = ",".join("?" * len(chunk))
            rows += conn.execute(
                f"UPDATE {m} SET state = 1, owner = ?, lease_until = ?, deliveries = deliveries + 1, lease = lease + 1 "
                f"WHERE seq IN ({marks}) RETURNING {_MSG_COLUMNS}",
                (owner, lease_until, *chunk),
            ).fetchall()
        return rows

    def _scan_rows(
        self, conn: sqlite3.Connection, destination: str, now_ms: int, after: tuple[int, int] | None
    ) -> Iterator[tuple[int, int, str]]:
        queries = (
            [(self._sql_scan, (destination, now_ms))]
            if after is None
            else [
                (self._sql_scan_band, (destination, now_ms, after[0], after[1])),
                (self._sql_scan_below, (destination, now_ms, after[0])),
            ]
        )
        for sql, params in queries:
            cursor = conn.execute(sql, params)
            try:
                while batch := cursor.fetchmany(SCAN_BATCH):
                    yield from batch
            finally:
                cursor.close()

    async def ack(self, message_ids: Sequence[str], leases: Sequence[int] | None = None) -> None:
        if message_ids:
            await self._store.write(*self.ack_write(message_ids, leases))

    def ack_write(self, message_ids: Sequence[str], leases: Sequence[int] | None) -> _Write[None]:
        ids = list(message_ids)
        m = self._store.messages
        fenced = list(dict.fromkeys(zip(ids, leases))) if leases is not None else None

        def run(conn: sqlite3.Connection) -> None:
            if fenced is not None:  # only under the lease the consumer was given (a later claim changes it)
                for part in _chunks(fenced, IN_CHUNK // 3):  # three parameters per message
                    ids_in = ",".join("?" * len(part))
                    pairs_in = ",".join("(?, ?)" for _ in part)
                    conn.execute(
                        f"DELETE FROM {m} WHERE message_id IN ({ids_in}) AND (message_id, lease) IN (VALUES {pairs_in})",
                        [i for i, _ in part] + [v for pair in part for v in pair],
                    )
                return
            for chunk in _chunks(ids):
                conn.execute(f"DELETE FROM {m} WHERE message_id IN ({','.join('?' * len(chunk))})", chunk)

        return run, None

    async def release(self, message_ids: Sequence[str], how: Release, leases: Sequence[int] | None = None) -> None:
        if message_ids:
            await self._store.write(*self.release_write(message_ids, how, leases))

    def release_write(self, message_ids: Sequence[str], how: Release, leases: Sequence[int] | None) -> _Write[set[str]]:
        ids = list(message_ids)
        m = self._store.messages
        fenced = list(zip(ids, leases)) if leases is not None else None
        if how is Release.DEAD_LETTER:
            sql = (
                f"UPDATE {m} SET destination = destination || '.DLQ', "
                "original_destination = coalesce(original_destination, destination), "
                "deliveries = 0, state = 0, owner = NULL, lease_until = NULL "
                "WHERE state = 1 AND message_id IN ({}) RETURNING destination"
            )
        else:
            sql = (
                f"UPDATE {m} SET state = 0, owner = NULL, lease_until = NULL "
                "WHERE state = 1 AND message_id IN ({}) RETURNING destination"
            )

        scans = self._scans

        def run(conn: sqlite3.Connection) -> set[str]:
            woken: set[str] = set()
            if fenced is not None:  # each only while still held under the lease its consumer was given
                one = sql.replace("message_id IN ({})", "message_id = ? AND lease = ?")
                for pair in fenced:
                    for (destination,) in conn.execute(one, pair):
                        woken.add(destination)
            else:
                for chunk in _chunks(ids):
                    for (destination,) in conn.execute(sql.format(",".join("?" * len(chunk))), chunk):
                        woken.add(destination)
            for destination in woken:  # back at their old places (or new in a .DLQ): scans must look again
                scans.requeue(destination)
            return woken

        def after(woken: set[str]) -> None:
            for destination in woken:
                self._signals.notify(destination)

        return run, after

    async def renew(self, owner: str, *, lease_ms: int, now_ms: int) -> None:
        m = self._store.messages
        lease_until = now_ms + lease_ms

        store = self._store
        sql = f"UPDATE {m} SET lease_until = ? WHERE destination = ? AND state = 1 AND owner = ?"

        def run(conn: sqlite3.Connection) -> None:
            destinations = store.owner_destinations.get(owner)
            if not destinations:
                return
            for destination in list(destinations):
                if conn.execute(sql, (lease_until, destination, owner)).rowcount == 0:
                    destinations.discard(destination)  # a rollback re-adds nothing, but claims add it back
            if not destinations:
                del store.owner_destinations[owner]

        await store.write(run)

    def wake_token(self, destination: str) -> asyncio.Event:
        return self._signals.event(destination)

    async def wait(self, destination: str, timeout: float, token: asyncio.Event | None = None) -> None:
        await self._signals.wait(destination, timeout, token)

    async def stats(self, destination: str, *, now_ms: int) -> QueueStats:
        m = self._store.messages

        def run(conn: sqlite3.Connection) -> QueueStats:
            ready, unacked = conn.execute(
                "SELECT "
                "coalesce(sum((state = 0 OR lease_until <= :now) AND (expires_at IS NULL OR expires_at > :now)), 0), "
                "coalesce(sum(state = 1 AND lease_until > :now), 0) "
                f"FROM {m} WHERE destination = :dest",
                {"now": now_ms, "dest": destination},
            ).fetchone()
            return QueueStats(ready=int(ready), unacked=int(unacked))

        return await self._store.read(run)

    async def peek(
        self, destination: str, *, limit: int, offset: int = 0, now_ms: int, selector: HeaderFilter | None = None
    ) -> list[StoredMessage]:
        sql = self._sql_peek

        def run(conn: sqlite3.Connection) -> list[StoredMessage]:
            if selector is None:
                rows = conn.execute(sql + " LIMIT ? OFFSET ?", (destination, now_ms, now_ms, limit, offset))
                return [_message(row) for row in rows]
            out: list[StoredMessage] = []
            skip = offset
            cursor = conn.execute(sql + " LIMIT ?", (destination, now_ms, now_ms, PEEK_SCAN_LIMIT))
            while len(out) < limit:
                batch = cursor.fetchmany(SCAN_BATCH)
                if not batch:
                    break
                for row in batch:
                    message = _message(row)
                    if not selector(message.headers):
                        continue
                    if skip:
                        skip -= 1
                        continue
                    out.append(message)
                    if len(out) == limit:
                        break
            cursor.close()
            return out

        return await self._store.read(run)

    async def destinations(self) -> list[str]:
        m = self._store.messages

        def run(conn: sqlite3.Connection) -> list[str]:
            return [row[0] for row in conn.execute(f"SELECT DISTINCT destination FROM {m} ORDER BY destination")]

        return await self._store.read(run)

    async def purge(self, destination: str) -> int:
        m = self._store.messages

        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(f"DELETE FROM {m} WHERE destination = ?", (destination,)).rowcount

        return await self._store.write(run)

    def close(self) -> None:
        self._signals.notify_all()


class SqliteTailQueue(TailQueue):
    def __init__(self, store: _Store) -> None:
        self._store = store
        self._retention = store.options.topic_retention
        if self._retention < 1:
            raise DatasourceError("topic_retention must be at least 1")
        self._trim_every = max(1, min(1000, self._retention // 10))
        # never longer than the retained window, so the tail cannot hide a Gap the database would report
        self._tail: deque[Published] = deque(maxlen=min(TAIL_SIZE, self._retention))
        self._last = 0  # newest committed position (event-loop state)
        self._written = 0  # newest position assigned by the writer (writer-thread state)
        self._trimmed_at = 0  # writer-thread state
        self._signals = Signals()
        self._closed = False
        t = store.topic_log
        self._sql_insert = (
            f"INSERT INTO {t} (position, message_id, destination, headers, body, priority, expires_at, published_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._sql_trim = f"DELETE FROM {t} WHERE position <= ?"
        self._sql_after = (
            f"SELECT message_id, destination, headers, body, priority, expires_at, published_at, position, 0, NULL, 0 "
            f"FROM {t} WHERE position > ? ORDER BY position LIMIT ?"
        )
        self._sql_oldest = f"SELECT min(position) FROM {t}"

    async def start(self) -> None:
        t = self._store.topic_log

        def run(conn: sqlite3.Connection) -> int:
            (newest,) = conn.execute(f"SELECT coalesce(max(position), 0) FROM {t}").fetchone()
            return int(newest)

        self._last = await self._store.read(run)
        self._written = self._trimmed_at = self._last

    async def publish(self, messages: Sequence[NewMessage]) -> list[int]:
        if not messages:
            return []
        start = await self._store.write(*self.publish_write(messages))
        return list(range(start + 1, start + len(messages) + 1))

    def publish_write(self, messages: Sequence[NewMessage]) -> _Write[int]:
        """The writer-thread step of a publish (returns the position before the first message) and its follow-up."""
        rows = [
            (
                m.message_id,
                m.destination,
                _headers_text(m.headers),
                m.body,
                m.priority,
                m.expires_at,
                m.published_at,
            )
            for m in messages
        ]

        def run(conn: sqlite3.Connection) -> int:
            start = self._newest(conn)
            conn.executemany(self._sql_insert, [(start + i, *row) for i, row in enumerate(rows, 1)])
            newest = start + len(rows)
            if newest - self._trimmed_at >= self._trim_every:
                conn.execute(self._sql_trim, (newest - self._retention,))
                self._trimmed_at = newest
            self._written = newest
            return start

        def after(start: int) -> None:
            for i, message in enumerate(messages, 1):
                position = start + i
                self._tail.append(
                    Published(
                        position=position,
                        message=StoredMessage(
                            message_id=message.message_id,
                            destination=message.destination,
                            headers=message.headers,
                            body=message.body,
                            priority=message.priority,
                            expires_at=message.expires_at,
                            published_at=message.published_at,
                            seq=position,
                        ),
                    )
                )
            self._last = max(self._last, start + len(messages))
            self._signals.notify("log")

        return run, after

    def _newest(self, conn: sqlite3.Connection) -> int:
        # Read in the transaction rather than trusting ``_written``: a rolled-back batch may have advanced it.
        (newest,) = conn.execute(f"SELECT coalesce(max(position), 0) FROM {self._store.topic_log}").fetchone()
        return int(newest)

    async def trim(self) -> None:
        """Trim the log to ``topic_retention`` messages now (the writer otherwise trims every few publishes)."""

        def run(conn: sqlite3.Connection) -> None:
            newest = self._newest(conn)
            conn.execute(self._sql_trim, (newest - self._retention,))
            self._trimmed_at = newest

        await self._store.write(run)

    async def _read_after(self, position: int) -> tuple[int | None, list[Published]]:
        def run(conn: sqlite3.Connection) -> tuple[int | None, list[Published]]:
            rows = conn.execute(self._sql_after, (position, SCAN_BATCH)).fetchall()
            (oldest,) = conn.execute(self._sql_oldest).fetchone()
            return oldest, [Published(position=row[7], message=_message(row)) for row in rows]

        return await self._store.read(run)

    def follow(self, *, after: int | None) -> AsyncIterator[TailEvent]:
        # "the current end" is the end when follow() is called, not when the iterator first runs
        return self._follow(self._last if after is None else after)

    async def _follow(self, position: int) -> AsyncIterator[TailEvent]:
        while not self._closed:
            if position >= self._last:
                await self._signals.event("log").wait()
                continue
            tail = self._tail
            if tail and tail[0].position <= position + 1:
                index = position + 1 - tail[0].position
                entry = tail[index]
                position = entry.position
                yield entry
                continue
            oldest, batch = await self._read_after(position)
            first = batch[0].position if batch else (oldest if oldest is not None else self._last + 1)
            if first > position + 1:
                yield Gap(expected=position + 1, oldest=first)
                position = first - 1
            for entry in batch:
                if entry.position <= position:
                    continue
                position = entry.position
                yield entry

    async def last_position(self) -> int:
        return self._last

    async def save_cursor(self, name: str, position: int) -> None:
        c = self._store.cursors

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO {c} (name, position) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET position = excluded.position",
                (name, position),
            )

        await self._store.write(run)

    async def load_cursor(self, name: str) -> int | None:
        c = self._store.cursors

        def run(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(f"SELECT position FROM {c} WHERE name = ?", (name,)).fetchone()
            return None if row is None else int(row[0])

        return await self._store.read(run)

    def close(self) -> None:
        self._closed = True
        self._signals.notify_all()


class SqliteDatasource(Datasource):
    def __init__(self, url: str, store: _Store) -> None:
        self.url = url
        self.store = store
        self._queues = SqlitePollQueue(store)
        self._topics = SqliteTailQueue(store)
        self.queues = self._queues
        self.topics = self._topics

    @property
    def commits(self) -> int:
        """Write transactions committed so far (each may hold many calls: group commit)."""
        return self.store.commits

    atomic_changes = True

    async def apply(self, changes: Changes) -> None:
        """A COMMIT's puts, publishes, ACKs and releases as one step of the writer, so in one SQLite transaction:
        all stored, or (the step raised, the transaction rolled back) none. Wake-ups follow the commit."""
        writes: list[_Write[Any]] = []
        if changes.queue:
            writes.append(self._queues.put_write(changes.queue))
        if changes.topic:
            writes.append(self._topics.publish_write(changes.topic))
        if changes.acks:
            writes.append(self._queues.ack_write([i for i, _ in changes.acks], [lease for _, lease in changes.acks]))
        for held, how in ((changes.requeue, Release.REQUEUE), (changes.dead_letter, Release.DEAD_LETTER)):
            if held:
                writes.append(self._queues.release_write([i for i, _ in held], how, [lease for _, lease in held]))
        if not writes:
            return

        def run(conn: sqlite3.Connection) -> list[Any]:
            return [step(conn) for step, _ in writes]

        def after(results: list[Any]) -> None:
            for (_, follow_up), result in zip(writes, results):
                if follow_up is not None:
                    follow_up(result)

        await self.store.write(run, after)

    async def ping(self) -> None:
        await self.store.read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        self._queues.close()
        self._topics.close()
        await self.store.close()


async def open_datasource(url: str, options: DatasourceOptions) -> Datasource:
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise DatasourceError(
            f"the sqlite:// datasource needs SQLite 3.35 or newer (UPDATE ... RETURNING); "
            f"this Python links SQLite {sqlite3.sqlite_version}"
        )
    store = _Store(database_path(url), options)
    await store.open()
    datasource = SqliteDatasource(url, store)
    try:
        await datasource._topics.start()
    except BaseException:
        await store.close()
        raise
    return datasource
