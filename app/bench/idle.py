"""``--idle-connections N``: open N CONNECTed STOMP connections, hold them, and report the server's resident memory
and the CPU it spent while they were idle. With ``--subscriptions-per-connection K`` each connection also holds K
queue subscriptions on queues nobody sends to: an idle subscription should cost (next to) nothing."""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

from app.bench.client import BenchClient, open_client
from app.bench.spawn import read_cpu_seconds, read_rss_kb

__all__ = ["run_idle"]

CONNECT_CONCURRENCY = 200


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


async def run_idle(
    *,
    host: str,
    port: int,
    count: int,
    hold: float,
    pid: int | None,
    version: str,
    vhost: str,
    login: str | None,
    passcode: str | None,
    connect_timeout: float,
    subscriptions: int = 0,
    websocket_path: str | None = None,
) -> dict[str, Any]:
    raise_fd_limit(count)
    rss_before = read_rss_kb(pid) if pid else None
    clients: list[BenchClient] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one() -> None:
        async with gate:
            try:
                client = await open_client(
                    host, port, version=version, vhost=vhost, login=login, passcode=passcode, timeout=connect_timeout,
                    websocket_path=websocket_path,
                )
                clients.append(client)
                if subscriptions:
                    n = len(clients)
                    for i in range(subscriptions):
                        last = i == subscriptions - 1
                        receipt = f"idle-sub-{n}" if last else None
                        client.conn.subscribe(f"/queue/bench.idle.{n}.{i}", str(i), receipt=receipt)
                    waiter = client.expect_receipt(f"idle-sub-{n}")
                    client.flush()
                    await asyncio.wait_for(waiter, connect_timeout)
            except Exception as exc:  # count and report, keep going
                failures.append(repr(exc))

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(count)))
    connect_seconds = time.monotonic() - started
    samples: list[int] = []
    cpu_before = read_cpu_seconds(pid) if pid else None
    held_from = time.monotonic()
    end = held_from + hold
    while True:
        if pid:
            rss = read_rss_kb(pid)
            if rss is not None:
                samples.append(rss)
        if time.monotonic() >= end:
            break
        await asyncio.sleep(min(0.5, max(0.0, end - time.monotonic())))
    cpu_after = read_cpu_seconds(pid) if pid else None
    held_for = time.monotonic() - held_from
    cpu_share = (
        round((cpu_after - cpu_before) / held_for, 4) if cpu_before is not None and cpu_after is not None and held_for else None
    )
    alive = sum(1 for c in clients if not c.closed and c.error is None)
    for c in clients:
        c.close()
    await asyncio.sleep(0.1)
    rss_held = max(samples) if samples else None
    per_connection = (
        round((rss_held - rss_before) / len(clients), 2) if rss_held is not None and rss_before is not None and clients else None
    )
    return {
        "mode": "idle-connections",
        "requested": count,
        "connected": len(clients),
        "alive_at_end": alive,
        "failed": len(failures),
        "failures": sorted(set(failures))[:5],
        "connect_seconds": round(connect_seconds, 3),
        "hold_seconds": hold,
        "pid": pid,
        "rss_before_kb": rss_before,
        "rss_held_kb": rss_held,
        "rss_held_mib": round(rss_held / 1024, 1) if rss_held is not None else None,
        "rss_per_connection_kb": per_connection,
        "subscriptions": len(clients) * subscriptions,
        "server_cpu_while_idle": cpu_share,  # CPU seconds per second (1.0 = one core busy) while held
        "ok": len(clients) == count and alive == count,
    }
