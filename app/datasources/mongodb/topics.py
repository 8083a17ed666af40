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

FerretDB: the first ``find`` closes the cursor when its first batch is shorter than ``batchSize``, so there the
cursor uses ``batch_size=1`` (one getMore per message); on MongoDB it uses batches of 100. Capped ``size``/``max``
are trimmed by FerretDB's background job (every minute by default), so they are soft limits there; ``trim()``
applies ``max`` on demand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

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

__all__ = ["MongoTailQueue", "SEED_ID", "REORDER_SETTLE_S"]

log = logging.getLogger(__name__)

SEED_ID = "__stompgate_seed__"
REORDER_SETTLE_S = 1.0  # how long a missing position may hold back later ones before it is skipped as never written
AWAIT_MS = 500  # getMore maxTimeMS: how long one awaitData round trip blocks when nothing new arrives
EDGE_SAMPLE = 16  # documents read at each end (natural order) to find the oldest / newest position
MAX_BACKOFF_S = 2.0


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
            docs = [message_doc(m, seq_field="position", seq=first + i, flat_headers=False) for i, m in enumerate(msgs)]
            try:
                await self._coll.insert_many(docs, ordered=not retry)
            except BulkWriteError as exc:
                if not (retry and is_duplicate_only(exc)):
                    if is_duplicate_only(exc):
                        raise DatasourceError("publish: a message with the same message_id is already stored") from exc
                    raise
            return first

        start = await self._writer.run(len(msgs), write)
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
                        # direct look-up finds no document in it. The settle time alone is not enough: on FerretDB
                        # the cursor reads one document per round trip, so another gateway's earlier positions,
                        # inserted later in natural order, can take longer than the window to come round.
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

    async def _oldest_if_trimmed(self) -> int | None:
        """The oldest retained position, or None while the seed is still there (nothing trimmed yet) or the log is
        empty. Natural order is insertion order, close to position order; the minimum of a few absorbs reordering."""
        if await self._coll.find_one({"_id": SEED_ID}, projection={"_id": 1}) is not None:
            return None
        docs = await self._coll.find_list({}, projection={"position": 1}, sort=[("$natural", 1)], limit=EDGE_SAMPLE)
        positions = [int(d["position"]) for d in docs if d.get("position")]
        return min(positions) if positions else None

    async def last_position(self) -> int:
        with unavailable_on_disconnect("last_position"):
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
            docs: list[dict[str, Any]] = await self._coll.find_list(
                {}, projection={"_id": 1}, sort=[("$natural", 1)], limit=excess + 1
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
