"""The PostgreSQL store: a connection pool, the versioned schema, the notification listener, and how driver errors
become the contract's errors.

Schema: tables named ``<namespace>_<table>`` (identifiers quoted), in the schema the connection's ``search_path``
names first (set it in the URL: ``postgresql://host/db?search_path=queues``, asyncpg passes unknown URL parameters as
server settings). ``<namespace>_schema`` holds the version; start-up applies the missing migrations in order under an
advisory lock (so gateways starting together do not race), and refuses a database whose schema is newer than this
code knows.

Wake-ups: every write that makes queue work claimable or appends to the topic log calls ``pg_notify`` in its own
transaction, so the notification is delivered when, and only if, it commits. One dedicated connection per gateway
LISTENs; while it is down the store reports ``listening = False`` and waiters poll instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from app.datasources.failover import FailoverWriter
from app.datasources.interface import DatasourceError, DatasourceOptions, DatasourceUnavailable

__all__ = ["Store", "UNAVAILABLE", "quote", "SCHEMA_VERSION", "TABLES", "WriteAttempt"]

log = logging.getLogger("stompgate.datasource.postgresql")

T = TypeVar("T")

# Errors that mean "the database cannot be reached right now": the operation did not take effect, or is safe to retry.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,  # 08xxx, and ConnectionDoesNotExistError
    asyncpg.exceptions.OperatorInterventionError,  # 57P01 admin shutdown, 57P03 cannot connect now, 57014 cancelled
    asyncpg.exceptions.InterfaceError,  # the pool is closing, or the connection went away under a call
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # connected to a standby (a failover under way): wait for a primary
)

MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1, in bytes: longer names are cut without a word, so refuse them
# every name made from the namespace (tables, indexes, the notification channel); the longest decides
IDENTIFIER_SUFFIXES = (
    "messages", "messages_ready", "messages_leased", "messages_owner", "topic_log", "topic_head", "cursors", "schema",
    "wake", "writes", "writes_at", "wrap_leases", "wrap_owner",
)  # fmt: skip
# every table the migrations create, under the namespace (the bench drops them after a run)
TABLES = ("messages", "topic_log", "topic_head", "cursors", "writes", "wrap_leases", "schema")
MARK_KEEP_MS = 3_600_000  # write marks are kept an hour (a replay comes when the database answers again)
MARK_GC_S = 60.0
RETRIES_AFTER_ROLLBACK = 3  # a deadlock or serialization failure rolled the transaction back: run it again
POOL_SIZE = 8
# Sent when each connection starts, after (so over) any the URL gives, and kept by the pool's RESET ALL.
SESSION_SETTINGS = {
    # A RECEIPT means stored: a commit returns once it is on disk, whatever the server's default.
    "synchronous_commit": "on",
    # How a value prints decides a wrapped row's key text (wrapped.py): every gateway must print a key alike, whatever
    # the role's, the database's or the URL's time zone, float digits, date and interval styles.
    "timezone": "UTC",
    "extra_float_digits": "3",
    "datestyle": "ISO, MDY",
    "intervalstyle": "postgres",
}
CONNECT_TIMEOUT_S = 10.0
LISTEN_RETRY_S = (0.1, 2.0)  # the listener's reconnect back-off: first, and most
LISTEN_PROBE_TIMEOUT_S = 5.0


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _migrations(t: Callable[[str], str]) -> list[list[str]]:
    """The schema, one list of statements per version; a new version is appended, never edited."""
    return [
        [
            f"""CREATE TABLE {t("messages")} (
                seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                message_id text NOT NULL UNIQUE,
                destination text NOT NULL,
                priority smallint NOT NULL,
                expires_at bigint,
                published_at bigint NOT NULL,
                headers text NOT NULL,
                body bytea NOT NULL,
                state smallint NOT NULL DEFAULT 0,
                owner text,
                lease_until bigint,
                lease bigint NOT NULL DEFAULT 0,
                deliveries integer NOT NULL DEFAULT 0,
                original_destination text
            )""",
            # the claim of ready messages: one destination's ready rows in claim order
            f"CREATE INDEX {t('messages_ready')} ON {t('messages')} (destination, priority DESC, seq) WHERE state = 0",
            # leased rows: lapsed leases by destination, and renewal by owner
            f"CREATE INDEX {t('messages_leased')} ON {t('messages')} (destination, lease_until) WHERE state = 1",
            f"CREATE INDEX {t('messages_owner')} ON {t('messages')} (owner) WHERE state = 1",
            f"""CREATE TABLE {t("topic_log")} (
                position bigint PRIMARY KEY,
                message_id text NOT NULL,
                destination text NOT NULL,
                priority smallint NOT NULL,
                expires_at bigint,
                published_at bigint NOT NULL,
                headers text NOT NULL,
                body bytea NOT NULL
            )""",
            # One row: the newest position handed out. Publishers take it with an UPDATE, whose row lock is held to
            # commit, so positions commit in number order (see topics.py).
            f"CREATE TABLE {t('topic_head')} (only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row), position bigint NOT NULL)",
            f"INSERT INTO {t('topic_head')} (position) VALUES (0)",
            f"CREATE TABLE {t('cursors')} (name text PRIMARY KEY, position bigint NOT NULL)",
        ],
        [
            # Marks of committed writes, so that a write replayed after its answer was lost is not applied twice.
            f"CREATE TABLE {t('writes')} (id text PRIMARY KEY, at bigint NOT NULL)",
            f"CREATE INDEX {t('writes_at')} ON {t('writes')} (at)",
        ],
        [
            # Leases of the rows of wrapped tables (app/datasources/postgresql/wrapped.py), kept beside them so that
            # the operator's tables are never altered. row_key: the row's key columns as JSON text. claims: the lease
            # token, new from the identity at every claim and requeue (SET claims = DEFAULT), so that a token is never
            # handed out twice, even after the lease row was deleted (an ACK) and the key comes back.
            f"""CREATE TABLE {t("wrap_leases")} (
                destination text NOT NULL,
                row_key text NOT NULL,
                owner text,
                lease_until bigint NOT NULL,
                claims bigint GENERATED BY DEFAULT AS IDENTITY,
                deliveries integer NOT NULL,
                PRIMARY KEY (destination, row_key)
            )""",
            f"CREATE INDEX {t('wrap_owner')} ON {t('wrap_leases')} (owner) WHERE owner IS NOT NULL",
        ],
    ]


SCHEMA_VERSION = len(_migrations(lambda name: name))


class Store:
    """The pool, the table names, the listener and the error translation that queues and topics share."""

    def __init__(self, url: str, options: DatasourceOptions) -> None:
        try:  # a malformed URL is the operator's to fix: one sentence, without the URL (it may hold a password)
            parts = urlsplit(url)
            parts.port, parts.hostname  # noqa: B018 - these parse the authority and raise on a bad one
        except ValueError as exc:
            raise DatasourceError(f"the PostgreSQL URL is not valid: {exc}") from None
        self.url = url
        self.options = options
        ns = options.namespace
        for suffix in IDENTIFIER_SUFFIXES:
            if len(f"{ns}_{suffix}".encode()) > MAX_IDENTIFIER:
                raise DatasourceError(f"the namespace {ns!r} is too long for PostgreSQL table names (at most 63 bytes)")
        self.channel = f"{ns}_wake"  # LISTEN/NOTIFY channel: quoted where it is an identifier, plain in pg_notify()
        self.messages = self.table("messages")
        self.topic_log = self.table("topic_log")
        self.topic_head = self.table("topic_head")
        self.cursors = self.table("cursors")
        self.writes = self.table("writes")
        self.wrap_leases = self.table("wrap_leases")
        self.sql_mark_first = f"INSERT INTO {self.writes} (id, at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING RETURNING true"
        self.sql_mark = f"INSERT INTO {self.writes} (id, at) VALUES ($1, $2)"
        self._collector: asyncio.Task[None] | None = None
        self.pool: asyncpg.Pool | None = None
        # Writes that meet an unreachable server wait here (their RECEIPTs with them) and are replayed when it returns.
        self.writer = FailoverWriter(options.failover_buffer, unavailable=(DatasourceUnavailable,), database="PostgreSQL")
        self.listening = False
        self._listener_task: asyncio.Task[None] | None = None
        self._handlers: list[Callable[[str], None]] = []
        self._lost: list[Callable[[], None]] = []
        self._listening_handlers: list[Callable[[bool], None]] = []
        self._closed = False
        self._first_listen = asyncio.Event()

    def table(self, name: str) -> str:
        return quote(f"{self.options.namespace}_{name}")

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self.pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=POOL_SIZE, timeout=CONNECT_TIMEOUT_S, command_timeout=60,
                server_settings=SESSION_SETTINGS, reset=_keep_session,
            )
        except Exception as exc:  # noqa: BLE001 - every way of failing to connect becomes one sentence
            raise DatasourceError(_connect_failure(self.url, exc)) from None
        try:
            await self._migrate()
        except BaseException:
            await self.pool.close()
            raise
        self._listener_task = asyncio.get_running_loop().create_task(self._listen(), name="postgresql listener")
        self._collector = asyncio.get_running_loop().create_task(self._collect_marks_now_and_then(), name="write marks")
        # Start with notifications flowing (no waiter can have missed one yet); if LISTEN fails, polling covers it.
        try:
            await asyncio.wait_for(self._first_listen.wait(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("PostgreSQL notifications are not flowing yet: consumers poll until they do")

    async def _migrate(self) -> None:
        migrations = _migrations(self.table)
        version_table = self.table("schema")
        async with self.connection() as conn, conn.transaction():
            # Gateways starting at once on a fresh database: one creates the schema, the others then find it.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"stompgate schema {self.options.namespace}")
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {version_table} (version integer NOT NULL)")
            current = await conn.fetchval(f"SELECT max(version) FROM {version_table}")
            current = int(current or 0)
            if current > len(migrations):
                raise DatasourceError(
                    f"the PostgreSQL schema of namespace {self.options.namespace!r} is version {current}, newer than "
                    f"this stompgate knows ({len(migrations)}): run a newer stompgate"
                )
            for version in range(current + 1, len(migrations) + 1):
                for statement in migrations[version - 1]:
                    await conn.execute(statement)
                await conn.execute(f"DELETE FROM {version_table}")
                await conn.execute(f"INSERT INTO {version_table} (version) VALUES ($1)", version)
                log.info("PostgreSQL schema of namespace %s upgraded to version %d", self.options.namespace, version)

    async def close(self) -> None:
        self._closed = True
        await self.writer.close()
        for task in (self._listener_task, self._collector):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), 5)
            except UNAVAILABLE:
                self.pool.terminate()

    # -- calls ---------------------------------------------------------------------------------------------------

    def connection(self) -> Any:
        """A pooled connection (``async with``); failing to get one is ``DatasourceUnavailable``."""
        assert self.pool is not None
        return _Checkout(self.pool)

    async def write_once(
        self, attempt: WriteAttempt, work: Callable[[asyncpg.Connection, bool], Awaitable[T]], count: int
    ) -> T | None:
        """Run a write (``work``) through the failover buffer so that it takes effect once, however often it is
        replayed. ``work`` stores ``attempt.token`` in ``<ns>_writes`` with its rows, in the same statement or
        transaction. A replay of a write tried before first inserts that mark itself, in the transaction that then
        runs ``work`` (told so by its second argument: it writes no mark, and skips ids an earlier try stored, for a
        mark collected after ``MARK_KEEP_MS``). The mark being there already means an earlier try committed (its
        answer was lost with the connection): the write is done and None is returned. Inserting, not looking, also
        covers an earlier try still running on the server: the insert waits for it, and finds its mark if it
        commits."""

        async def replayed(conn: asyncpg.Connection) -> tuple[bool, T | None]:
            if await conn.fetchval(self.sql_mark_first, *attempt.mark_args()) is None:
                return False, None
            return True, await work(conn, True)

        async def attempt_write(replay: bool) -> T | None:
            if replay and attempt.tried:
                return (await self.run(replayed))[1]
            attempt.tried = True
            return await self.run(lambda conn: work(conn, False), transaction=attempt.transaction)

        return await self.writer.run(count, attempt_write)

    async def collect_marks(self) -> None:
        """Forget write marks older than ``MARK_KEEP_MS``: a replay comes long before (the buffer replays as soon as
        the database answers)."""
        cutoff = int(time.time() * 1000) - MARK_KEEP_MS
        await self.run(lambda conn: conn.execute(f"DELETE FROM {self.writes} WHERE at < $1", cutoff), transaction=False)

    async def _collect_marks_now_and_then(self) -> None:
        while True:
            await asyncio.sleep(MARK_GC_S)
            try:
                await self.collect_marks()
            except DatasourceError as exc:  # the next round tries again
                log.info("collecting write marks failed: %s", exc)

    async def run(self, work: Callable[[asyncpg.Connection], Awaitable[T]], *, transaction: bool = True) -> T:
        """Run ``work`` on a pooled connection, in a transaction unless told otherwise; the database being out of
        reach is ``DatasourceUnavailable``."""
        for attempt in range(RETRIES_AFTER_ROLLBACK + 1):
            try:
                return await self._run_once(work, transaction)
            except asyncpg.exceptions.TransactionRollbackError as exc:  # deadlock, serialization: nothing took effect
                if attempt == RETRIES_AFTER_ROLLBACK:
                    raise DatasourceError(f"PostgreSQL rolled the transaction back {attempt + 1} times: {exc}") from None
                log.info("PostgreSQL rolled a transaction back (%s); running it again", exc)
        raise AssertionError("unreachable")

    async def _run_once(self, work: Callable[[asyncpg.Connection], Awaitable[T]], transaction: bool) -> T:
        try:
            async with self.connection() as conn:
                if not transaction:
                    return await work(conn)
                async with conn.transaction():
                    return await work(conn)
        except DatasourceUnavailable:
            raise
        except asyncpg.UniqueViolationError as exc:  # a message id stored before: the whole call took no effect
            raise DatasourceError(f"PostgreSQL refused a duplicate: {exc.detail or exc}") from None
        except asyncpg.exceptions.DataError as exc:  # a value the driver cannot send: the caller's error, not an outage
            raise DatasourceError(f"PostgreSQL: {exc}") from None
        except UNAVAILABLE as exc:
            raise DatasourceUnavailable(f"PostgreSQL: {exc}" if str(exc) else f"PostgreSQL: {type(exc).__name__}") from exc
        except asyncpg.exceptions.TransactionRollbackError:
            raise  # run() tries again
        except asyncpg.PostgresError as exc:  # refused by the server (a constraint, a type): the caller's to report
            raise DatasourceError(f"PostgreSQL: {' '.join(str(exc).split())}") from None

    # -- notifications -------------------------------------------------------------------------------------------

    def on_notification(self, handler: Callable[[str], None]) -> None:
        self._handlers.append(handler)

    def on_listener_lost(self, handler: Callable[[], None]) -> None:
        """Called when the listener connection is lost: notifications may have been missed meanwhile."""
        self._lost.append(handler)

    async def _listen(self) -> None:
        delay = LISTEN_RETRY_S[0]
        warned = False
        while not self._closed:
            conn: asyncpg.Connection | None = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT_S)
                conn.add_termination_listener(lambda _: lost.set())
                await conn.add_listener(self.channel, self._notified)
                self._set_listening(True)
                delay, warned = LISTEN_RETRY_S[0], False
                if self._first_listen.is_set():
                    self._listener_lost()  # notifications sent while no LISTEN was in effect were missed: look again
                self._first_listen.set()
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), 5)
                    except asyncio.TimeoutError:
                        # find a dead connection that did not say so (a peer that went silent answers nothing)
                        await asyncio.wait_for(conn.execute("SELECT 1"), LISTEN_PROBE_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the listener keeps trying; polling covers the meantime
                if self.listening or self._first_listen.is_set() and not warned:  # once per outage, not per retry
                    log.warning("PostgreSQL notifications stopped (%r); consumers poll until they flow again", exc)
                    warned = True
            finally:
                if self.listening:
                    self._set_listening(False)
                    self._listener_lost()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            if not self._closed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, LISTEN_RETRY_S[1])

    def on_listening(self, handler: Callable[[bool], None]) -> None:
        """Called with True once notifications flow, and with False when they stop."""
        self._listening_handlers.append(handler)

    def _set_listening(self, value: bool) -> None:
        self.listening = value
        for handler in self._listening_handlers:
            handler(value)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        for handler in self._handlers:
            handler(str(payload))

    def _listener_lost(self) -> None:
        for handler in self._lost:
            handler()


class WriteAttempt:
    """One write's identity across its replays: a token its rows are committed with (``Store.write_once``).
    ``transaction`` is False for a write that is a single statement (its own transaction)."""

    __slots__ = ("token", "tried", "transaction")

    def __init__(self, *, transaction: bool = False) -> None:
        self.token = uuid.uuid4().hex
        self.tried = False
        self.transaction = transaction

    def mark_args(self) -> tuple[str, int]:
        """The mark's values: the token and the time it was written (epoch ms)."""
        return self.token, int(time.time() * 1000)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset of a released connection: nothing to send. asyncpg's default sends ``pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL`` on every release, a round trip the caller waits for (a claim paid two), to undo
    session state this store never leaves: its advisory locks are transaction-scoped, cursors live in transactions,
    LISTEN has a connection of its own, and the settings are the connection's start-up parameters. An open
    transaction is still rolled back by the pool before this is called."""


class _Checkout:
    """``pool.acquire()`` with a lost database reported as ``DatasourceUnavailable``."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._conn: Any = None  # a pool's connection proxy, used as an asyncpg.Connection

    async def __aenter__(self) -> Any:
        try:
            self._conn = await self._pool.acquire(timeout=CONNECT_TIMEOUT_S)
        except UNAVAILABLE as exc:
            raise DatasourceUnavailable(f"PostgreSQL: {exc or type(exc).__name__}") from exc
        return self._conn

    async def __aexit__(self, *exc_info: object) -> None:
        if self._conn is not None:
            try:
                await self._pool.release(self._conn)
            except UNAVAILABLE:
                pass


def _connect_failure(url: str, exc: BaseException) -> str:
    """One sentence for a failure to connect at start-up, naming the server but never the password."""
    parts = urlsplit(url)
    where = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
    database = parts.path.lstrip("/") or "(the user's default)"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"PostgreSQL at {where} has no database {database}: create it, or name another in the URL"
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"PostgreSQL at {where} refused the login: {exc}"
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or "timed out")
        return f"cannot reach PostgreSQL at {where}: {reason}"
    return f"cannot open PostgreSQL at {where}: {type(exc).__name__}: {exc}"
