"""``stompgate bench --baseline mongodb://...`` (or ``postgresql://...``, ``redis://...``): the backend driven
directly, with no STOMP and no gateway in between: the same datastore operations the gateway makes for this workload,
as the database can take them.

On PostgreSQL it runs ``app.datasources.postgresql`` on a fresh namespace (tables dropped afterwards): its claim
statement, fenced deletes, and topic appends under the head row's lock, which is the bare asyncpg loop of those
statements plus the backend's thin bookkeeping. Variants there: ``queue-claim`` and ``topic-log`` (each simulated
gateway follows the log once and fans out).

On Redis (``redis://``, ``rediss://``) it runs ``app.datasources.redis`` the same way, on a fresh namespace whose keys
are all deleted afterwards (the write marks, kept an hour, included): its Lua scripts called by hash through
redis-py (APPLY for puts, publishes and ACKs, CLAIM), which is the bare redis-py loop of those scripts. Variants:
``queue-claim`` and ``topic-log`` (one blocking ``XREAD`` follower per simulated gateway, fanned out).

It runs the backend itself (``app.datasources.mongodb``: ``MongoPollQueue`` and ``MongoTailQueue`` on a fresh
namespace ``bench-<random>`` in the URL's database, dropped afterwards) with the bench's concurrency, in this one
process: ``--producers`` tasks each storing ``--baseline-batch`` messages per call (default 64, the bench's SEND
chunk), ``--consumers`` tasks claiming and acknowledging (queues) or following the topic log. So it cannot drift
from what the gateway does; what it leaves out is the gateway's own work (STOMP parsing and framing, sessions,
subscriptions, group commit across connections).

Variants (``--baseline-variant``, repeatable; default: the ones that apply to the kind and server):

* ``queue-claim`` - ``MongoPollQueue.claim`` as the server gets it: one ``find_one_and_update`` per message on
  MongoDB; on FerretDB the claim window and unique claim tokens (see ``queues``' module doc). Each consumer claims
  up to ``--prefetch`` (default 100, the gateway's) per call and acknowledges them all at once through the broker's
  own ACK coalescing (``Batcher``: the ids acked while the previous ``ack`` call ran go in the next one), so its
  credit is free again right away, as a subscription's is when the ACK frame arrives. With nothing to claim it
  waits on ``MongoPollQueue.wait``, like a subscription.
* ``queue-fam-unsafe`` (FerretDB only) - the same with ``claim_mode = "atomic"``: the MongoDB claim loop
  (``find_one_and_update`` per message, one message per call) run on FerretDB as a reference. **Not exactly-once
  there** (its findAndModify is read-then-update), so it may report DUPLICATED > 0; that is the point of the tokens.
* ``topic-blocks`` (FerretDB) - ``MongoTailQueue`` the way it runs there (``follow_mode`` "poll"): ``--gateways N``
  datasources, as N gateways; producer *i* publishes on gateway *i* mod N, one publish at a time per gateway (the
  gateway's topic ``Batcher`` writes one batch at a time), and each gateway follows the log once and fans every
  message out to its subscribers (``--consumers`` spread round-robin over the gateways).
* ``topic-shared-cursor`` - the same with ``follow_mode`` "cursor" (one tailable awaitData cursor per gateway):
  what the gateway does on MongoDB.
* ``topic-cursor-per-subscriber`` - one tailable cursor per subscriber (``--consumers`` followers on one gateway).

The report is the workload's (``workload.summarize``): msgs/s from the first store to the last delivery, latency
from just before the store to the claim/read, lost and duplicated by (producer, seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from array import array
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from pymongo import AsyncMongoClient

from app.bench.workload import SEND_BATCH, TS_HEADER, BenchConfig, summarize
from app.broker.batching import Batcher
from app.datasources.interface import (
    Datasource,
    DatasourceOptions,
    NewMessage,
    Published,
    StoredMessage,
)
from app.datasources.mongodb import DEFAULT_DATABASE, MongoDatasource
from app.datasources.mongodb._common import detect_server
from app.datasources.postgresql import PgDatasource
from app.datasources.postgresql.store import TABLES as PG_TABLES
from app.datasources.redis import RedisDatasource
from app.datasources.redis.store import _text
from app.datasources.registry import open_datasource as open_any_datasource

__all__ = ["VARIANTS", "default_variants", "run_baseline"]

VARIANTS = (
    "queue-claim", "queue-fam-unsafe", "topic-blocks", "topic-shared-cursor", "topic-cursor-per-subscriber", "topic-log",
)
POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")
REDIS_SCHEMES = ("redis://", "rediss://")
CLAIM_BATCH = 256  # BrokerConfig.claim_batch
DEFAULT_PREFETCH = 100  # BrokerConfig.default_prefetch
LEASE_MS = 60_000  # BrokerConfig.lease_ms
COLLECTIONS = ("queue", "claims", "counters", "topics", "cursors")  # the backend's, under its namespace


def default_variants(kind: str, ferretdb: bool, one_log: bool = False) -> list[str]:
    """``one_log``: the backend's topics are one log that each gateway follows once (PostgreSQL, Redis)."""
    if one_log:
        return ["queue-claim"] if kind == "queue" else ["topic-log"]
    if kind == "queue":
        return ["queue-claim", "queue-fam-unsafe"] if ferretdb else ["queue-claim"]
    return ["topic-blocks"] if ferretdb else ["topic-shared-cursor", "topic-cursor-per-subscriber"]


