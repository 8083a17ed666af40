"""``stompgate bench --baseline mongodb://...``: a bare PyMongo loop doing the datastore operations the gateway's
MongoDB backend does for the same workload, with no STOMP and no gateway in between: the database's own ceiling.

It mirrors ``app/datasources/mongodb`` (read it next to this file) with the bench's concurrency: ``--producers``
tasks inserting ``--baseline-batch`` messages per ``insert_many`` (default 64, the bench's SEND chunk) in the
backend's document shape, each batch after a sequence range, and ``--consumers`` tasks claiming and deleting
(queues) or reading a tailable awaitData cursor (topics). All tasks run in this one process on one event loop,
like one gateway.

Variants (``--baseline-variant``, repeatable; default: every variant that applies to the server and kind):

* ``queue-claim`` - what ``MongoPollQueue`` does, operation for operation. MongoDB: ``find_one_and_update`` per
  message (sorted ``priority desc, seq``). FerretDB: the backend's safe path (see ``queues``' module doc): one
  shared *window* per destination (``queues._Window``: a sorted ``find`` of the next ready messages, as many as
  ``queues._window_size`` says, read again when it runs out or is no longer usable by the backend's own rules -
  age, generation) whose head each claimer pops (``_Window.take``, skipping stale copies of messages this process
  claimed or acked, ``queues._Held``); per claim call (up to ``MAX_CLAIM_ROUNDS`` rounds) one unordered
  ``insert_many`` of claim tokens into ``<ns>.claims`` through the backend's own ``queues.ClaimTokens`` (a lost
  token is looked up by ``_id`` if it comes round again) and one unordered ``bulk_write`` of
  ``UpdateOne({_id, claims: <version read>}, {$set: lease})`` for the tokens won. A producer's ``insert_many``
  merges its documents into the window (``_Window.merge``, the backend's ``_merge_into_windows``) instead of
  invalidating it. Sequence ranges come
  from the backend's ``SequenceAllocator`` itself (one ``$inc`` on MongoDB; a reservation walk on FerretDB).
  The collections go through the backend's ``_common.Collection`` (busy retry; on FerretDB the client's write
  gate and its ``FERRETDB_BULK`` statements per command), so the commands sent are the backend's. Exactly once.
* ``queue-fam-unsafe`` (FerretDB only) - the plain MongoDB claim loop (``find_one_and_update`` per message) run on
  FerretDB as a reference. **Not exactly-once on FerretDB** (its findAndModify is read-then-update), so it may
  report DUPLICATED > 0; that is the point of the safe path.
* ``topic-blocks`` (FerretDB) - what ``MongoTailQueue`` does there (``follow_mode`` "poll", see ``topics``' module
  doc): producer *i* publishes as gateway *i* mod ``--gateways``, one publish at a time per gateway (the gateway's
  topic ``Batcher`` writes one batch at a time): a sequence range, then ``insert_many`` of ``topics.topic_doc``
  documents (with their ``block`` and ``batch`` keys); each gateway's follower takes its own gateway's documents
  from memory once stored, and reads another gateway's by ``{batch: last + 1}`` (or ``{block: ...}`` when it does
  not know where the next batch starts), looks at the reserved end (``SequenceAllocator.allocated_end``) when it
  has nothing more at hand, and waits ``HOLE_POLL_S`` / ``poll_interval`` like the backend; every document fanned
  out to the gateway's subscribers (``--consumers`` spread round-robin over the gateways). No hole skipping: this
  workload leaves no holes, and a stall would show as LOST.
* ``topic-shared-cursor`` - what the gateway does on MongoDB: one tailable awaitData cursor (``batch_size`` 1 on FerretDB, 100
  on MongoDB; ``maxAwaitTimeMS`` 500) per gateway, every document fanned out in process to all ``--consumers``
  subscribers (each delivery counted per subscriber). ``--gateways N`` runs N such cursors, subscribers spread
  round-robin, as N gateways would.
* ``topic-cursor-per-subscriber`` - one tailable cursor per subscriber (``--consumers`` cursors).

Acks in both queue variants: ``MongoPollQueue.ack`` - one ``bulk_write`` of ``DeleteOne({_id})`` (FerretDB) or one
``delete_many({_id: {$in}})`` (MongoDB) per batch, through the gateway's own ACK coalescing (``Batcher``: the ids
acked while the previous batch was being written go in the next one, one batch at a time). Each consumer claims
up to ``--prefetch`` (default 100, the gateway's) per call and acks all it claimed at once, like a client that
acks every delivery, so its credit is free again right away: a subscription gets its credit back when the ACK
frame arrives, not when the delete is done.

Every variant uses fresh collections ``bench-<random>.*`` in the URL's database (default ``stompgate``) and drops
them afterwards. The report is the workload's (``workload.summarize``): msgs/s from the first insert to the last
delivery, latency from just before the insert to the claim/read, lost and duplicated by (producer, seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

from pymongo import AsyncMongoClient, CursorType, DeleteOne, ReturnDocument, UpdateOne
from pymongo.errors import CollectionInvalid, OperationFailure

from app.bench.workload import SEND_BATCH, TS_HEADER, BenchConfig, summarize
from app.broker.batching import Batcher
from app.datasources.interface import DatasourceOptions, NewMessage
from app.datasources.mongodb._common import (
    Collection,
    is_busy,
    limit_writes,
    message_doc,
)
from app.datasources.mongodb._sequence import SequenceAllocator
from app.datasources.mongodb.queues import (
    MAX_CLAIM_ROUNDS,
    SORT,
    ClaimTokens,
    _Held,
    _Window,
    _window_size,
)
from app.datasources.mongodb.topics import BLOCK, HOLE_POLL_S, topic_doc

__all__ = ["VARIANTS", "default_variants", "run_baseline"]

VARIANTS = ("queue-claim", "queue-fam-unsafe", "topic-blocks", "topic-shared-cursor", "topic-cursor-per-subscriber")
CLAIM_BATCH = 256  # BrokerConfig.claim_batch
DEFAULT_PREFETCH = 100  # BrokerConfig.default_prefetch
LEASE_MS = 60_000  # BrokerConfig.lease_ms
AWAIT_MS = 500  # topics.AWAIT_MS
SEED_ID = "__stompgate_seed__"

T = TypeVar("T")


async def _busy(call: Callable[[], Awaitable[T]]) -> T:
    """FerretDB's SQLite handler answers "database is locked" instead of waiting; retry like the backend does."""
    for attempt in range(100):
        try:
            return await call()
        except OperationFailure as exc:
            if not is_busy(exc) or attempt == 99:
                raise
        await asyncio.sleep(0.005 * min(attempt + 1, 10))
    raise AssertionError("unreachable")


