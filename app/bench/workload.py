"""Producers and consumers, spread over one or more OS processes, and the bookkeeping that finds lost and
duplicated messages.

Every message body starts with ``<producer>:<seq>:`` (padded with ``x`` to the body size) and carries a
``bench-ts`` header (``time.time_ns()`` when the SEND was queued). Consumers keep the set of (producer, seq) keys they
saw, count repeats, and record the send-to-delivery latency.

Coordination (the same code for 1 and N processes): a coordinator (a thread with ``--processes 1``, the parent
process otherwise) waits until every consumer has subscribed (SUBSCRIBE with a receipt), releases the producers,
waits until every producer is done (all receipts in, or the drain timeout), then waits until every expected delivery
arrived or deliveries stopped for the drain timeout, and tells the consumers to stop.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue as queue_module
import threading
import time
import traceback
from array import array
from dataclasses import asdict, dataclass
from collections.abc import Awaitable, Iterable
from typing import Any

from app.bench.client import BenchClient, BenchClientError, open_client, run_loop
from stomp_core import MessageReceived

__all__ = ["BenchConfig", "run_workload", "summarize"]

SEND_BATCH = 64  # SEND frames queued per write (and per window check)
# Body bytes queued per write at most: with large bodies a batch is fewer frames, and the producer waits for the
# socket to take them before it builds more, as a real client does (stomp.py blocks in send). Without it, a window of
# 500 SENDs of 1 MiB put 500 MiB into the producer's write buffer at once, and the load generator stalled for most
# of a second building it (docs/benchmarks.md, "The load generator stalled itself").
SEND_BATCH_BYTES = 1024 * 1024
TS_HEADER = "bench-ts"


@dataclass(frozen=True)
class BenchConfig:
    host: str
    port: int
    kind: str  # "queue" or "topic"
    destination: str  # full name, e.g. /queue/bench-1a2b
    producers: int
    consumers: int
    messages: int | None  # total to send; None with a duration
    duration: float | None
    body_size: int
    receipts: bool
    window: int
    ack: str
    prefetch: int | None
    version: str
    vhost: str
    login: str | None
    passcode: str | None
    processes: int
    drain_timeout: float
    connect_timeout: float
    loop: str
    # more STOMP endpoints (``--gateways N``): producer i and consumer i connect to ``endpoint(i)``, round-robin over
    # (host, port) followed by these
    extra_endpoints: tuple[tuple[str, int], ...] = ()
    # ``persistent:true`` on every SEND: RabbitMQ and ActiveMQ then write the message to disk before confirming it
    # (stompgate stores every message durably anyway, so it makes no difference there)
    persistent: bool = False
    # extra SUBSCRIBE headers (``--compare``'s ``header=``), e.g. Artemis's consumer-window-size
    subscribe_headers: tuple[tuple[str, str], ...] = ()
    # ``--transport websocket``: the clients speak STOMP over WebSocket to this path of the (HTTP) port
    websocket_path: str | None = None
    # ``--rate``: messages per second over all producers, sent one at a time on a schedule (latency at a given load
    # instead of at saturation); None sends as fast as the window allows
    rate: float | None = None
    # ``--large-body-size`` / ``--large-every``: every Nth message of each producer has this body size instead (a mix of
    # small and large messages); None sends only ``body_size``
    large_body_size: int | None = None
    large_every: int = 10

    def endpoint(self, index: int) -> tuple[str, int]:
        endpoints = ((self.host, self.port), *self.extra_endpoints)
        return endpoints[index % len(endpoints)]

    def share(self, index: int, count: int) -> list[int]:
        """The global ids (of ``count`` clients) that process ``index`` runs: round-robin."""
        return [i for i in range(count) if i % self.processes == index]

    def messages_for(self, producer: int) -> int | None:
        if self.messages is None:
            return None
        base, extra = divmod(self.messages, self.producers)
        return base + (1 if producer < extra else 0)


class Shared:
    """What the workers and the coordinator share (multiprocessing objects work within one process too)."""

    def __init__(self, ctx: Any, processes: int) -> None:
        self.lock = ctx.Lock()
        self.ready = ctx.Value("i", 0, lock=False)  # consumers subscribed
        self.producers_done = ctx.Value("i", 0, lock=False)
        self.sent = ctx.Value("q", 0, lock=False)
        self.receipted = ctx.Value("q", 0, lock=False)
        self.delivered = ctx.Array("q", processes, lock=False)  # distinct deliveries per process
        self.failed = ctx.Value("i", 0, lock=False)
        self.go = ctx.Event()
        self.stop = ctx.Event()


# ---------------------------------------------------------------------------------------------------------------
# producers


class Producer:
    def __init__(self, cfg: BenchConfig, pid: int, count: int | None, shared: Shared) -> None:
        self.cfg = cfg
        self.pid = pid
        self.count = count
        self.shared = shared
        self.client: BenchClient | None = None
        self.sent = 0
        self.receipted = 0
        self.pending: set[str] = set()
        self.window_open = asyncio.Event()
        self.first_send = 0
        self.last_send = 0
        self.last_receipt = 0
        self.error: str | None = None

    async def connect(self) -> None:
        cfg = self.cfg
        host, port = cfg.endpoint(self.pid)
        self.client = await open_client(
            host, port, version=cfg.version, vhost=cfg.vhost, login=cfg.login, passcode=cfg.passcode,
            timeout=cfg.connect_timeout, websocket_path=cfg.websocket_path,
        )  # fmt: skip
        self.client.on_receipts = self._on_receipts
        self.client.on_failure = self._on_failure

    def _on_receipts(self, ids: list[str]) -> None:
        pending = self.pending
        for rid in ids:
            if rid in pending:
                pending.remove(rid)
                self.receipted += 1
        self.last_receipt = time.time_ns()
        if len(pending) < self.cfg.window:
            self.window_open.set()

    def _on_failure(self, reason: str) -> None:
        self.error = self.error or reason
        self.window_open.set()

    async def run(self) -> None:
        assert self.client is not None
        client = self.client
        conn = client.conn
        cfg = self.cfg
        dest = cfg.destination
        size = cfg.body_size
        receipts = cfg.receipts
        persistent = cfg.persistent
        window = cfg.window
        pending = self.pending
        prefix = f"{self.pid}:"
        limit = self.count
        deadline = time.monotonic() + cfg.duration if cfg.duration is not None else None
        interval = cfg.producers / cfg.rate if cfg.rate else None  # this producer's share of the rate
        started = time.monotonic()
        seq = 0
        self.first_send = time.time_ns()
        try:
            while self.error is None:
                if limit is not None and seq >= limit:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                batch = SEND_BATCH
                if interval is not None:  # paced: one message, at its time
                    batch = 1
                    delay = started + seq * interval - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if receipts:
                    free = window - len(pending)
                    if free <= 0:
                        self.window_open.clear()
                        await self.window_open.wait()
                        continue
                    batch = min(batch, free)
                if limit is not None:
                    batch = min(batch, limit - seq)
                queued = 0
                for _ in range(batch):
                    if queued >= SEND_BATCH_BYTES:  # large bodies: fewer frames per write
                        break
                    length = size
                    if cfg.large_body_size is not None and seq % cfg.large_every == cfg.large_every - 1:
                        length = cfg.large_body_size
                    body = f"{prefix}{seq}:".encode().ljust(length, b"x")
                    headers = {TS_HEADER: str(time.time_ns())}
                    if persistent:
                        headers["persistent"] = "true"
                    if receipts:
                        rid = str(seq)
                        pending.add(rid)
                        conn.send(dest, body, headers=headers, receipt=rid)
                    else:
                        conn.send(dest, body, headers=headers)
                    seq += 1
                    queued += length
                self.sent = seq
                client.flush()
                if client.closed:
                    break
                await client.drained()  # the socket took what the last batches queued (at once for small ones)
                if not receipts:
                    await asyncio.sleep(0)  # let consumers in this process read
            self.last_send = time.time_ns()
            # wait for the outstanding receipts
            if receipts and pending and self.error is None:
                stall = time.monotonic()
                before = len(pending)
                while pending and self.error is None:
                    self.window_open.clear()
                    try:
                        await asyncio.wait_for(self.window_open.wait(), 0.25)
                    except asyncio.TimeoutError:
                        pass
                    if len(pending) != before:
                        before, stall = len(pending), time.monotonic()
                    elif time.monotonic() - stall > cfg.drain_timeout:
                        break
            await client.disconnect(cfg.drain_timeout)
        except BenchClientError as exc:
            self.error = self.error or str(exc)
        finally:
            client.close()
            if not receipts:
                self.receipted = 0
            with self.shared.lock:
                self.shared.sent.value += self.sent
                self.shared.receipted.value += self.receipted
                self.shared.producers_done.value += 1

    def result(self) -> dict[str, Any]:
        return {
            "id": self.pid,
            "sent": self.sent,
            "receipted": self.receipted,
            "missing_receipts": sorted(int(r) for r in self.pending),
            "first_send": self.first_send,
            "last_send": self.last_send,
            "last_receipt": self.last_receipt,
            "error": self.error,
        }


# ---------------------------------------------------------------------------------------------------------------
# consumers


class Consumer:
    def __init__(self, cfg: BenchConfig, cid: int) -> None:
        self.cfg = cfg
        self.cid = cid
        self.client: BenchClient | None = None
        self.seen: set[int] = set()
        self.duplicates = 0
        self.frames = 0
        self.latencies = array("d")
        self.first_delivery = 0
        self.last_delivery = 0
        self.error: str | None = None

    async def start(self) -> None:
        cfg = self.cfg
        host, port = cfg.endpoint(self.cid)
        client = await open_client(
            host, port, version=cfg.version, vhost=cfg.vhost, login=cfg.login, passcode=cfg.passcode,
            timeout=cfg.connect_timeout, websocket_path=cfg.websocket_path,
        )  # fmt: skip
        self.client = client
        client.on_messages = self._on_messages
        client.on_failure = self._on_failure
        headers = {"prefetch-count": str(cfg.prefetch)} if cfg.prefetch is not None else {}
        headers.update(cfg.subscribe_headers)
        waiter = client.expect_receipt("bench-sub")
        client.conn.subscribe(cfg.destination, f"bench-{self.cid}", ack=cfg.ack, headers=headers or None, receipt="bench-sub")  # type: ignore[arg-type]
        client.flush()
        await asyncio.wait_for(waiter, cfg.connect_timeout)

    def _on_failure(self, reason: str) -> None:
        self.error = self.error or reason

    def _on_messages(self, messages: list[MessageReceived], now: int) -> None:
        seen = self.seen
        lat = self.latencies
        for msg in messages:
            body = msg.body
            i = body.find(b":")
            j = body.find(b":", i + 1)
            try:
                key = (int(body[:i]) << 32) | int(body[i + 1 : j])
            except ValueError:
                continue  # not one of ours
            if key in seen:
                self.duplicates += 1
            else:
                seen.add(key)
            ts = msg.headers.get(TS_HEADER)
            if ts is not None:
                lat.append((now - int(ts)) / 1e6)
        self.frames += len(messages)
        if not self.first_delivery:
            self.first_delivery = now
        self.last_delivery = now
        ack = self.cfg.ack
        if ack == "auto":
            return
        assert self.client is not None
        conn = self.client.conn
        v12 = conn.version == "1.2"
        if ack == "client-individual":
            for msg in messages:
                conn.ack(msg.ack if v12 and msg.ack is not None else msg.message_id, subscription=msg.subscription)
        else:  # client: cumulative, one ACK for the last message of the chunk
            msg = messages[-1]
            conn.ack(msg.ack if v12 and msg.ack is not None else msg.message_id, subscription=msg.subscription)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.disconnect(min(self.cfg.drain_timeout, 5.0))

    def result(self) -> dict[str, Any]:
        keys = array("Q", self.seen)
        return {
            "id": self.cid,
            "keys": keys.tobytes(),
            "duplicates": self.duplicates,
            "frames": self.frames,
            "latencies": self.latencies.tobytes(),
            "first_delivery": self.first_delivery,
            "last_delivery": self.last_delivery,
            "error": self.error,
        }


# ---------------------------------------------------------------------------------------------------------------
# one worker (one OS process's share of the clients)


async def _worker(cfg: BenchConfig, index: int, shared: Shared) -> dict[str, Any]:
    consumers = [Consumer(cfg, cid) for cid in cfg.share(index, cfg.consumers)]
    producers = [
        Producer(cfg, pid, cfg.messages_for(pid), shared) for pid in cfg.share(index, cfg.producers)
    ]
    errors: list[str] = []
    reporter: asyncio.Task[None] | None = None

    async def report() -> None:
        while True:
            shared.delivered[index] = sum(len(c.seen) for c in consumers)
            await asyncio.sleep(0.01)

    async def wait_for(event: Any) -> None:
        while not event.is_set():
            await asyncio.sleep(0.002)

    try:
        try:
            await _every(c.start() for c in consumers)
            await _every(p.connect() for p in producers)
        except (OSError, asyncio.TimeoutError, BenchClientError) as exc:
            errors.append(f"connect/subscribe failed: {exc!r}")
            shared.failed.value = 1
            with shared.lock:
                shared.producers_done.value += len(producers)
            for c in consumers:
                if c.client is not None:
                    c.client.close()
            for p in producers:
                if p.client is not None:
                    p.client.close()
            return {"producers": [], "consumers": [], "errors": errors}
        with shared.lock:
            shared.ready.value += len(consumers)
        reporter = asyncio.create_task(report())
        await wait_for(shared.go)
        await asyncio.gather(*(p.run() for p in producers))
        await wait_for(shared.stop)
        shared.delivered[index] = sum(len(c.seen) for c in consumers)
        await asyncio.gather(*(c.stop() for c in consumers))
    finally:
        if reporter is not None:
            reporter.cancel()
    return {
        "producers": [p.result() for p in producers],
        "consumers": [c.result() for c in consumers],
        "errors": errors,
    }


async def _every(steps: Iterable[Awaitable[None]]) -> None:
    """Run the steps together and raise the first failure once all ended. (A bare gather raises the first failure at
    once and leaves the others running: when a gateway refused two connections, the second refusal was never
    retrieved and asyncio.run printed it as an unhandled exception at shutdown.)"""
    for result in await asyncio.gather(*steps, return_exceptions=True):
        if isinstance(result, BaseException):
            raise result


def _worker_process(cfg: BenchConfig, index: int, shared: Shared, results: Any) -> None:
    try:
        result = run_loop(_worker(cfg, index, shared), cfg.loop)
    except BaseException as exc:  # report, never hang the parent
        shared.failed.value = 1
        result = {"producers": [], "consumers": [], "errors": [f"worker {index}: {exc!r}\n{traceback.format_exc()}"]}
    results.put(result)


# ---------------------------------------------------------------------------------------------------------------
# the coordinator


def _coordinate(cfg: BenchConfig, shared: Shared, timings: dict[str, float]) -> None:
    connect_deadline = time.monotonic() + cfg.connect_timeout + 5
    while shared.ready.value < cfg.consumers and not shared.failed.value:
        if time.monotonic() > connect_deadline:
            shared.failed.value = 1
            break
        time.sleep(0.002)
    timings["go"] = time.time()
    shared.go.set()
    while shared.producers_done.value < cfg.producers:
        time.sleep(0.005)
    timings["producers_done"] = time.time()
    if cfg.consumers == 0 or shared.failed.value:
        expected = 0
    else:
        messages = shared.receipted.value if cfg.receipts else shared.sent.value
        expected = messages * (cfg.consumers if cfg.kind == "topic" else 1)
    last, last_change = -1, time.monotonic()
    while True:
        delivered = sum(shared.delivered[:])
        if delivered >= expected:
            break
        now = time.monotonic()
        if delivered != last:
            last, last_change = delivered, now
        elif now - last_change > cfg.drain_timeout:
            timings["drain_timed_out"] = 1.0
            break
        time.sleep(0.005)
    shared.stop.set()


def run_workload(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Run the producers and consumers; returns one raw result per worker process."""
    if cfg.processes <= 1:
        shared = Shared(multiprocessing.get_context(), 1)
        timings: dict[str, float] = {}
        coordinator = threading.Thread(target=_coordinate, args=(cfg, shared, timings), daemon=True)
        coordinator.start()
        try:
            result = run_loop(_worker(cfg, 0, shared), cfg.loop)
        finally:
            shared.failed.value = shared.failed.value or 0
        coordinator.join(timeout=cfg.drain_timeout + 10)
        result["timings"] = timings
        return [result]
    ctx = multiprocessing.get_context("spawn")
    shared = Shared(ctx, cfg.processes)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_worker_process, args=(cfg, i, shared, results), name=f"bench-worker-{i}", daemon=True)
        for i in range(cfg.processes)
    ]
    for w in workers:
        w.start()
    timings = {}
    coordinator = threading.Thread(target=_coordinate, args=(cfg, shared, timings), daemon=True)
    coordinator.start()
    collected: list[dict[str, Any]] = []
    while len(collected) < len(workers):
        try:
            collected.append(results.get(timeout=0.5))
        except queue_module.Empty:
            if all(not w.is_alive() for w in workers):
                try:
                    collected.append(results.get(timeout=2))
                except queue_module.Empty:
                    collected.append({"producers": [], "consumers": [], "errors": ["a worker process died"]})
                    shared.failed.value = 1
                    shared.go.set()
                    shared.stop.set()
    for w in workers:
        w.join(timeout=10)
    coordinator.join(timeout=cfg.drain_timeout + 10)
    if collected:
        collected[0]["timings"] = timings
    return collected