class _Run:
    """One variant: the datasources (one per simulated gateway) and the per-producer / per-consumer records."""

    def __init__(self, cfg: BenchConfig, url: str, variant: str, gateways: int, batch: int) -> None:
        self.cfg = cfg
        self.url = url
        self.variant = variant
        self.gateways = max(1, gateways) if variant in ("topic-blocks", "topic-shared-cursor", "topic-log") else 1
        self.batch = batch
        self.options = DatasourceOptions(namespace=f"bench_{uuid.uuid4().hex[:10]}")
        self.sources: list[Datasource] = []
        self.publish_locks = [asyncio.Lock() for _ in range(self.gateways)]
        self.stop = asyncio.Event()
        self.message_counter = 0
        self.run_id = uuid.uuid4().hex[:12]
        self.producer_results: list[dict[str, Any]] = []
        self.consumer_state: list[dict[str, Any]] = []

    # -- set-up / tear-down ------------------------------------------------------------------------------------
    async def open(self) -> None:
        for _ in range(self.gateways):
            ds = await open_any_datasource(self.url, self.options)
            self.sources.append(ds)
            if not isinstance(ds, MongoDatasource):
                continue
            if self.variant == "queue-fam-unsafe":
                ds.queues.claim_mode = "atomic"
            elif self.variant.startswith("topic"):
                ds.topics.follow_mode = "poll" if self.variant == "topic-blocks" else "cursor"

    async def close(self) -> None:
        first = self.sources[0] if self.sources else None
        if isinstance(first, MongoDatasource):
            db = first.client.get_default_database(DEFAULT_DATABASE)
            for name in COLLECTIONS:
                with contextlib.suppress(Exception):
                    await db.drop_collection(f"{self.options.namespace}.{name}")
        elif isinstance(first, PgDatasource):
            tables = ", ".join(first.store.table(name) for name in PG_TABLES)
            with contextlib.suppress(Exception):
                await first.store.run(lambda conn: conn.execute(f"DROP TABLE IF EXISTS {tables}"))
        elif isinstance(first, RedisDatasource):
            with contextlib.suppress(Exception):
                await _delete_redis_namespace(first, self.options.namespace)
        for ds in self.sources:
            with contextlib.suppress(Exception):
                await ds.close()

    # -- producers ---------------------------------------------------------------------------------------------
    async def produce(self, pid: int, count: int) -> None:
        cfg = self.cfg
        ds = self.sources[pid % self.gateways]
        seq = 0
        first_send = time.time_ns()
        error = None
        try:
            while seq < count:
                n = min(self.batch, count - seq)
                now_ns = time.time_ns()
                msgs = []
                for i in range(n):
                    self.message_counter += 1
                    msgs.append(NewMessage(
                        message_id=f"{self.run_id}-{self.message_counter}", destination=cfg.destination,
                        headers={TS_HEADER: str(now_ns)}, body=f"{pid}:{seq + i}:".encode().ljust(cfg.body_size, b"x"),
                        published_at=now_ns // 1_000_000,
                    ))  # fmt: skip
                if cfg.kind == "queue":
                    await ds.queues.put(msgs)
                else:
                    async with self.publish_locks[pid % self.gateways]:  # one publish at a time per gateway
                        await ds.topics.publish(msgs)
                seq += n
        except Exception as exc:  # noqa: BLE001 - reported
            error = f"{type(exc).__name__}: {exc}"
        last = time.time_ns()
        self.producer_results.append({
            "id": pid, "sent": seq, "receipted": seq, "missing_receipts": [], "first_send": first_send,
            "last_send": last, "last_receipt": last, "error": error,
        })  # fmt: skip

    # -- consumer bookkeeping ----------------------------------------------------------------------------------
    def new_consumer(self, cid: int) -> dict[str, Any]:
        state = {"id": cid, "seen": set(), "duplicates": 0, "frames": 0, "latencies": array("d"),
                 "first_delivery": 0, "last_delivery": 0, "error": None}  # fmt: skip
        self.consumer_state.append(state)
        return state

    @staticmethod
    def record(state: dict[str, Any], messages: Sequence[StoredMessage]) -> None:
        now = time.time_ns()
        seen = state["seen"]
        lat = state["latencies"]
        for message in messages:
            body = message.body
            i = body.find(b":")
            j = body.find(b":", i + 1)
            key = (int(body[:i]) << 32) | int(body[i + 1 : j])
            if key in seen:
                state["duplicates"] += 1
            else:
                seen.add(key)
            ts = message.headers.get(TS_HEADER)
            if ts is not None:
                lat.append((now - int(ts)) / 1e6)
        state["frames"] += len(messages)
        if messages:
            state["first_delivery"] = state["first_delivery"] or now
            state["last_delivery"] = now

    def delivered(self) -> int:
        return sum(len(s["seen"]) for s in self.consumer_state)

    # -- consumers ---------------------------------------------------------------------------------------------
    async def consume_queue(self, cid: int, prefetch: int, acker: Batcher[str]) -> None:
        state = self.new_consumer(cid)
        queues = self.sources[0].queues
        destination = self.cfg.destination
        # the reference loop claims one message per call so that each is recorded as it comes (a claim of 100
        # takes seconds there, longer than the drain timeout's idea of "no progress")
        limit = 1 if self.variant == "queue-fam-unsafe" else min(prefetch, CLAIM_BATCH)
        idle_s = self.options.poll_interval

        def ack_failed(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and (exc := future.exception()) is not None:
                state["error"] = state["error"] or f"ack: {type(exc).__name__}: {exc}"

        try:
            while not self.stop.is_set():
                claimed = await queues.claim(
                    destination, owner=self.run_id, limit=limit, lease_ms=LEASE_MS, now_ms=int(time.time() * 1000)
                )
                if not claimed:
                    await queues.wait(destination, idle_s)
                    continue
                self.record(state, claimed)
                acker.submit([m.message_id for m in claimed]).add_done_callback(ack_failed)
        except Exception as exc:  # noqa: BLE001 - reported
            state["error"] = f"{type(exc).__name__}: {exc}"

    async def follow(self, gateway: int, states: list[dict[str, Any]]) -> None:
        """One ``MongoTailQueue.follow`` of ``gateway``'s datasource, every message fanned out to ``states``."""
        try:
            async for event in self.sources[gateway].topics.follow(after=0):
                if isinstance(event, Published):
                    for state in states:
                        self.record(state, [event.message])
        except Exception as exc:  # noqa: BLE001 - reported
            for state in states:
                state["error"] = state["error"] or f"{type(exc).__name__}: {exc}"

    # -- the run -----------------------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        await self.open()
        acker: Batcher[str] = Batcher(self.sources[0].queues.ack)
        timed_out = False
        consumer_tasks: list[asyncio.Future[None]] = []
        try:
            consumers: list[Awaitable[None]] = []
            if cfg.kind == "queue":
                prefetch = cfg.prefetch or DEFAULT_PREFETCH
                consumers = [self.consume_queue(cid, prefetch, acker) for cid in range(cfg.consumers)]
            elif self.variant == "topic-cursor-per-subscriber":
                consumers = [self.follow(0, [self.new_consumer(cid)]) for cid in range(cfg.consumers)]
            else:
                states = [self.new_consumer(cid) for cid in range(cfg.consumers)]
                groups = [states[g :: self.gateways] for g in range(self.gateways)]
                consumers = [self.follow(g, group) for g, group in enumerate(groups) if group]
            consumer_tasks = [asyncio.ensure_future(c) for c in consumers]
            if cfg.kind == "topic":
                await asyncio.sleep(0.2)  # followers attached before the first publish (subscribe-then-publish)
            producer_tasks = [asyncio.ensure_future(self.produce(pid, cfg.messages_for(pid) or 0))
                              for pid in range(cfg.producers)]  # fmt: skip
            await asyncio.gather(*producer_tasks)
            sent = sum(p["sent"] for p in self.producer_results)
            expected = sent * (cfg.consumers if cfg.kind == "topic" else 1) if cfg.consumers else 0
            last, last_change = -1, time.monotonic()
            while self.delivered() < expected and not all(t.done() for t in consumer_tasks):
                delivered = self.delivered()
                if delivered != last:
                    last, last_change = delivered, time.monotonic()
                elif time.monotonic() - last_change > cfg.drain_timeout:
                    timed_out = True
                    break
                await asyncio.sleep(0.005)
            self.stop.set()
            with contextlib.suppress(Exception):  # the deletes still queued (their failures are in the consumers)
                async with asyncio.timeout(30):
                    await acker.close()
        finally:  # a follower runs until cancelled; a queue consumer may be waiting
            await _cancel(consumer_tasks)
            await asyncio.gather(*consumer_tasks, return_exceptions=True)
            await self.close()
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
            "errors": [],
            "timings": {"drain_timed_out": 1.0} if timed_out else {},
        }
        summary = summarize(cfg, [raw])
        summary["drain_timed_out"] = timed_out
        return summary


