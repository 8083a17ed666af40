"""The datasource contract: two small interfaces every backend provides, and the values they exchange.

A backend module imports only this module and its own driver. The broker imports only this module.

Positions and times are plain integers: ``now_ms`` is milliseconds since the epoch, passed in by the broker so that
tests can control time and so that every gateway sharing a database uses the same arithmetic.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "NewMessage",
    "StoredMessage",
    "QueueStats",
    "Release",
    "Published",
    "Gap",
    "TailEvent",
    "HeaderFilter",
    "Held",
    "Changes",
    "PollQueue",
    "ScanMark",
    "SCAN_BUDGET",
    "PEEK_SCAN_LIMIT",
    "TailQueue",
    "Datasource",
    "DatasourceOptions",
    "WrappedCollection",
    "WrappedTable",
    "DatasourceUnavailable",
    "DatasourceError",
    "DatasourceRefused",
]

# A selector compiled by the broker: a predicate over a message's headers. Backends that can evaluate a query in the
# database (MongoDB) may also receive the original query document through ``Datasource.native_selector``.
HeaderFilter = Callable[[Mapping[str, str]], bool]


class DatasourceError(Exception):
    """A backend failed in a way the caller should report (bad URL, bad configuration, corrupt data)."""


class DatasourceRefused(DatasourceError):
    """The backend will not do this to this destination (purging a wrapped collection or table): the caller's
    request, not a fault."""


class DatasourceUnavailable(DatasourceError):
    """The database cannot be reached right now. The operation did not take effect (or is safe to retry)."""


# NewMessage and StoredMessage are built once or twice per message on the hot path: plain (not frozen) slotted
# dataclasses build about 5x faster (0.4 µs against 2.2 µs for ten fields). Treat them as values all the same.
@dataclass(slots=True)
class NewMessage:
    """A message on its way in. ``message_id`` is assigned by the broker and unique across gateways."""

    message_id: str
    destination: str
    headers: Mapping[str, str]  # application headers, already stripped of the STOMP control headers
    body: bytes
    priority: int = 4  # 0-9; higher is delivered first on queues
    expires_at: int | None = None  # epoch ms; an expired message is never delivered
    published_at: int = 0  # epoch ms


@dataclass(slots=True)
class StoredMessage:
    """A message as a backend returns it from ``claim``, ``peek`` or ``follow``."""

    message_id: str
    destination: str
    headers: Mapping[str, str]
    body: bytes
    priority: int = 4
    expires_at: int | None = None
    published_at: int = 0
    seq: int = 0  # queue: FIFO order within a priority; topic: the position in the log
    deliveries: int = 0  # times handed to a consumer, counting this claim; > 1 means redelivered
    original_destination: str | None = None  # set when dead-lettered
    # The claim's lease token (from ``claim``): a number that changes with every claim of the message and is never
    # reused. ``ack`` and ``release`` given it act only while the message is still held under this very lease.
    lease: int = 0


# A message as its consumer holds it: (message_id, the lease token its claim returned). ACKs and releases carry it.
Held = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Changes:
    """What one STOMP COMMIT (or several, grouped) asks of the store, applied by ``Datasource.apply``: messages to
    put on queues and publish on topics, and queue messages the consumers settled, each with its lease token."""

    queue: Sequence[NewMessage] = ()
    topic: Sequence[NewMessage] = ()
    acks: Sequence[Held] = ()
    requeue: Sequence[Held] = ()
    dead_letter: Sequence[Held] = ()

    @staticmethod
    def merge(parts: Sequence[Changes]) -> Changes:
        """Several commits as one (group commit): order kept within each kind."""
        if len(parts) == 1:
            return parts[0]
        return Changes(
            queue=[m for p in parts for m in p.queue],
            topic=[m for p in parts for m in p.topic],
            acks=[h for p in parts for h in p.acks],
            requeue=[h for p in parts for h in p.requeue],
            dead_letter=[h for p in parts for h in p.dead_letter],
        )


@dataclass(frozen=True, slots=True)
class QueueStats:
    ready: int  # waiting to be delivered (not expired, not leased)
    unacked: int  # leased by a consumer, not yet acknowledged


class Release(Enum):
    REQUEUE = "requeue"  # back to ready, keeping its place (priority, seq) and its delivery count
    DEAD_LETTER = "dead-letter"  # atomically move to ``<destination>.DLQ``, ready, deliveries reset


@dataclass(frozen=True, slots=True)
class Published:
    position: int
    message: StoredMessage


@dataclass(frozen=True, slots=True)
class Gap:
    """``follow`` could not reach back to ``after``: messages ``expected`` .. ``oldest - 1`` are gone."""

    expected: int
    oldest: int


TailEvent = Published | Gap


# Messages one claim with a Python selector examines at most (about 5 ms of header decoding and matching): a deep
# backlog of messages that do not match costs a subscription a bounded amount per turn, and never holds up the
# writes of other clients for longer than that.
SCAN_BUDGET = 512
# Messages a peek with a selector examines at most (about 0.2 s of decoding and matching): an inspection request
# that filters a deep backlog answers from its first part instead of decoding all of it while others wait.
PEEK_SCAN_LIMIT = 20_000


@dataclass(slots=True)
class ScanMark:
    """A subscription's place in the selector scan of its queue's backlog: it holds one and passes it to every claim.

    The messages up to ``after`` (a ``(priority, seq)`` in delivery order) were examined and did not match, or were
    taken: the next claim goes on after them instead of rescanning the whole backlog at every wake-up. ``more`` is
    True when a claim stopped at ``SCAN_BUDGET`` before the end of the backlog: claim again soon, do not wait."""

    after: tuple[int, int] | None = None
    version: tuple[int, int] = (-1, -1)  # the destination's (requeue epoch, put count) when ``after`` was recorded
    more: bool = False


class PollQueue(abc.ABC):
    """Queues: each message goes to exactly one consumer. Leases make a claimed message come back if its holder
    disappears without releasing it."""

    # True where a destination's messages become visible in ``seq`` order (one writer). False where a message may
    # commit after one put later (PostgreSQL), so that a put of a scan mark's own priority makes it look again.
    puts_visible_in_seq_order: bool = True

    @abc.abstractmethod
    async def put(self, messages: Sequence[NewMessage]) -> None:
        """Store all of ``messages`` durably, in order. Returns only once they would survive a crash. A single
        call is all or nothing where the database allows it (the docstring of each backend says)."""

    @abc.abstractmethod
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
        """Atomically take up to ``limit`` ready messages (highest priority first, then FIFO), leasing them to
        ``owner`` until ``now_ms + lease_ms``. A message whose lease expired is ready again. Expired messages
        (``expires_at <= now_ms``) are never returned. Each returned message has ``deliveries`` incremented.
        No two concurrent claims, in this process or another gateway, ever return the same message.

        With a Python ``selector`` and a ``scan`` mark, a backend that evaluates the selector itself examines at most
        ``SCAN_BUDGET`` messages, starting after the mark, and updates it (its docstring says whether it does)."""

    @abc.abstractmethod
    async def ack(self, message_ids: Sequence[str], leases: Sequence[int] | None = None) -> None:
        """Delete acknowledged messages. Unknown ids are ignored (already acked or dead-lettered).

        With ``leases`` (one per id, the ``lease`` its claim returned) the delete is fenced: a message is deleted only
        while it is still leased under that token, atomically in the database. An ACK from a consumer whose lease
        lapsed, and whose message another consumer has claimed since, so deletes nothing."""

    @abc.abstractmethod
    async def release(self, message_ids: Sequence[str], how: Release, leases: Sequence[int] | None = None) -> None:
        """Give leased messages back: requeue them, or move them to their dead-letter queue, atomically each.
        Fenced by ``leases`` as ``ack`` is: a late release never undoes someone else's claim."""

    @abc.abstractmethod
    async def renew(self, owner: str, *, lease_ms: int, now_ms: int) -> None:
        """Extend every lease held by ``owner`` (a live gateway keeps its in-flight messages)."""

    @abc.abstractmethod
    def wake_token(self, destination: str) -> asyncio.Event:
        """Take before a claim and pass to ``wait`` after an empty one: a put or requeue in between is not missed."""

    @abc.abstractmethod
    async def wait(self, destination: str, timeout: float, token: asyncio.Event | None = None) -> None:
        """Return when new work may be ready on ``destination`` or after ``timeout`` seconds, without busy polling.
        Local puts and requeues wake waiters at once (also those made since ``token`` was taken); another gateway's
        puts are seen within ``timeout``."""

    @abc.abstractmethod
    async def stats(self, destination: str, *, now_ms: int) -> QueueStats: ...

    @abc.abstractmethod
    async def peek(
        self, destination: str, *, limit: int, offset: int = 0, now_ms: int, selector: HeaderFilter | None = None
    ) -> list[StoredMessage]:
        """The backlog in delivery order, without claiming anything, from ``offset`` (counted among the matching
        ones with a selector). With a ``selector``, only the first ``PEEK_SCAN_LIMIT`` messages are examined."""

    @abc.abstractmethod
    async def destinations(self) -> list[str]:
        """Every queue destination that holds at least one message (ready or leased)."""

    @abc.abstractmethod
    async def purge(self, destination: str) -> int:
        """Delete every message of ``destination``; return how many."""