# ---------------------------------------------------------------------------------------------------------------
# the report


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 1)) - 1))
    return sorted_values[rank]


def summarize(cfg: BenchConfig, raw: list[dict[str, Any]]) -> dict[str, Any]:
    producers = [p for r in raw for p in r["producers"]]
    consumers = [c for r in raw for c in r["consumers"]]
    errors = [e for r in raw for e in r["errors"]]
    errors += [f"producer {p['id']}: {p['error']}" for p in producers if p["error"]]
    errors += [f"consumer {c['id']}: {c['error']}" for c in consumers if c["error"]]
    timings: dict[str, float] = next((r["timings"] for r in raw if "timings" in r), {})

    sent = sum(p["sent"] for p in producers)
    receipted = sum(p["receipted"] for p in producers) if cfg.receipts else None
    must_arrive: set[int] = set()  # sent and receipted (or just sent without receipts)
    for p in producers:
        missing = set(p["missing_receipts"]) if cfg.receipts else set()
        base = p["id"] << 32
        must_arrive.update(base | s for s in range(p["sent"]) if s not in missing)

    seen_sets = []
    for c in consumers:
        keys = array("Q")
        keys.frombytes(c["keys"])
        seen_sets.append(set(keys))
    duplicates = sum(c["duplicates"] for c in consumers)
    if cfg.kind == "queue":
        union: set[int] = set().union(*seen_sets) if seen_sets else set()
        duplicates += sum(len(s) for s in seen_sets) - len(union)
        lost = len(must_arrive - union) if consumers else 0
        delivered = len(union)
        deliveries = len(union)
    else:
        union = set().union(*seen_sets) if seen_sets else set()
        lost = sum(len(must_arrive - s) for s in seen_sets)
        delivered = len(union)
        deliveries = sum(len(s) for s in seen_sets)

    latencies: list[float] = []
    for c in consumers:
        lat = array("d")
        lat.frombytes(c["latencies"])
        latencies.extend(lat)
    latencies.sort()

    first_send = min((p["first_send"] for p in producers if p["sent"]), default=0)
    last_send = max((p["last_send"] for p in producers), default=0)
    last_delivery = max((c["last_delivery"] for c in consumers), default=0)
    last_receipt = max((p["last_receipt"] for p in producers), default=0)
    span = (last_delivery - first_send) / 1e9 if last_delivery and first_send else 0.0
    send_span = (last_send - first_send) / 1e9 if last_send and first_send else 0.0
    receipt_span = (last_receipt - first_send) / 1e9 if last_receipt and first_send else 0.0

    def rate(count: int | None, seconds: float) -> float | None:
        return round(count / seconds, 1) if count and seconds > 0 else None

    def ms(value: float | None) -> float | None:
        return round(value, 3) if value is not None else None

    summary: dict[str, Any] = {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("passcode",)},
        "sent": sent,
        "receipted": receipted,
        "unreceipted": (sent - receipted) if receipted is not None else None,
        "delivered": delivered,
        "deliveries": deliveries,
        "expected_deliveries": len(must_arrive) * (len(consumers) if cfg.kind == "topic" else (1 if consumers else 0)),
        "frames_received": sum(c["frames"] for c in consumers),
        "lost": lost,
        "duplicated": duplicates,
        "seconds": round(span, 3),
        "msgs_per_s": rate(delivered, span),
        "deliveries_per_s": rate(deliveries, span),
        "send_per_s": rate(sent, send_span),
        "receipts_per_s": rate(receipted, receipt_span) if receipted is not None else None,
        "latency_ms": {
            "samples": len(latencies),
            "p50": ms(_percentile(latencies, 0.50)),
            "p99": ms(_percentile(latencies, 0.99)),
            "max": ms(latencies[-1] if latencies else None),
            "mean": ms(sum(latencies) / len(latencies) if latencies else None),
        },
        "drain_timed_out": bool(timings.get("drain_timed_out")),
        "errors": errors,
    }
    summary["ok"] = lost == 0 and duplicates == 0 and not errors and (sent > 0 or cfg.producers == 0)
    return summary