async def _cancel(tasks: Sequence[asyncio.Future[None]]) -> None:
    """Cancel until each is done. On Python 3.11 a cancel can be lost: redis-py sends a command under
    ``asyncio.wait_for``, which returns the send's result when the cancel lands as the send completes, and a Redis
    topic follower then goes on reading for ever."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)


async def run_baseline(
    url: str, cfg: BenchConfig, *, variants: list[str] | None, gateways: int = 1, batch: int = SEND_BATCH
) -> dict[str, Any]:
    """Run each variant against ``url``; returns ``{"mode": "baseline", "server", "runs": [summary, ...], "ok"}``."""
    one_log = url.startswith(POSTGRESQL_SCHEMES + REDIS_SCHEMES)
    ferretdb = False
    server: dict[str, str | None]
    if url.startswith(POSTGRESQL_SCHEMES):
        server = {"postgresql": await _postgresql_version(url)}
    elif url.startswith(REDIS_SCHEMES):
        server = await _redis_server(url)
    else:
        probe: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, appname="stompgate-bench-baseline")
        try:
            info = await detect_server(probe.get_default_database(DEFAULT_DATABASE))
        finally:
            await probe.close()
        ferretdb = info.is_ferretdb
        server = {"version": info.version, "ferretdb_version": info.ferretdb_version}
    runs = []
    for variant in variants or default_variants(cfg.kind, ferretdb, one_log):
        kind = "queue" if variant.startswith("queue") else "topic"
        vcfg = replace(cfg, kind=kind, destination=f"/{kind}/bench-{uuid.uuid4().hex[:12]}")
        started = time.process_time()
        run = _Run(vcfg, url, variant, gateways, batch)
        summary = await run.run()
        summary["bench_cpu_s"] = round(time.process_time() - started, 2)
        summary["variant"] = variant
        summary["exactly_once"] = not (variant == "queue-fam-unsafe" and ferretdb)
        summary["insert_batch"] = batch
        summary["cursors"] = run.gateways if kind == "topic" and variant != "topic-cursor-per-subscriber" else (
            cfg.consumers if kind == "topic" else None
        )
        if not summary["exactly_once"]:  # a reference run: duplicates are expected, not a failure
            summary["ok"] = summary["lost"] == 0 and not summary["errors"]
        runs.append(summary)
    return {"mode": "baseline", "url": url, "server": server, "runs": runs, "ok": all(r["ok"] for r in runs)}


async def _postgresql_version(url: str) -> str:
    ds = await open_any_datasource(url, DatasourceOptions(namespace=f"bench_{uuid.uuid4().hex[:10]}"))
    assert isinstance(ds, PgDatasource)
    try:
        version = await ds.store.run(lambda conn: conn.fetchval("SHOW server_version"), transaction=False)
        tables = ", ".join(ds.store.table(name) for name in PG_TABLES)
        await ds.store.run(lambda conn: conn.execute(f"DROP TABLE IF EXISTS {tables}"))
    finally:
        await ds.close()
    return str(version)


async def _redis_server(url: str) -> dict[str, str | None]:
    """The version and the persistence settings: what a figure on Redis depends on most (``appendfsync``)."""
    client: aioredis.Redis = aioredis.from_url(url, socket_connect_timeout=10)
    try:
        version = (await client.info("server")).get("redis_version")
        try:
            settings = {_text(k): _text(v) for k, v in (await client.config_get("append*")).items()}
        except redis.exceptions.ResponseError:  # CONFIG refused (managed Redis): the figures say so
            settings = {}
    finally:
        await client.aclose()
    return {
        "redis": None if version is None else str(version),
        "appendonly": settings.get("appendonly"),
        "appendfsync": settings.get("appendfsync"),
    }


async def _delete_redis_namespace(ds: RedisDatasource, namespace: str) -> None:
    """Every key of ``namespace``: ``{ns}:...`` and ``{ns:<what>}:...`` (see ``app.datasources.redis.scripts``), the
    write marks included, which would otherwise stay an hour. The namespace is ``bench_<hex>``: no glob characters."""
    client = ds.store.client
    batch: list[bytes] = []
    async for key in client.scan_iter(match=f"{{{namespace}[}}:]*", count=1000):
        batch.append(key)
        if len(batch) == 500:
            await client.delete(*batch)
            batch = []
    if batch:
        await client.delete(*batch)
