"""``stompgate bench --baseline mongodb://...``: a bare PyMongo loop doing the datastore operations the gateway's
MongoDB backend does for the same workload, with no STOMP and no gateway in between: the database's own ceiling.

It mirrors ``app/datasources/mongodb`` (read it next to this file) with the bench's concurrency: ``--producers``
tasks inserting ``--baseline-batch`` messages per ``insert_many`` (default 64, the bench's SEND chunk) in the
backend's document shape, each batch after a sequence range, and ``--consumers`` tasks claiming and deleting
(queues) or reading a tailable awaitData cursor (topics). All tasks run in this one process on one event loop,
like one gateway.

Variants (``--baseline-variant``, repeatable; default: every variant that applies to the server and kind):

* ``queue-claim`` - what the backend does. MongoDB: ``find_one_and_update`` per message (sorted ``priority desc,
  seq``), sequence ranges by one ``$inc``. FerretDB: the backend's safe path: one shared *window* per destination
  (a sorted ``find`` of the next 256 ready messages, re-read when empty, after a local insert or after 250 ms) whose
  head each claimer pops; one unordered ``insert_many`` of claim tokens into ``<ns>.claims`` per claim call; one
  ``update_one({_id, claims})`` per won message (up to 32 concurrently); sequence ranges by reservation (``find_one``
  hint + ``insert_one`` reservation + ``update_one $max``). Exactly once.
* ``queue-fam-unsafe`` (FerretDB only) - the plain MongoDB claim loop (``find_one_and_update`` per message) run on
  FerretDB as a reference. **Not exactly-once on FerretDB** (its findAndModify is read-then-update), so it may
  report DUPLICATED > 0; that is the point of the safe path.
* ``topic-shared-cursor`` - what the gateway does: one tailable awaitData cursor (``batch_size`` 1 on FerretDB, 100
  on MongoDB; ``maxAwaitTimeMS`` 500) per gateway, every document fanned out in process to all ``--consumers``
  subscribers (each delivery counted per subscriber). ``--gateways N`` runs N such cursors, subscribers spread
  round-robin, as N gateways would.
* ``topic-cursor-per-subscriber`` - one tailable cursor per subscriber (``--consumers`` cursors).

Acks in both queue variants: one ``delete_one({_id})`` per message (FerretDB, up to 32 concurrently, the backend's
path) or one ``delete_many({_id: {$in}})`` per claimed batch (MongoDB), done in the background while the
consumer claims again, with at most ``--prefetch`` (default 100, the gateway's) claimed and not yet deleted per
consumer, like a subscription's credit.

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
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

from pymongo import AsyncMongoClient, CursorType, ReturnDocument
from pymongo.errors import BulkWriteError, CollectionInvalid, DuplicateKeyError, OperationFailure

from app.bench.workload import SEND_BATCH, TS_HEADER, BenchConfig, summarize
from app.datasources.interface import DatasourceOptions, NewMessage
from app.datasources.mongodb._common import is_busy, message_doc

__all__ = ["VARIANTS", "default_variants", "run_baseline"]

VARIANTS = ("queue-claim", "queue-fam-unsafe", "topic-shared-cursor", "topic-cursor-per-subscriber")
SORT = [("priority", -1), ("seq", 1)]
WINDOW = 256  # queues.WINDOW
WINDOW_S = 0.25  # queues.WINDOW_S
PARALLEL_WRITES = 32  # queues.PARALLEL_WRITES
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


async def _limited(calls: list[Callable[[], Awaitable[T]]], limit: int = PARALLEL_WRITES) -> list[T]:
    out: list[T] = []
    for i in range(0, len(calls), limit):
        out += await asyncio.gather(*(c() for c in calls[i : i + limit]))
    return out


def default_variants(kind: str, ferretdb: bool) -> list[str]:
    if kind == "queue":
        return ["queue-claim", "queue-fam-unsafe"] if ferretdb else ["queue-claim"]
    return ["topic-shared-cursor", "topic-cursor-per-subscriber"]


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
        self.seq_lock = asyncio.Lock()
        self.put_event = asyncio.Event()
        self.generation = 0
        self.window: deque[dict[str, Any]] = deque()
        self.window_read_at = 0.0
        self.window_generation = -1
        self.window_complete = False
        self.window_reading: asyncio.Future[None] | None = None
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

    # -- sequence ranges (_sequence.SequenceAllocator) ---------------------------------------------------------
    async def allocate(self, name: str, count: int) -> int:
        if not self.ferretdb:
            doc = await self.counters.find_one_and_update(
                {"_id": name}, {"$inc": {"n": count}}, upsert=True, return_document=ReturnDocument.AFTER
            )
            return int(doc["n"]) - count + 1
        async with self.seq_lock:
            hint = await _busy(lambda: self.counters.find_one({"_id": name}))
            start = int(hint["n"]) + 1 if hint is not None else 1
            while True:
                end = start + count - 1
                try:
                    doc = {"_id": f"{name}@{start}", "name": name, "start": start, "end": end}
                    await _busy(lambda: self.counters.insert_one(doc))
                    break
                except DuplicateKeyError:
                    taken = await _busy(lambda: self.counters.find_one({"_id": f"{name}@{start}"}))
                    start = int(taken["end"]) + 1 if taken is not None else start + 1
            try:
                await _busy(lambda: self.counters.update_one({"_id": name}, {"$max": {"n": end}}, upsert=True))
            except DuplicateKeyError:
                await _busy(lambda: self.counters.update_one({"_id": name}, {"$max": {"n": end}}))
            return start

    # -- producers ---------------------------------------------------------------------------------------------
    async def produce(self, pid: int, count: int) -> None:
        cfg = self.cfg
        size = cfg.body_size
        queue_kind = self.variant.startswith("queue")
        coll = self.queue if queue_kind else self.topics
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
                first = await self.allocate("queue" if queue_kind else "topic", n)
                if queue_kind:
                    docs = []
                    for i, m in enumerate(msgs):
                        doc = message_doc(m, seq_field="seq", seq=first + i, flat_headers=self.ferretdb)
                        doc.update(state="ready", lease_until=0, owner=None, deliveries=0, claims=0,
                                   original_destination=None)  # fmt: skip
                        docs.append(doc)
                else:
                    docs = [message_doc(m, seq_field="position", seq=first + i, flat_headers=False)
                            for i, m in enumerate(msgs)]  # fmt: skip
                await _busy(lambda: coll.insert_many(docs, ordered=True))
                seq += n
                if queue_kind:  # the backend invalidates its window and wakes local claimers after a put
                    self.generation += 1
                    self.put_event.set()
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

    async def read_window(self, want: int, now_ms: int) -> None:
        if self.window_reading is not None:
            await asyncio.shield(self.window_reading)
            if self.window and self.window_usable():
                return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.window_reading = done
        try:
            generation = self.generation
            size = max(WINDOW, 2 * want)
            docs = await _busy(lambda: self.queue.find(self.ready_query(now_ms), sort=SORT, limit=size).to_list())
            self.window = deque(docs)
            self.window_read_at = time.monotonic()
            self.window_generation = generation
            self.window_complete = len(docs) < size
        finally:
            self.window_reading = None
            done.set_result(None)

    def window_usable(self) -> bool:
        return self.window_generation == self.generation and time.monotonic() - self.window_read_at < WINDOW_S

    async def claim_tokens(self, limit: int, owner: str) -> list[dict[str, Any]]:
        """The FerretDB path of ``MongoPollQueue._claim_window`` + ``_claim_batch_ferretdb`` + ``_take_versions``."""
        out: list[dict[str, Any]] = []
        for _round in range(4):
            now_ms = int(time.time() * 1000)
            lease_until = now_ms + LEASE_MS
            want = limit - len(out)
            if not (self.window and self.window_usable()):
                await self.read_window(want, now_ms)
            candidates: list[dict[str, Any]] = []
            while self.window and len(candidates) < want:
                doc = self.window.popleft()
                if int(doc.get("expires_at", 0)) > now_ms:
                    candidates.append(doc)
            if candidates:
                at = int(time.time() * 1000)
                tokens = [{"_id": f"q|{d['_id']}|{int(d.get('claims', 0)) + 1}", "m": str(d["_id"]),
                           "until": lease_until, "at": at} for d in candidates]  # fmt: skip
                lost: set[int] = set()
                try:
                    await _busy(lambda: self.claims.insert_many(tokens, ordered=False))
                except BulkWriteError as exc:
                    lost = {int(e["index"]) for e in exc.details.get("writeErrors", []) if e.get("code") == 11000}
                    if len(lost) != len(exc.details.get("writeErrors", [])):
                        raise
                won = [d for i, d in enumerate(candidates) if i not in lost]

                def lease(doc: dict[str, Any], lease_until: int = lease_until) -> Callable[[], Awaitable[Any]]:
                    version = int(doc.get("claims", 0))
                    changes = {"state": "leased", "lease_until": lease_until, "owner": owner, "claims": version + 1,
                               "deliveries": int(doc.get("deliveries", 0)) + 1}  # fmt: skip

                    async def call() -> dict[str, Any] | None:
                        result = await _busy(lambda: self.queue.update_one(
                            {"_id": doc["_id"], "claims": version}, {"$set": changes}))  # fmt: skip
                        return {**doc, **changes} if result.matched_count else None

                    return call

                out += [d for d in await _limited([lease(d) for d in won]) if d is not None]
            if len(out) >= limit or (not self.window and self.window_complete):
                break
        return out

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
        if self.ferretdb:

            def delete(doc_id: Any) -> Callable[[], Awaitable[Any]]:
                return lambda: _busy(lambda: self.queue.delete_one({"_id": doc_id}))

            await _limited([delete(i) for i in ids])
        else:
            await self.queue.delete_many({"_id": {"$in": ids}})

    async def consume_queue(self, cid: int, prefetch: int, safe: bool) -> None:
        state = self.new_consumer(cid)
        owner = self.gateway_id
        unacked = 0
        credit = asyncio.Event()
        acks: set[asyncio.Task[None]] = set()

        async def ack_later(ids: list[Any]) -> None:
            nonlocal unacked
            try:
                await self.ack(ids)
            finally:
                unacked -= len(ids)
                credit.set()

        try:
            while not self.stop.is_set():
                room = prefetch - unacked
                if room <= 0:
                    credit.clear()
                    await credit.wait()
                    continue
                limit = min(room, CLAIM_BATCH)
                if safe and self.ferretdb:
                    docs = await self.claim_tokens(limit, owner)
                    self.record(state, docs)
                else:
                    docs = await self.claim_fam(limit, owner, state)
                if not docs:
                    self.put_event.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(DatasourceOptions().poll_interval):
                            await self.put_event.wait()
                    continue
                unacked += len(docs)
                task = asyncio.ensure_future(ack_later([d["_id"] for d in docs]))
                acks.add(task)
                task.add_done_callback(acks.discard)
            if acks:
                await asyncio.gather(*acks)
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
                gateways if variant == "topic-shared-cursor" else cfg.consumers if kind == "topic" else None
            )
            if not summary["exactly_once"]:  # a reference run: duplicates are expected, not a failure
                summary["ok"] = summary["lost"] == 0 and not summary["errors"]
            runs.append(summary)
    finally:
        await client.close()
    return {"mode": "baseline", "url": url, "server": server, "runs": runs, "ok": all(r["ok"] for r in runs)}

