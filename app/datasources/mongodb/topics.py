"""TailQueue on MongoDB: one capped collection ``<ns>.topics`` per gateway namespace, followed with tailable cursors.

Documents: ``{_id (= message_id), message_id, destination, position, priority, expires_at, published_at,
headers: [{k, v}], body}`` plus one seed ``{_id: "__stompgate_seed__", position: 0, seed: true}`` inserted when the
collection is created, so a tailable cursor on an otherwise empty log has a document to stand on (an empty result
kills a tailable cursor at once). The seed is never re-inserted, so "seed still there" also means "nothing was
trimmed yet", which keeps ``follow`` from reporting a false gap.

Positions are gateway-assigned (``_sequence.SequenceAllocator``, ``$inc`` by N per batch), not ``_id`` order.
Two gateways publishing at once can commit out of order (B inserts 11..20 before A inserts 1..10), and a publisher
that dies after reserving positions leaves a hole. ``follow`` therefore reads in natural (insertion) order and keeps
a small reorder buffer: it yields only the next expected position; a later one waits in the buffer until the missing
ones arrive, or at most ``REORDER_SETTLE_S`` seconds, after which the hole is skipped (those positions were never
written). Positions ``<= last yielded`` are dropped, so re-opening is idempotent.

Re-opening: ``find({"position": {"$gte": last}}, TAILABLE_AWAIT)`` (``$gte`` so the last yielded document keeps a
non-empty first batch once the seed is trimmed) when the cursor dies (``alive`` False), on ``CursorNotFound``,
``OperationFailure`` (FerretDB answers code 1 when its last position was trimmed; MongoDB's ``CappedPositionLost``
just kills the cursor inside PyMongo) and on ``ConnectionFailure`` with backoff. Before each open, when the oldest
retained position is beyond ``last + 1``, one ``Gap`` is yielded.

FerretDB v1 does not follow the log with a tailable cursor (``follow_mode`` "poll"), because its awaitData cursor
costs the whole log per delivered batch: every ``getMore`` that finds its iterator used up re-runs the find twice
(filters other than top-level equality are applied in Go after decoding every document, ~0.1 ms each), skips to
its last record id, sleeps 10 ms, and closes that iterator on return; and a first batch shorter than ``batchSize``
closes the cursor, which forced ``batch_size=1``. Measured on FerretDB 1.24 / PostgreSQL: one follower delivered
~20 messages/s on a fresh log and a range find over 100,000 documents takes 4.5 s. So on FerretDB each document
also carries ``block = position // BLOCK``, and the follower reads the block of ``last + 1`` with an equality
filter, which FerretDB pushes down to PostgreSQL (~1 ms on a small log, ~45 ms at 100,000 documents), and moves to
the next block once it has yielded the last position of this one. It reads again at once after a publish of this
gateway, every ``HOLE_POLL_S`` while positions reserved by another gateway (``SequenceAllocator.allocated_end``)
are not all in, and every ``poll_interval`` when idle: another gateway's messages are seen within that bound. The
reorder and hole rules are the same as above; every read is a fresh look at the block, so "caught up" holds at
each one. The newest and oldest positions are found without a sorted read there too (the sequence's reserved
end; an unsorted ``find`` with a limit, which FerretDB serves in insertion order from the start of the log).
Capped ``size``/``max`` are trimmed by FerretDB's background job (every minute by default), so they are soft
limits there; ``trim()`` applies ``max`` on demand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from pymongo import CursorType
from pymongo.errors import (
    BulkWriteError,
    CollectionInvalid,
    ConnectionFailure,
    DuplicateKeyError,
    InvalidOperation,
    OperationFailure,
)

from app.datasources.interface import (
    DatasourceError,
    DatasourceOptions,
    Gap,
    NewMessage,
    Published,
    Signals,
    TailEvent,
    TailQueue,
)
from app.datasources.mongodb._common import (
    Collection,
    Db,
    Doc,
    is_duplicate_only,
    message_doc,
    stored_from_doc,
    unavailable_on_disconnect,
)
from app.datasources.mongodb._failover import FailoverWriter
from app.datasources.mongodb._sequence import SequenceAllocator

__all__ = ["BLOCK", "REORDER_SETTLE_S", "SEED_ID", "MongoTailQueue", "topic_doc"]

log = logging.getLogger(__name__)

SEED_ID = "__stompgate_seed__"
REORDER_SETTLE_S = 1.0  # how long a missing position may hold back later ones before it is skipped as never written
AWAIT_MS = 500  # getMore maxTimeMS: how long one awaitData round trip blocks when nothing new arrives
EDGE_SAMPLE = 16  # documents read at each end (natural order) to find the oldest / newest position
MAX_BACKOFF_S = 2.0
BLOCK = 64  # FerretDB: positions per ``block`` value, what one read of the log returns at most
HOLE_POLL_S = 0.02  # FerretDB: re-read interval while positions another gateway reserved are still coming in
SIGNAL = "topics"  # the ``Signals`` key a publish notifies (one log for every topic)
FollowMode = Literal["cursor", "poll"]


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass


def topic_doc(message: NewMessage, position: int, *, ferretdb: bool) -> Doc:
    """The stored form of a topic message; on FerretDB with the ``block`` its log is read by."""
    doc = message_doc(message, seq_field="position", seq=position, flat_headers=False)
    if ferretdb:
        doc["block"] = position // BLOCK
    return doc


class MongoTailQueue(TailQueue):
    def __init__(
        self,
        db: Db,
        namespace: str,
        *,
        ferretdb: bool,
        writer: FailoverWriter,
        sequences: SequenceAllocator,
        options: DatasourceOptions,
    ) -> None:
        self._db = db
        self._name = f"{namespace}.topics"
        self._coll = Collection(db[self._name])
        self._cursors = Collection(db[f"{namespace}.cursors"])
        self._ferretdb = ferretdb
        self._writer = writer
        self._sequences = sequences
        self._options = options
        self._closed = False
        self._signals = Signals()
        # how followers read the log; a test may set "cursor" on FerretDB to exercise the MongoDB path there
        self.follow_mode: FollowMode = "poll" if ferretdb else "cursor"
        # ``follow(after=None)`` means "from the end as of the call"; the generator runs its first query later (when
        # first iterated), by which time this gateway may have published more. Each publish call is numbered when it
        # starts and records its first position, so the follower can leave out exactly the ones begun after the call.
        self._publish_calls = 0
        self._recent_firsts: deque[tuple[int, int]] = deque(maxlen=1024)

    async def setup(self) -> None:
        try:
            await self._db.create_collection(
                self._name,
                capped=True,
                size=max(self._options.topic_retention_bytes, 4096),
                max=self._options.topic_retention,
            )
            created = True
        except CollectionInvalid:  # already there (another gateway, or a restart)
            created = False
        if created or await self._coll.find_one({}, projection={"_id": 1}) is None:
            try:
                await self._coll.insert_one({"_id": SEED_ID, "position": 0, "seed": True})
            except DuplicateKeyError:
                pass

    # -- publish --------------------------------------------------------------------------------------------------
    async def publish(self, messages: Sequence[NewMessage]) -> list[int]:
        msgs = list(messages)
        if not msgs:
            return []
        first: int | None = None
        self._publish_calls += 1
        call = self._publish_calls

        async def write(retry: bool) -> int:
            nonlocal first
            if first is None:
                first = await self._sequences.allocate("topic", len(msgs))
                self._recent_firsts.append((call, first))
            docs = [topic_doc(m, first + i, ferretdb=self._ferretdb) for i, m in enumerate(msgs)]
            try:
                await self._coll.insert_many(docs, ordered=not retry)
            except BulkWriteError as exc:
                if not (retry and is_duplicate_only(exc)):
                    if is_duplicate_only(exc):
                        raise DatasourceError("publish: a message with the same message_id is already stored") from exc
                    raise
            return first

        start = await self._writer.run(len(msgs), write)
        self._signals.notify(SIGNAL)
        return list(range(start, start + len(msgs)))

    # -- follow ---------------------------------------------------------------------------------------------------
    def follow(self, *, after: int | None) -> AsyncIterator[TailEvent]:
        return self._follow(after, self._publish_calls)

    async def _follow(self, after: int | None, calls_before: int) -> AsyncIterator[TailEvent]:
        if after is None:
            last = await self.last_position()
            later = [first for call, first in self._recent_firsts if call > calls_before]
            if later:  # published by this gateway after follow() was called: live, not history
                last = min(last, min(later) - 1)
        else:
            last = after
        events = self._follow_blocks(last) if self.follow_mode == "poll" else self._follow_cursor(last)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def _follow_cursor(self, last: int) -> AsyncIterator[TailEvent]:
        """MongoDB: one tailable awaitData cursor, re-opened from ``last`` (see module doc)."""
        pending: dict[int, Doc] = {}
        hole_since: float | None = None
        backoff = 0.05
        batch = 1 if self._ferretdb else 100
        while not self._closed:
            try:
                oldest = await self._oldest_if_trimmed()
                if oldest is not None and oldest > last + 1:
                    yield Gap(expected=last + 1, oldest=oldest)
                    last = oldest - 1
                    pending = {p: d for p, d in pending.items() if p > last}
                yielded_here = False
                cursor = self._coll.raw.find(
                    {"position": {"$gte": last}}, cursor_type=CursorType.TAILABLE_AWAIT, batch_size=batch
                ).max_await_time_ms(AWAIT_MS)
                try:
                    while not self._closed:
                        doc: Doc | None
                        try:
                            doc = await cursor.next()
                        except StopAsyncIteration:
                            if not cursor.alive:
                                break
                            doc = None
                        if doc is not None and not doc.get("seed"):
                            position = int(doc["position"])
                            if position > last:
                                pending[position] = doc
                                if hole_since is None:
                                    hole_since = time.monotonic()
                        # yield what is in order; skip a hole only once it stayed open for the settle window
                        # while the cursor was caught up (``doc is None``: nothing more to read right now) and a
                        # direct look-up finds no document in it. The settle time alone is not enough: a slow
                        # cursor can take longer than the window to reach another gateway's earlier positions,
                        # inserted later in natural order.
                        while pending:
                            if last + 1 not in pending:
                                assert hole_since is not None
                                if doc is not None or time.monotonic() - hole_since < REORDER_SETTLE_S:
                                    break
                                found = await self._coll.find_list(
                                    {"position": {"$gt": last, "$lt": min(pending)}}
                                )
                                if found:
                                    pending.update((int(d["position"]), d) for d in found)
                                    continue
                                log.info("topic log: positions %d..%d were never written; skipping", last + 1,
                                         min(pending) - 1)
                                last = min(pending) - 1
                            last += 1
                            yield Published(position=last, message=stored_from_doc(pending.pop(last),
                                                                                   seq_field="position"))
                            yielded_here = True
                            hole_since = time.monotonic() if pending else None
                        backoff = 0.05
                finally:
                    await cursor.close()
                if not yielded_here and not self._closed:
                    # dead at once (nothing at or after ``last`` yet): wait a little instead of spinning
                    await asyncio.sleep(min(self._options.poll_interval, 0.5))
            except OperationFailure as exc:  # CursorNotFound, FerretDB's code 1 after trimming, ...
                log.info("topic cursor lost (%s); re-opening from position %d", exc, last)
                await asyncio.sleep(0.01)
            except ConnectionFailure as exc:
                log.warning("topic cursor: MongoDB unreachable (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except InvalidOperation:
                if self._closed:
                    return
                raise

    async def _follow_blocks(self, last: int) -> AsyncIterator[TailEvent]:
        """FerretDB: read the log one ``block`` at a time by equality (see module doc). Wakes at once on a local
        publish, every ``HOLE_POLL_S`` while positions another gateway reserved are not all in yet, and every
        ``poll_interval`` when idle."""
        pending: dict[int, Doc] = {}  # read, not yet yielded (beyond a hole)
        hole_since: float | None = None  # when ``last + 1`` was first found missing with something to wait for
        stalled = False  # the settle window passed with nothing written after ``last + 1``: look less often
        backoff = 0.05
        check_trimmed = True
        while not self._closed:
            try:
                if check_trimmed:
                    oldest = await self._oldest_if_trimmed()
                    if oldest is not None and oldest > last + 1:
                        yield Gap(expected=last + 1, oldest=oldest)
                        last = oldest - 1
                        pending = {p: d for p, d in pending.items() if p > last}
                    check_trimmed = False
                wake = self._signals.event(SIGNAL)  # taken before the read: a publish during it still wakes us
                block = (last + 1) // BLOCK
                for doc in await self._coll.find_list({"block": block}):
                    position = int(doc["position"])
                    if position > last:
                        pending[position] = doc
                while last + 1 in pending:
                    last += 1
                    yield Published(position=last, message=stored_from_doc(pending.pop(last), seq_field="position"))
                    hole_since, stalled = None, False
                backoff = 0.05
                if (last + 1) // BLOCK != block:
                    continue  # this block is done: read the next one now
                end = last
                if not pending:
                    end = await self._sequences.allocated_end("topic")
                    if end <= last:
                        # caught up with everything reserved: idle until a local publish or a reservation
                        # elsewhere. Asking the sequence is a look-up in a small collection; reading the log is a
                        # scan of all of it in PostgreSQL (~45 ms at 100,000 documents), so an idle follower does
                        # not read the log.
                        hole_since, stalled = None, False
                        while not self._closed:
                            await _wait(wake, self._options.poll_interval)
                            if wake.is_set() or await self._sequences.allocated_end("topic") > last:
                                break
                        continue
                # ``last + 1`` is reserved but not in: another gateway's batch in flight, trimmed away while this
                # follower was behind, or left by a publisher that died. Wait for it while it may hold back what
                # is already in (``pending``), at most the settle window.
                now = time.monotonic()
                hole_since = hole_since or now
                if now - hole_since < REORDER_SETTLE_S:
                    await _wait(wake, self._options.poll_interval if stalled else HOLE_POLL_S)
                    continue
                oldest = await self._oldest_if_trimmed()
                if oldest is not None and oldest > last + 1:
                    yield Gap(expected=last + 1, oldest=oldest)
                    last = oldest - 1
                    pending = {p: d for p, d in pending.items() if p > last}
                    hole_since = None
                    continue
                for later in range(block + 1, end // BLOCK + 1) if not pending else ():
                    found = await self._coll.find_list({"block": later})
                    if found:
                        pending.update((int(d["position"]), d) for d in found if int(d["position"]) > last)
                        break
                if not pending:  # nothing written after it: it holds nothing back; look again less often
                    hole_since, stalled = now, True
                    continue
                # the read just made found nothing at ``last + 1`` either: never written
                log.info("topic log: positions %d..%d were never written; skipping", last + 1, min(pending) - 1)
                last = min(pending) - 1
                hole_since = None
            except ConnectionFailure as exc:
                log.warning("topic log: MongoDB unreachable (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                check_trimmed = True
            except OperationFailure as exc:
                log.warning("topic log: read failed (%s); retrying from position %d", exc, last)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except InvalidOperation:
                if self._closed:
                    return
                raise

    async def _oldest_if_trimmed(self) -> int | None:
        """The oldest retained position, or None while the seed is still there (nothing trimmed yet) or the log is
        empty. Natural order is insertion order, close to position order; the minimum of a few absorbs reordering."""
        if await self._coll.find_one({"_id": SEED_ID}, projection={"_id": 1}) is not None:
            return None
        # no sort on FerretDB: there only an unsorted, unfiltered find has its limit pushed down (a capped
        # collection is read in insertion order anyway); with ``$natural`` it decodes the whole log first
        natural = {} if self._ferretdb else {"sort": [("$natural", 1)]}
        docs = await self._coll.find_list({}, projection={"position": 1}, limit=EDGE_SAMPLE, **natural)
        positions = [int(d["position"]) for d in docs if d.get("position")]
        return min(positions) if positions else None

    async def last_position(self) -> int:
        with unavailable_on_disconnect("last_position"):
            if self._ferretdb:  # reading the newest end of the log decodes all of it there: ask the sequence
                return await self._sequences.allocated_end("topic")
            docs = await self._coll.find_list(
                {}, projection={"position": 1}, sort=[("$natural", -1)], limit=EDGE_SAMPLE
            )
        return max((int(d.get("position", 0)) for d in docs), default=0)

    async def trim(self) -> None:
        """Apply ``topic_retention`` now (FerretDB trims capped collections only in a background job)."""
        with unavailable_on_disconnect("trim"):
            count = await self._coll.count_documents({"seed": {"$ne": True}})
            excess = count - self._options.topic_retention
            if excess <= 0:
                return
            natural = {} if self._ferretdb else {"sort": [("$natural", 1)]}  # see _oldest_if_trimmed
            docs: list[dict[str, Any]] = await self._coll.find_list(
                {}, projection={"_id": 1}, limit=excess + 1, **natural
            )
            ids = [d["_id"] for d in docs if d["_id"] == SEED_ID] + [d["_id"] for d in docs if d["_id"] != SEED_ID][
                :excess
            ]
            await self._coll.delete_many({"_id": {"$in": ids}})

    # -- durable cursors ------------------------------------------------------------------------------------------
    async def save_cursor(self, name: str, position: int) -> None:
        with unavailable_on_disconnect("save_cursor"):
            try:
                await self._cursors.update_one({"_id": name}, {"$set": {"position": position}}, upsert=True)
            except DuplicateKeyError:  # FerretDB: two first-time upserts raced; the document exists now
                await self._cursors.update_one({"_id": name}, {"$set": {"position": position}})

    async def load_cursor(self, name: str) -> int | None:
        with unavailable_on_disconnect("load_cursor"):
            doc = await self._cursors.find_one({"_id": name})
        return None if doc is None else int(doc["position"])

    def close(self) -> None:
        self._closed = True
        self._signals.notify_all()
