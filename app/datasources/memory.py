"""In-process datasource for tests and demos: ``memory://`` (anything after the scheme is ignored).

Supports: every PollQueue and TailQueue operation, leases with expiry, dead-lettering to ``<destination>.DLQ``,
selectors (evaluated in Python), a bounded topic log with ``Gap`` reporting, durable cursors.

Atomicity: every operation runs to completion on the event loop without awaiting, so each call is all or nothing and
no two claims can return the same message. Nothing survives the process: ``put`` is "durable" only in memory.
Options used: ``topic_retention`` (exact: the log never holds more). Everything else is ignored.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass

from app.datasources import rules
from app.datasources.interface import (
    Datasource,
    DatasourceError,
    DatasourceOptions,
    HeaderFilter,
    NewMessage,
    PollQueue,
    Published,
    QueueStats,
    Release,
    ScanMark,
    StoredMessage,
    TailEvent,
    TailQueue,
    PEEK_SCAN_LIMIT,
    SCAN_BUDGET,
)
from app.datasources.scanning import ScanBook, scan_in_order
from app.datasources.wakeups import Signals

__all__ = ["MemoryDatasource", "MemoryPollQueue", "MemoryTailQueue", "open_datasource"]


@dataclass(slots=True)
class _Record:
    message_id: str
    destination: str
    headers: Mapping[str, str]
    body: bytes
    priority: int
    expires_at: int | None
    published_at: int
    seq: int
    deliveries: int = 0
    original_destination: str | None = None
    owner: str | None = None  # None means ready
    lease_until: int = 0
    version: int = 0  # bumped on every state change; stale heap entries carry an old version
    lease: int = 0  # bumped by every claim, never reset: the lease token that fences ack and release

    def stored(self) -> StoredMessage:
        return StoredMessage(
            message_id=self.message_id,
            destination=self.destination,
            headers=self.headers,
            body=self.body,
            priority=self.priority,
            expires_at=self.expires_at,
            published_at=self.published_at,
            seq=self.seq,
            deliveries=self.deliveries,
            original_destination=self.original_destination,
            lease=self.lease,
        )

    def claimable(self, now_ms: int) -> bool:
        """Without changing anything: inspection must not mutate."""
        return rules.claimable(
            leased=self.owner is not None, lease_until=self.lease_until, expires_at=self.expires_at, now_ms=now_ms
        )


_ReadyEntry = tuple[int, int, int, str]  # (-priority, seq, version, message_id)
_LeaseEntry = tuple[int, int, str]  # (lease_until, version, message_id)



class MemoryPollQueue(PollQueue):
    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}
        self._ready: dict[str, list[_ReadyEntry]] = {}
        self._leases: list[_LeaseEntry] = []
        self._owners: dict[str, set[str]] = {}
        self._seq = 0
        self._signals = Signals()
        self._scans = ScanBook()

    # -- internal helpers ---------------------------------------------------------------------------------------
    def _make_ready(self, record: _Record) -> None:
        if record.owner is not None:
            owned = self._owners.get(record.owner)
            if owned is not None:
                owned.discard(record.message_id)
                if not owned:
                    del self._owners[record.owner]
        record.owner = None
        record.lease_until = 0
        record.version += 1
        self._scans.requeue(record.destination)  # back at its place in the order: selector scans look again
        heap = self._ready.setdefault(record.destination, [])
        heapq.heappush(heap, (-record.priority, record.seq, record.version, record.message_id))

    def _expire_leases(self, now_ms: int) -> None:
        leases = self._leases
        while leases and leases[0][0] <= now_ms:
            _, version, message_id = heapq.heappop(leases)
            record = self._records.get(message_id)
            if record is not None and record.owner is not None and record.version == version:
                self._make_ready(record)

    def _live(self, entry: _ReadyEntry, destination: str) -> _Record | None:
        record = self._records.get(entry[3])
        if record is None or record.owner is not None or record.version != entry[2]:
            return None
        if record.destination != destination:
            return None
        return record

    def _remove(self, record: _Record) -> None:
        del self._records[record.message_id]
        if record.owner is not None:
            owned = self._owners.get(record.owner)
            if owned is not None:
                owned.discard(record.message_id)
                if not owned:
                    del self._owners[record.owner]

    def _backlog(self, destination: str, now_ms: int) -> list[_Record]:
        out = [
            r
            for r in self._records.values()
            if r.destination == destination and r.claimable(now_ms)
        ]
        out.sort(key=lambda r: rules.delivery_order(r.priority, r.seq))
        return out

    # -- PollQueue ----------------------------------------------------------------------------------------------
    async def put(self, messages: Sequence[NewMessage]) -> None:
        ids = [m.message_id for m in messages]
        if len(set(ids)) != len(ids) or any(i in self._records for i in ids):
            raise DatasourceError("put: a message with the same message_id is already stored")
        for message in messages:
            self._seq += 1
            record = _Record(
                message_id=message.message_id,
                destination=message.destination,
                headers=dict(message.headers),
                body=message.body,
                priority=message.priority,
                expires_at=message.expires_at,
                published_at=message.published_at,
                seq=self._seq,
            )
            self._records[message.message_id] = record
            heap = self._ready.setdefault(message.destination, [])
            heapq.heappush(heap, (-record.priority, record.seq, record.version, record.message_id))
            self._scans.put(message.destination, record.priority)
        for destination in {m.destination for m in messages}:
            self._signals.notify(destination)

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
        self._expire_leases(now_ms)
        heap = self._ready.get(destination)
        if not heap or limit <= 0:
            return []
        marked = selector is not None and scan is not None
        start = self._scans.resume_after(destination, scan) if scan is not None and marked else None
        popped: list[_ReadyEntry] = []  # live entries taken off the heap: those not claimed go back

        def ready_in_order() -> Iterator[tuple[int, int, _Record]]:
            while heap:
                entry = heapq.heappop(heap)
                record = self._live(entry, destination)
                if record is None:
                    continue
                if rules.expired(record.expires_at, now_ms):
                    self._remove(record)
                    continue
                popped.append(entry)
                if start is not None and (entry[0], entry[1]) <= rules.delivery_order(*start):
                    continue  # examined by an earlier claim of this subscription
                yield record.priority, record.seq, record

        found = scan_in_order(
            ready_in_order(),
            (lambda record: selector(record.headers)) if selector is not None else (lambda record: True),
            want=limit,
            budget=SCAN_BUDGET if marked else None,
            after=start,
        )
        lease_until = rules.lease_until(now_ms, lease_ms)
        taken: list[StoredMessage] = []
        for record in found.chosen:
            record.owner = owner
            record.lease_until = lease_until
            record.deliveries += 1
            record.lease += 1
            record.version += 1  # its ready entry is stale from now on
            self._owners.setdefault(owner, set()).add(record.message_id)
            heapq.heappush(self._leases, (lease_until, record.version, record.message_id))
            taken.append(record.stored())
        for entry in popped:
            if self._live(entry, destination) is not None:
                heapq.heappush(heap, entry)
        if not heap:
            del self._ready[destination]
        if scan is not None and marked:
            self._scans.record(destination, scan, found.last, found.more)
        return taken

    def _held(self, message_id: str, lease: int | None) -> _Record | None:
        """The record, when its last claim gave ``lease`` (any record when ``lease`` is None); only a later claim
        changes it, so a late ACK with no claim since still counts."""
        record = self._records.get(message_id)
        if record is None or (lease is not None and record.lease != lease):
            return None
        return record

    async def ack(self, message_ids: Sequence[str], leases: Sequence[int] | None = None) -> None:
        for message_id, lease in zip(message_ids, leases if leases is not None else [None] * len(message_ids)):
            record = self._held(message_id, lease)
            if record is not None:
                self._remove(record)

    async def release(self, message_ids: Sequence[str], how: Release, leases: Sequence[int] | None = None) -> None:
        woken: set[str] = set()
        for message_id, lease in zip(message_ids, leases if leases is not None else [None] * len(message_ids)):
            record = self._held(message_id, lease)
            if record is None or record.owner is None:  # unknown, not leased (already released), or not ours
                continue
            if how is Release.DEAD_LETTER:
                if record.original_destination is None:
                    record.original_destination = record.destination
                record.destination = rules.dead_letter_destination(record.destination)
                record.deliveries = 0
            self._make_ready(record)
            woken.add(record.destination)
        for destination in woken:
            self._signals.notify(destination)

    async def renew(self, owner: str, *, lease_ms: int, now_ms: int) -> None:
        lease_until = rules.lease_until(now_ms, lease_ms)
        for message_id in self._owners.get(owner, ()):
            record = self._records[message_id]
            record.lease_until = lease_until
            record.version += 1
            heapq.heappush(self._leases, (lease_until, record.version, message_id))

    def wake_token(self, destination: str) -> asyncio.Event:
        return self._signals.event(destination)

    async def wait(self, destination: str, timeout: float, token: asyncio.Event | None = None) -> None:
        await self._signals.wait(destination, timeout, token)

    async def stats(self, destination: str, *, now_ms: int) -> QueueStats:
        ready = unacked = 0
        for record in self._records.values():
            if record.destination != destination:
                continue
            if record.owner is not None and record.lease_until > now_ms:
                unacked += 1
            elif record.claimable(now_ms):
                ready += 1
        return QueueStats(ready=ready, unacked=unacked)

    async def peek(
        self, destination: str, *, limit: int, offset: int = 0, now_ms: int, selector: HeaderFilter | None = None
    ) -> list[StoredMessage]:
        backlog = self._backlog(destination, now_ms)
        if selector is not None:
            backlog = [r for r in backlog[:PEEK_SCAN_LIMIT] if selector(r.headers)]
        return [r.stored() for r in backlog[offset : offset + limit]]

    async def destinations(self) -> list[str]:
        return sorted({r.destination for r in self._records.values()})

    async def purge(self, destination: str) -> int:
        doomed = [r for r in self._records.values() if r.destination == destination]
        for record in doomed:
            self._remove(record)
        self._ready.pop(destination, None)
        return len(doomed)

    def close(self) -> None:
        self._signals.notify_all()


class MemoryTailQueue(TailQueue):
    """The log is a deque of exactly ``topic_retention`` entries; positions start at 1 and are contiguous."""

    def __init__(self, retention: int) -> None:
        if retention < 1:
            raise DatasourceError("topic_retention must be at least 1")
        self._log: deque[Published] = deque(maxlen=retention)
        self._last = 0
        self._cursors: dict[str, int] = {}
        self._signals = Signals()
        self._closed = False

    async def publish(self, messages: Sequence[NewMessage]) -> list[int]:
        positions: list[int] = []
        for message in messages:
            self._last += 1
            stored = StoredMessage(
                message_id=message.message_id,
                destination=message.destination,
                headers=dict(message.headers),
                body=message.body,
                priority=message.priority,
                expires_at=message.expires_at,
                published_at=message.published_at,
                seq=self._last,
            )
            self._log.append(Published(position=self._last, message=stored))
            positions.append(self._last)
        if positions:
            self._signals.notify("log")
        return positions

    def _oldest(self) -> int:
        return self._log[0].position if self._log else self._last + 1

    def follow(self, *, after: int | None) -> AsyncIterator[TailEvent]:
        # "the current end" is the end when follow() is called, not when the iterator first runs
        return self._follow(self._last if after is None else after)

    async def _follow(self, position: int) -> AsyncIterator[TailEvent]:
        while not self._closed:
            if position < self._last:
                oldest = self._oldest()
                gap = rules.gap_before(oldest, position)
                if gap is not None:
                    yield gap
                    position = oldest - 1
                    continue
                entry = self._log[position + 1 - oldest]
                position = entry.position
                yield entry
                continue
            await self._signals.event("log").wait()

    async def last_position(self) -> int:
        return self._last

    async def save_cursor(self, name: str, position: int) -> None:
        self._cursors[name] = position

    async def load_cursor(self, name: str) -> int | None:
        return self._cursors.get(name)

    async def delete_cursor(self, name: str) -> None:
        self._cursors.pop(name, None)

    async def trim(self) -> None:
        """The memory log trims on every publish; nothing to do (kept so tests can call it on any backend)."""

    def close(self) -> None:
        self._closed = True
        self._signals.notify_all()


class MemoryDatasource(Datasource):
    # ``Datasource.apply`` is all or nothing here: nothing in it awaits, so no other task sees a half-applied COMMIT,
    # and its only step that can fail, ``put`` (a message id already stored), comes first and checks before it writes.
    atomic_changes = True

    def __init__(self, url: str, options: DatasourceOptions) -> None:
        self.url = url
        self._queues = MemoryPollQueue()
        self._topics = MemoryTailQueue(options.topic_retention)
        self.queues = self._queues
        self.topics = self._topics

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._queues.close()
        self._topics.close()


async def open_datasource(url: str, options: DatasourceOptions) -> Datasource:
    return MemoryDatasource(url, options)