class TailQueue(abc.ABC):
    """Topics: an append-only log with a bounded retained window; every follower sees every message in order."""

    @abc.abstractmethod
    async def publish(self, messages: Sequence[NewMessage]) -> list[int]:
        """Append durably, in order; return the positions assigned (strictly increasing)."""

    @abc.abstractmethod
    def follow(self, *, after: int | None) -> AsyncIterator[TailEvent]:
        """Yield every message with position > ``after`` in order, then wait for new ones, forever. ``after=None``
        starts at the current end (live only). When the retained window no longer reaches ``after + 1``, yield one
        ``Gap`` first. Survives reconnects to the database by resuming from the last position it yielded."""

    @abc.abstractmethod
    async def last_position(self) -> int:
        """The position of the newest message, 0 when empty."""

    @abc.abstractmethod
    async def save_cursor(self, name: str, position: int) -> None:
        """Remember a durable subscription's position (``name`` is unique per client and subscription)."""

    @abc.abstractmethod
    async def load_cursor(self, name: str) -> int | None: ...

    @abc.abstractmethod
    async def delete_cursor(self, name: str) -> None:
        """Forget a durable subscription's position (it was deleted): ``load_cursor`` then answers None."""


@dataclass(frozen=True, slots=True)
class WrappedCollection:
    """An existing MongoDB collection exposed as a queue destination: its documents matching ``filter`` are
    delivered as JSON bodies and consumed with the usual ack rules. An ACK deletes the document; it is the only ACK
    action. Set from ``[[wrap]]`` tables (app/wraps.py checks them); at most one per collection, as the backend
    finds a document's wrap by its collection."""

    destination: str  # e.g. "/queue/jobs.video"
    collection: str  # e.g. "jobs"
    filter: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WrappedTable:
    """An existing PostgreSQL table exposed as a queue destination: its rows matching ``filter`` (the operators of
    a MongoDB query that have an SQL form; keys are column names) are delivered as JSON bodies and consumed with the
    usual ack rules. An ACK deletes the row, or with ``ack_set`` updates these columns to these values instead.
    ``table`` is ``name`` or ``schema.name``; ``key`` names the columns identifying a row (None: the primary key).
    Set from ``[[wrap]]`` tables (app/wraps.py checks them); at most one per table."""

    destination: str  # e.g. "/queue/orders.new"
    table: str  # e.g. "orders" or "shop.orders"
    key: tuple[str, ...] | None = None
    filter: Mapping[str, object] = field(default_factory=dict)
    ack_set: Mapping[str, object] | None = None


