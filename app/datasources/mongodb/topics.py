"""TailQueue on MongoDB: one capped collection ``<ns>.topics`` per gateway namespace, followed with a tailable cursor
(on FerretDB: by equality reads, see below).

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
~20 messages/s on a fresh log, and a range find over 100,000 documents takes 4.5 s. There, instead:

* a follower takes this gateway's own publishes from memory (the last ``RECENT`` documents or ``RECENT_BYTES`` of
  bodies, kept once stored), so one gateway never reads back what it wrote;
* what another gateway wrote is read with an equality filter, which FerretDB pushes down to PostgreSQL (a scan of
  the table there, ~1 ms on a small log and ~45 ms at 100,000 documents, instead of decoding every document in
  Go): each document carries the first and last position of its publish call (``batch``, ``batch_end``), so after
  the end of one batch the follower reads exactly the next one (``{batch: last + 1}``); where it does not know
  where batches start (when it begins, or after a hole) it reads ``{block: (last + 1) // BLOCK}``
  (``block = position // BLOCK``);
* it reads only when the next position is reserved and not at hand: at once after a local publish, every
  ``HOLE_POLL_S`` while positions reserved by another gateway (``SequenceAllocator.allocated_end``, a look-up in a
  small collection) are not all in, and every ``poll_interval`` when idle, which bounds how long another
  gateway's messages take to be seen.

The reorder and hole rules are the ones above; each read is a complete look at its batch or block, so "caught up"
holds at each one. The newest and oldest positions are found without a sorted read there too (the sequence's
reserved end; an unsorted ``find`` with a limit, which FerretDB serves in insertion order from the start).
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

from app.datasources import rules
from app.datasources.interface import (
    DatasourceError,
    DatasourceOptions,
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
    judge_duplicates,
    message_doc,
    stored_from_doc,
    unavailable_on_disconnect,
)
from app.datasources.failover import FailoverWriter
from app.datasources.mongodb._sequence import SequenceAllocator
from app.datasources.wakeups import Signals

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
RECENT = 8192  # FerretDB: this gateway's latest published documents, handed to its own followers without a read
RECENT_BYTES = 32 * 1024 * 1024  # ... and at most this many bytes of their bodies
FollowMode = Literal["cursor", "poll"]


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass


def topic_doc(message: NewMessage, position: int, batch: tuple[int, int]) -> Doc:
    """The stored form of a topic message. It carries the keys the "poll" follow mode reads the log by: ``block`` and
    the first and last position of the publish call that wrote it (``batch``, ``batch_end``). On every server, not
    only FerretDB: gateways of one log may follow it in different modes, and a test or an operator may choose
    "poll" on MongoDB (without these keys it found nothing there and stalled)."""
    doc = message_doc(message, seq_field="position", seq=position, flat_headers=False)
    doc["block"] = position // BLOCK
    doc["batch"], doc["batch_end"] = batch
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
        # "poll" mode: position -> document of this gateway's latest publishes (insertion order, at most RECENT), so
        # its own followers need not read back what it has just written
        self._recent: dict[int, Doc] = {}
        self._recent_last = 0
        self._recent_bytes = 0

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
        docs: list[Doc] = []
        self._publish_calls += 1
        call = self._publish_calls

        spurious: list[BulkWriteError] = []  # the tries refused for messages not stored

        async def write(retry: bool) -> int:
            nonlocal first, docs
            if first is None:
                first = await self._sequences.allocate("topic", len(msgs))
                self._recent_firsts.append((call, first))
            batch = (first, first + len(msgs) - 1)
            docs = [topic_doc(m, first + i, batch) for i, m in enumerate(msgs)]
            try:
                await self._coll.insert_many(docs, ordered=not retry)
            except BulkWriteError as exc:
                if not is_duplicate_only(exc):
                    raise
                whose = await judge_duplicates(self._coll, exc, "position", spurious)
                if whose == "ours":  # an earlier attempt of this call stored them: unordered, the rest went in too
                    return first if retry else await write(True)
                raise DatasourceError("publish: a message with the same message_id is already stored") from exc
            return first

        start = await self._writer.run(len(msgs), write)
        if self.follow_mode == "poll":  # stored now: local followers take these from memory
            recent = self._recent
            for i, doc in enumerate(docs):
                recent[start + i] = doc
                self._recent_bytes += len(doc["body"])
            self._recent_last = max(self._recent_last, start + len(docs) - 1)
            while len(recent) > RECENT or self._recent_bytes > RECENT_BYTES:
                self._recent_bytes -= len(recent.pop(next(iter(recent)))["body"])
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
                gap = rules.gap_before(await self._oldest_if_trimmed(), last)
                if gap is not None:
                    yield gap
                    last = gap.oldest - 1
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
        """FerretDB: yield this gateway's own publishes from memory and read the log one ``block`` at a time by
        equality for the rest (see module doc). Reads when a position is missing: at once after a local publish,
        every ``HOLE_POLL_S`` while positions another gateway reserved are not all in, every ``poll_interval``
        when idle."""
        pending: dict[int, Doc] = {}  # read from the log, not yet yielded (beyond a hole)
        hole_since: float | None = None  # when ``last + 1`` was first found missing with something to wait for
        stalled = False  # the settle window passed with nothing written after ``last + 1``: look less often
        backoff = 0.05
        check_trimmed = True
        recent = self._recent
        batch_start: int | None = None  # known first position of the next batch, when ``last`` ended one
        while not self._closed:
            try:
                if check_trimmed:
                    gap = rules.gap_before(await self._oldest_if_trimmed(), last)
                    if gap is not None:
                        yield gap
                        last = gap.oldest - 1
                        pending = {p: d for p, d in pending.items() if p > last}
                    check_trimmed = False
                wake = self._signals.event(SIGNAL)  # taken before any read: a publish meanwhile still wakes us
                read = False
                before = last
                while True:
                    while (doc := pending.pop(last + 1, None) or recent.get(last + 1)) is not None:
                        last += 1
                        # after a batch's last document the next position starts a batch: read just that one
                        batch_start = last + 1 if doc.get("batch_end") == last else None
                        yield Published(position=last, message=stored_from_doc(doc, seq_field="position"))
                        hole_since, stalled = None, False
                    if read:
                        break
                    end = last
                    if not pending and self._recent_last <= last:
                        end = await self._sequences.allocated_end("topic")
                        if end <= last:
                            break  # caught up with everything reserved
                    # ``last + 1`` is reserved and not at hand: read the batch it starts (another gateway's publish:
                    # exactly the documents missing) or, not knowing where batches start, its block
                    read = True
                    key = {"batch": batch_start} if batch_start == last + 1 else {"block": (last + 1) // BLOCK}
                    for doc in await self._coll.find_list(key):
                        position = int(doc["position"])
                        if position > last:
                            pending[position] = doc
                backoff = 0.05
                if not read:
                    # Idle until a local publish or a reservation elsewhere. Asking the sequence is a look-up in a
                    # small collection; reading the log is a scan of all of it in PostgreSQL (~45 ms at 100,000
                    # documents), so an idle follower does not read the log.
                    hole_since, stalled = None, False
                    while not self._closed:
                        await _wait(wake, self._options.poll_interval)
                        if wake.is_set() or await self._sequences.allocated_end("topic") > last:
                            break
                    continue
                if last > before:
                    continue  # progress: look again at once (the next block, or what came in meanwhile)
                # ``last + 1`` is reserved but not in: another gateway's batch in flight, trimmed away while this
                # follower was behind, or left by a publisher that died. Wait for it while it may hold back what
                # is already in (``pending``, or this gateway's own later publishes), at most the settle window.
                now = time.monotonic()
                hole_since = hole_since or now
                if now - hole_since < REORDER_SETTLE_S:
                    await _wait(wake, self._options.poll_interval if stalled else HOLE_POLL_S)
                    continue
                gap = rules.gap_before(await self._oldest_if_trimmed(), last)
                if gap is not None:
                    yield gap
                    last = gap.oldest - 1
                    pending = {p: d for p, d in pending.items() if p > last}
                    hole_since = None
                    continue
                ahead = [p for p in (*pending, *recent) if p > last]
                if not ahead:
                    end = await self._sequences.allocated_end("topic")
                    for block in range((last + 1) // BLOCK + 1, end // BLOCK + 1):
                        found = [d for d in await self._coll.find_list({"block": block}) if int(d["position"]) > last]
                        if found:
                            pending.update((int(d["position"]), d) for d in found)
                            ahead = list(pending)
                            break
                if not ahead:  # nothing written after it: it holds nothing back; look again less often
                    hole_since, stalled = now, True
                    continue
                # the read just made found nothing at ``last + 1`` either: never written
                log.info("topic log: positions %d..%d were never written; skipping", last + 1, min(ahead) - 1)
                last = min(ahead) - 1
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

    async def delete_cursor(self, name: str) -> None:
        with unavailable_on_disconnect("delete_cursor"):
            await self._cursors.delete_one({"_id": name})

    def close(self) -> None:
        self._closed = True
        self._signals.notify_all()
