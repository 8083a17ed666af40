"""The gateway's queue workload done with pgqueuer (PostgreSQL job queue: asyncpg, SKIP LOCKED, LISTEN/NOTIFY), for
docs/benchmarks.md. Not part of stompgate: run it in a virtualenv of its own (pip install pgqueuer asyncpg).

Producers enqueue 256-byte payloads in batches (each batch one INSERT, committed); consumers are QueueManagers, one
connection each, dequeuing in batches and completing each job (pgqueuer logs completions in batches). Reported:
jobs/s from the first enqueue to the last job's completion, like `stompgate bench`'s msgs/s.

    python docs/peers/pgqueuer_bench.py postgresql://postgres@127.0.0.1:5432/peer --messages 50000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
from pgqueuer import AsyncpgDriver, QueueManager
from pgqueuer.models import Job
from pgqueuer.queries import Queries


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dsn")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="jobs per enqueue call (one INSERT)")
    parser.add_argument("--dequeue-batch", type=int, default=100, help="QueueManager.run(batch_size=...)")
    args = parser.parse_args()

    pgq = Path(sys.executable).with_name("pgq")
    subprocess.run([str(pgq), "--pg-dsn", args.dsn, "uninstall"], capture_output=True, check=False)
    subprocess.run([str(pgq), "--pg-dsn", args.dsn, "install"], capture_output=True, check=True)

    done = 0
    all_done = asyncio.Event()
    managers: list[QueueManager] = []
    consumer_conns = [await asyncpg.connect(args.dsn) for _ in range(args.consumers)]
    for conn in consumer_conns:
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint("bench")
        async def bench(job: Job) -> None:
            nonlocal done
            done += 1
            if done >= args.messages:
                all_done.set()

        managers.append(qm)
    runs = [asyncio.create_task(qm.run(batch_size=args.dequeue_batch)) for qm in managers]

    payload = b"x" * 256
    started = time.perf_counter()

    async def produce(count: int) -> None:
        conn = await asyncpg.connect(args.dsn)
        queries = Queries(AsyncpgDriver(conn))
        sent = 0
        while sent < count:
            n = min(args.batch, count - sent)
            await queries.enqueue(["bench"] * n, [payload] * n, [0] * n)
            sent += n
        await conn.close()

    share = args.messages // args.producers
    await asyncio.gather(*(produce(share + (1 if i < args.messages % args.producers else 0)) for i in range(args.producers)))
    enqueued = time.perf_counter()
    await asyncio.wait_for(all_done.wait(), 600)
    finished = time.perf_counter()
    for qm in managers:
        qm.shutdown.set()
    await asyncio.gather(*runs, return_exceptions=True)
    for conn in consumer_conns:
        await conn.close()
    print(json.dumps({
        "tool": "pgqueuer", "messages": args.messages, "producers": args.producers, "consumers": args.consumers,
        "enqueue_batch": args.batch, "jobs_per_s": round(args.messages / (finished - started), 1),
        "enqueue_per_s": round(args.messages / (enqueued - started), 1), "elapsed_s": round(finished - started, 2),
    }))


if __name__ == "__main__":
    asyncio.run(main())