@dataclass(frozen=True, slots=True)
class DatasourceOptions:
    """Settings every backend understands; a backend ignores what does not apply to it (its docstring says)."""

    topic_retention: int = 100_000  # messages kept in the topic log (a capped collection's ``max`` on MongoDB)
    topic_retention_bytes: int = 256 * 1024 * 1024  # bytes kept in the topic log (a capped collection's ``size``)
    poll_interval: float = 0.25  # seconds: the longest another gateway's new work waits before it is seen
    write_concern: str = "majority"  # MongoDB ``w``
    server_selection_timeout_ms: int = 5_000  # MongoDB: how long an operation waits for a primary
    failover_buffer: int = 10_000  # MongoDB: messages held in memory while no primary is reachable
    sqlite_synchronous: str = "FULL"  # SQLite ``PRAGMA synchronous``: FULL survives power loss, NORMAL a crash
    wrapped: tuple[WrappedCollection, ...] = ()  # MongoDB
    wrapped_tables: tuple[WrappedTable, ...] = ()  # PostgreSQL
    namespace: str = "stompgate"  # collection / table name prefix


class Datasource(abc.ABC):
    """What the registry opens: the two strategies plus lifecycle and health."""

    url: str
    queues: PollQueue
    topics: TailQueue
    native_selectors: bool = False  # True when claim() can evaluate a MongoDB-style query document itself
    # True when other processes (other gateways) may add or requeue work: an idle consumer must then look again every
    # ``poll_interval``. False when every change comes through this process (SQLite, memory), whose ``wait`` is woken
    # by each local put and requeue, so an idle subscription costs nothing until then.
    shared: bool = False

    # True when ``apply`` is all or nothing (one database transaction); False when it is the ordered best below.
    atomic_changes: bool = False
    # True when the broker should write the queue SENDs and the ACKs that arrive together as one ``apply`` (group
    # commit: one transaction, one commit to wait for), for a store that does not group separate calls itself.
    # SQLite's writer thread already groups every write; MongoDB has no transaction to put them in.
    joins_sends_and_acks: bool = False

    async def apply(self, changes: Changes) -> None:
        """Store a COMMIT's changes. A backend with transactions overrides this to apply them all or none. This
        default, for stores without multi-document transactions, applies them one kind after the other, writes
        first: a failure part-way may leave the SENDs stored and the ACKs not (the consumed messages come back, as
        after any failed ACK: at-least-once), never the ACKs applied without the SENDs (a consume-and-produce step
        would then lose its output)."""
        if changes.queue:
            await self.queues.put(changes.queue)
        if changes.topic:
            await self.topics.publish(changes.topic)
        if changes.acks:
            await self.queues.ack([i for i, _ in changes.acks], [lease for _, lease in changes.acks])
        for held, how in ((changes.requeue, Release.REQUEUE), (changes.dead_letter, Release.DEAD_LETTER)):
            if held:
                await self.queues.release([i for i, _ in held], how, [lease for _, lease in held])

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ``DatasourceUnavailable`` when the database cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None: ...