def default_variants(kind: str, ferretdb: bool) -> list[str]:
    if kind == "queue":
        return ["queue-claim", "queue-fam-unsafe"] if ferretdb else ["queue-claim"]
    return ["topic-blocks"] if ferretdb else ["topic-shared-cursor", "topic-cursor-per-subscriber"]


class _Run:
    """One variant: the collections, the shared state and the per-producer / per-consumer records."""

    def __init__(self, cfg: BenchConfig, db: Any, ferretdb: bool, variant: str, gateways: int, batch: int) -> None:
        self.cfg = cfg
        self.db = db
        self.ferretdb = ferretdb
        self.variant = variant
        self.gateways = max(1, gateways)
        self.batch = batch
        self.ns = f"bench-{uuid.uuid4().hex[:10]}"
        self.queue = db[f"{self.ns}.queue"]
        self.claims = db[f"{self.ns}.claims"]
        self.counters = db[f"{self.ns}.counters"]
        self.topics = db[f"{self.ns}.topics"]
        # the backend's wrappers: busy retry, and on FerretDB the client's write gate and bulk chunking
        self.q = Collection(self.queue)
        self.c = Collection(self.claims)
        self.sequences = SequenceAllocator(Collection(self.counters), ferretdb=ferretdb)
        self.put_event = asyncio.Event()
        # MongoPollQueue's window state for the one destination (its ``_windows``/``_generation``/``_window_reads``);
        # the generation moves on a release or purge only, which this workload never does
        self.window: _Window | None = None
        self.generation = 0
        self.window_reading: asyncio.Future[None] | None = None
        self.held = _Held()
        self.tokens = ClaimTokens(self.c)
        # the gateway's ACK path (``Broker._acker``): ACKs coalesce while the previous batch is written, one
        # ``ack`` call at a time
        self.acker: Batcher[Any] = Batcher(self.ack)
        # topic-blocks: per simulated gateway, its publish lock, its own stored documents by position and a wake-up
        self.t = Collection(self.topics)
        self.publish_locks = [asyncio.Lock() for _ in range(self.gateways)]
        self.recent: list[dict[int, dict[str, Any]]] = [{} for _ in range(self.gateways)]
        self.recent_last = [0] * self.gateways
        self.published = [asyncio.Event() for _ in range(self.gateways)]
        self.producers_done = 0
        self.stop = asyncio.Event()
        self.message_counter = 0
        self.gateway_id = uuid.uuid4().hex[:12]
        self.producer_results: list[dict[str, Any]] = []
        self.consumer_state: list[dict[str, Any]] = []
        self.errors: list[str] = []

    # -- set-up / tear-down ------------------------------------------------------------------------------------
    async def setup(self) -> None:
        if self.variant.startswith("queue"):
            await _busy(lambda: self.queue.create_index(
                [("destination", 1), ("state", 1), ("priority", -1), ("seq", 1)], name="claim_order"))  # fmt: skip
            await _busy(lambda: self.queue.create_index([("owner", 1)], name="owner"))
            if self.ferretdb:
                await _busy(lambda: self.claims.create_index([("at", 1)], name="age"))
        else:
            options = DatasourceOptions()
            with contextlib.suppress(CollectionInvalid):
                await self.db.create_collection(
                    self.topics.name, capped=True, size=max(options.topic_retention_bytes, 4096),
                    max=options.topic_retention,
                )  # fmt: skip
            await _busy(lambda: self.topics.insert_one({"_id": SEED_ID, "position": 0, "seed": True}))

    async def drop(self) -> None:
        for coll in (self.queue, self.claims, self.counters, self.topics):
            with contextlib.suppress(Exception):
                await coll.drop()

    # -- producers ---------------------------------------------------------------------------------------------
    async def produce(self, pid: int, count: int) -> None:
        cfg = self.cfg
        size = cfg.body_size
        queue_kind = self.variant.startswith("queue")
        seq = 0
        first_send = time.time_ns()
        error = None
        try:
            while seq < count:
                n = min(self.batch, count - seq)
                now_ns = time.time_ns()
                now_ms = now_ns // 1_000_000
                msgs = []
                for i in range(n):
                    self.message_counter += 1
                    msgs.append(NewMessage(
                        message_id=f"{self.gateway_id}-{self.message_counter}", destination=cfg.destination,
                        headers={TS_HEADER: str(now_ns)}, body=f"{pid}:{seq + i}:".encode().ljust(size, b"x"),
                        priority=4, expires_at=None, published_at=now_ms,
                    ))  # fmt: skip
                if self.variant != "topic-blocks":
                    first = await self.sequences.allocate("queue" if queue_kind else "topic", n)
                if queue_kind:
                    docs = []
                    for i, m in enumerate(msgs):
                        doc = message_doc(m, seq_field="seq", seq=first + i, flat_headers=self.ferretdb)
                        doc.update(state="ready", lease_until=0, owner=None, deliveries=0, claims=0,
                                   original_destination=None)  # fmt: skip
                        docs.append(doc)
                elif self.variant == "topic-blocks":
                    async with self.publish_locks[pid % self.gateways]:  # one publish at a time per gateway
                        first = await self.sequences.allocate("topic", n)
                        span = (first, first + n - 1)
                        docs = [topic_doc(m, first + i, span, ferretdb=True) for i, m in enumerate(msgs)]
                        await self.t.insert_many(docs, ordered=True)
                    gateway = pid % self.gateways
                    self.recent[gateway].update((first + i, d) for i, d in enumerate(docs))
                    self.recent_last[gateway] = max(self.recent_last[gateway], first + n - 1)
                    self.published[gateway].set()
                    seq += n
                    continue
                else:
                    docs = [message_doc(m, seq_field="position", seq=first + i, flat_headers=False)
                            for i, m in enumerate(msgs)]  # fmt: skip
                if queue_kind:
                    await self.q.insert_many(docs, ordered=True)
                    # the backend merges its own new messages into the window and wakes local claimers
                    if self.ferretdb and self.window is not None:
                        self.window.merge(docs)
                    self.put_event.set()
                else:
                    await _busy(partial(self.topics.insert_many, docs, ordered=True))
                seq += n
        except Exception as exc:  # noqa: BLE001 - reported
            error = f"{type(exc).__name__}: {exc}"
        last = time.time_ns()
        self.producer_results.append({
            "id": pid, "sent": seq, "receipted": seq, "missing_receipts": [], "first_send": first_send,
            "last_send": last, "last_receipt": last, "error": error,
        })  # fmt: skip
        self.producers_done += 1

    # -- consumer bookkeeping ----------------------------------------------------------------------------------
    def new_consumer(self, cid: int) -> dict[str, Any]:
        state = {"id": cid, "seen": set(), "duplicates": 0, "frames": 0, "latencies": array("d"),
                 "first_delivery": 0, "last_delivery": 0, "error": None}  # fmt: skip
        self.consumer_state.append(state)
        return state

    @staticmethod
    def record(state: dict[str, Any], docs: list[dict[str, Any]]) -> None:
        now = time.time_ns()
        seen = state["seen"]
        lat = state["latencies"]
        for doc in docs:
            body = bytes(doc["body"])
            i = body.find(b":")
            j = body.find(b":", i + 1)
            key = (int(body[:i]) << 32) | int(body[i + 1 : j])
            if key in seen:
                state["duplicates"] += 1
            else:
                seen.add(key)
            for h in doc.get("headers") or ():
                if h.get("k") == TS_HEADER:
                    lat.append((now - int(h["v"])) / 1e6)
                    break
        state["frames"] += len(docs)
        if docs:
            state["first_delivery"] = state["first_delivery"] or now
            state["last_delivery"] = now

    def delivered(self) -> int:
        return sum(len(s["seen"]) for s in self.consumer_state)

    # -- queue consumers ---------------------------------------------------------------------------------------
    def ready_query(self, now_ms: int) -> dict[str, Any]:
        return {"destination": self.cfg.destination, "expires_at": {"$gt": now_ms},
                "$or": [{"state": "ready"}, {"state": "leased", "lease_until": {"$lte": now_ms}}]}  # fmt: skip

    async def window_for(self, query: dict[str, Any], want: int, now_ms: int) -> _Window:
        """``MongoPollQueue._window``: the usable window, or one shared sorted read of the next ready messages."""
        window = self.window
        if window is not None and window.docs and window.usable(now_ms, self.generation):
            return window
        if self.window_reading is not None:  # another claimer is reading it: share that read
            await asyncio.shield(self.window_reading)
            window = self.window
            if window is not None and window.docs and window.usable(now_ms, self.generation):
                return window
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.window_reading = done
        try:
            generation = self.generation
            size = _window_size(self.window, want)
            started = time.monotonic()
            docs = await self.q.find_list(query, sort=SORT, limit=size)
            window = _Window(docs, now_ms, generation, len(docs) < size, time.monotonic() - started)
            if self.generation == generation:
                self.window = window
            return window
        finally:
            if self.window_reading is done:
                self.window_reading = None
            done.set_result(None)

    async def claim_window(self, limit: int, owner: str) -> list[dict[str, Any]]:
        """``MongoPollQueue._claim_window`` (FerretDB, no selector), called like the broker does: one ``now_ms``."""
        now_ms = int(time.time() * 1000)
        lease_until = now_ms + LEASE_MS
        query = self.ready_query(now_ms)
        out: list[dict[str, Any]] = []
        for _round in range(MAX_CLAIM_ROUNDS):
            want = limit - len(out)
            window = await self.window_for(query, want, now_ms)
            candidates = window.take(want, now_ms, self.held)
            leased = await self.claim_batch(candidates, owner, lease_until, now_ms)
            self.held.settle(candidates, leased)
            out += leased
            if len(out) >= limit or (not window.docs and window.complete):
                break
        return out

    async def claim_batch(
        self, candidates: list[dict[str, Any]], owner: str, lease_until: int, now_ms: int
    ) -> list[dict[str, Any]]:
        """``MongoPollQueue._claim_batch_ferretdb``: tokens, then one ``bulk_write`` of ``UpdateOne({_id, claims})``."""
        if not candidates:
            return []
        won = await self.tokens.take(
            [(f"q|{d['_id']}", str(d["_id"]), int(d.get("claims", 0))) for d in candidates], lease_until, now_ms
        )
        if not won:
            return []
        leased = [d for d in candidates if str(d["_id"]) in won]
        changes = {
            str(d["_id"]): {"state": "leased", "lease_until": lease_until, "owner": owner,
                            "claims": won[str(d["_id"])], "deliveries": int(d.get("deliveries", 0)) + 1}
            for d in leased
        }  # fmt: skip
        matched = await self.q.bulk_write(
            [UpdateOne({"_id": d["_id"], "claims": int(d.get("claims", 0))}, {"$set": changes[str(d["_id"])]})
             for d in leased]
        )  # fmt: skip
        out = [{**d, **changes[str(d["_id"])]} for d in leased]
        if matched == len(leased):
            return out
        still = [await self.q.find_one({"_id": d["_id"], "claims": d["claims"], "owner": owner}) for d in out]
        return [d for d, stored in zip(out, still, strict=True) if stored is not None]

    async def claim_fam(self, limit: int, owner: str, state: dict[str, Any]) -> list[dict[str, Any]]:
        """``MongoPollQueue._claim_mongodb``: one find_one_and_update per message (each recorded as it arrives:
        a claim of 100 takes seconds on FerretDB, longer than the drain timeout's idea of "no progress")."""
        now_ms = int(time.time() * 1000)
        query = self.ready_query(now_ms)
        update = {"$set": {"state": "leased", "lease_until": now_ms + LEASE_MS, "owner": owner},
                  "$inc": {"deliveries": 1, "claims": 1}}  # fmt: skip
        out = []
        for _ in range(limit):
            doc = await _busy(lambda: self.queue.find_one_and_update(
                query, update, sort=SORT, return_document=ReturnDocument.AFTER))  # fmt: skip
            if doc is None:
                break
            self.record(state, [doc])
            out.append(doc)
        return out

    async def ack(self, ids: list[Any]) -> None:
        """``MongoPollQueue.ack``: on FerretDB one ``bulk_write`` of ``DeleteOne({_id})`` (no ``$in``: a full decode
        there), else one ``delete_many({_id: {$in}})``."""
        if self.ferretdb:
            self.held.retire(ids)
            await self.q.bulk_write([DeleteOne({"_id": i}) for i in dict.fromkeys(ids)])
        else:
            await self.q.delete_many({"_id": {"$in": ids}})

    async def consume_queue(self, cid: int, prefetch: int, safe: bool) -> None:
        state = self.new_consumer(cid)
        owner = self.gateway_id

        def ack_failed(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and (exc := future.exception()) is not None:
                state["error"] = state["error"] or f"ack: {type(exc).__name__}: {exc}"

        try:
            while not self.stop.is_set():
                # every claimed message is acked at once (the client of a subscription acks each delivery), so the
                # whole credit is free again: the gateway gives it back when the ACK arrives, not after the delete
                limit = min(prefetch, CLAIM_BATCH)
                if safe and self.ferretdb:
                    docs = await self.claim_window(limit, owner)
                    self.record(state, docs)
                else:
                    docs = await self.claim_fam(limit, owner, state)
                if not docs:
                    self.put_event.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DatasourceOptions().poll_interval):
                            await self.put_event.wait()
                    continue
                self.acker.submit([d["_id"] for d in docs]).add_done_callback(ack_failed)
        except Exception as exc:  # noqa: BLE001 - reported
            state["error"] = f"{type(exc).__name__}: {exc}"

    # -- topic followers ---------------------------------------------------------------------------------------
    async def follow(self, states: list[dict[str, Any]]) -> None:
        """``MongoTailQueue.follow`` (without the reorder buffer: the bench counts by key) fanned out to ``states``."""
        last = 0
        seen: set[int] = set()  # the backend drops positions it yielded (its reorder buffer); re-opens repeat ``last``
        batch = 1 if self.ferretdb else 100
        try:
            while not self.stop.is_set():
                cursor = self.topics.find(
                    {"position": {"$gte": last}}, cursor_type=CursorType.TAILABLE_AWAIT, batch_size=batch
                ).max_await_time_ms(AWAIT_MS)
                got = False
                try:
                    while not self.stop.is_set():
                        try:
                            doc = await cursor.next()
                        except StopAsyncIteration:
                            if not cursor.alive:
                                break
                            continue
                        if doc.get("seed"):
                            continue
                        position = int(doc["position"])
                        if position in seen:
                            continue
                        seen.add(position)
                        last = max(last, position)
                        got = True
                        for state in states:
                            self.record(state, [doc])
                finally:
                    await cursor.close()
                if not got and not self.stop.is_set():
                    await asyncio.sleep(min(DatasourceOptions().poll_interval, 0.5))
        except Exception as exc:  # noqa: BLE001 - reported
            for state in states:
                state["error"] = state["error"] or f"{type(exc).__name__}: {exc}"

    async def follow_blocks(self, gateway: int, states: list[dict[str, Any]]) -> None:
        """``MongoTailQueue._follow_blocks`` for one gateway (no holes to skip here), fanned out to ``states``."""
        last = 0
        pending: dict[int, dict[str, Any]] = {}
        recent = self.recent[gateway]
        wake = self.published[gateway]
        batch_start: int | None = None
        idle_s = DatasourceOptions().poll_interval
        try:
            while not self.stop.is_set():
                wake.clear()
                before = last
                read = False
                while True:
                    while (doc := pending.pop(last + 1, None) or recent.pop(last + 1, None)) is not None:
                        last += 1
                        batch_start = last + 1 if doc.get("batch_end") == last else None
                        for state in states:
                            self.record(state, [doc])
                    if read:
                        break
                    if (
                        not pending
                        and self.recent_last[gateway] <= last
                        and await self.sequences.allocated_end("topic") <= last
                    ):
                        break
                    read = True
                    key = {"batch": batch_start} if batch_start == last + 1 else {"block": (last + 1) // BLOCK}
                    for doc in await self.t.find_list(key):
                        if int(doc["position"]) > last:
                            pending[int(doc["position"])] = doc
                if last > before:
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HOLE_POLL_S if read else idle_s):
                        await wake.wait()
        except Exception as exc:  # noqa: BLE001 - reported
            for state in states:
                state["error"] = state["error"] or f"{type(exc).__name__}: {exc}"

    # -- the run -----------------------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        await self.setup()
        try:
            consumers: list[Awaitable[None]] = []
            if self.variant.startswith("queue"):
                prefetch = cfg.prefetch or DEFAULT_PREFETCH
                consumers = [self.consume_queue(cid, prefetch, self.variant == "queue-claim")
                             for cid in range(cfg.consumers)]  # fmt: skip
            elif self.variant == "topic-blocks":
                states = [self.new_consumer(cid) for cid in range(cfg.consumers)]
                consumers = [self.follow_blocks(g, states[g :: self.gateways]) for g in range(self.gateways)
                             if states[g :: self.gateways]]  # fmt: skip
            elif self.variant == "topic-shared-cursor":
                states = [self.new_consumer(cid) for cid in range(cfg.consumers)]
                groups = [states[g :: self.gateways] for g in range(self.gateways)]
                consumers = [self.follow(group) for group in groups if group]
            else:
                consumers = [self.follow([self.new_consumer(cid)]) for cid in range(cfg.consumers)]
            consumer_tasks = [asyncio.ensure_future(c) for c in consumers]
            if not self.variant.startswith("queue"):
                await asyncio.sleep(0.2)  # cursors open before the first insert (subscribe-then-publish)
            producer_tasks = [asyncio.ensure_future(self.produce(pid, cfg.messages_for(pid) or 0))
                              for pid in range(cfg.producers)]  # fmt: skip
            await asyncio.gather(*producer_tasks)
            sent = sum(p["sent"] for p in self.producer_results)
            expected = sent * (cfg.consumers if cfg.kind == "topic" else 1) if cfg.consumers else 0
            last, last_change, timed_out = -1, time.monotonic(), False
            while self.delivered() < expected:
                if any(t.done() for t in consumer_tasks) and all(t.done() for t in consumer_tasks):
                    break
                delivered = self.delivered()
                if delivered != last:
                    last, last_change = delivered, time.monotonic()
                elif time.monotonic() - last_change > cfg.drain_timeout:
                    timed_out = True
                    break
                await asyncio.sleep(0.005)
            self.stop.set()
            self.put_event.set()
            try:
                async with asyncio.timeout(AWAIT_MS / 1000 + 10):
                    await asyncio.gather(*consumer_tasks, return_exceptions=True)
            except TimeoutError:
                for t in consumer_tasks:
                    t.cancel()
            with contextlib.suppress(Exception):  # the deletes still queued (their failures are in the consumers)
                async with asyncio.timeout(30):
                    await self.acker.close()
        finally:
            await self.drop()
        raw = {
            "producers": self.producer_results,
            "consumers": [
                {
                    "id": s["id"], "keys": array("Q", s["seen"]).tobytes(), "duplicates": s["duplicates"],
                    "frames": s["frames"], "latencies": s["latencies"].tobytes(),
                    "first_delivery": s["first_delivery"], "last_delivery": s["last_delivery"], "error": s["error"],
                }  # fmt: skip
                for s in self.consumer_state
            ],
            "errors": self.errors,
            "timings": {"drain_timed_out": 1.0} if timed_out else {},
        }
        summary = summarize(cfg, [raw])
        summary["drain_timed_out"] = timed_out
        return summary


async def run_baseline(
    url: str, cfg: BenchConfig, *, variants: list[str] | None, gateways: int = 1, batch: int = SEND_BATCH
) -> dict[str, Any]:
    """Run each variant against ``url``; returns ``{"mode": "baseline", "server", "runs": [summary, ...], "ok"}``."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, appname="stompgate-bench-baseline", retryWrites=True)
    try:
        info = await client.admin.command("buildInfo")
        ferret = info.get("ferretdbVersion")
        server = {"version": str(info.get("version", "")), "ferretdb_version": str(ferret) if ferret else None}
        db = client.get_default_database("stompgate")
        if ferret is not None:  # the backend's FerretDB write gate (``_common.limit_writes``), used by ``Collection``
            limit_writes(client)
        chosen = variants or default_variants(cfg.kind, ferret is not None)
        runs = []
        for variant in chosen:
            kind = "queue" if variant.startswith("queue") else "topic"
            vcfg = replace(cfg, kind=kind, destination=f"/{kind}/bench-{uuid.uuid4().hex[:12]}")
            started = time.process_time()
            summary = await _Run(vcfg, db, ferret is not None, variant, gateways, batch).run()
            summary["bench_cpu_s"] = round(time.process_time() - started, 2)
            summary["variant"] = variant
            summary["exactly_once"] = not (variant == "queue-fam-unsafe" and ferret is not None)
            summary["insert_batch"] = batch
            summary["cursors"] = (
                gateways if variant in ("topic-shared-cursor", "topic-blocks")
                else cfg.consumers if kind == "topic" else None
            )
            if not summary["exactly_once"]:  # a reference run: duplicates are expected, not a failure
                summary["ok"] = summary["lost"] == 0 and not summary["errors"]
            runs.append(summary)
    finally:
        await client.close()
    return {"mode": "baseline", "url": url, "server": server, "runs": runs, "ok": all(r["ok"] for r in runs)}

