"""``stompgate bench --baseline MONGODB_URL``: the MongoDB backend driven without a gateway, against the test
MongoDB server (FerretDB); the same with PostgreSQL and Redis, on their test servers.

Uses the ``mongodb_url`` fixture, which fails (not skips) when FerretDB is missing and ``CI=true``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
import redis

pytestmark = pytest.mark.timeout(120)


def run_baseline(cwd: Path, url: str, *args: str) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--json", "--drain-timeout", "10", "--baseline", url, *args],
        check=False, capture_output=True, text=True, timeout=110, cwd=cwd,
    )  # fmt: skip
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_queue_baseline_claims_every_message_once(tmp_path: Path, mongodb_url: str) -> None:
    code, report = run_baseline(
        tmp_path, mongodb_url, "--baseline-variant", "queue-claim", "--messages", "300", "--baseline-batch", "32"
    )
    assert report["mode"] == "baseline"
    [run] = report["runs"]
    assert run["variant"] == "queue-claim"
    assert run["exactly_once"] is True
    assert run["errors"] == []
    assert (run["sent"], run["delivered"], run["lost"], run["duplicated"]) == (300, 300, 0, 0)
    assert run["msgs_per_s"] > 0
    assert run["latency_ms"]["samples"] == 300
    assert code == 0


def test_topic_baseline_shared_cursor_fans_out(tmp_path: Path, mongodb_url: str) -> None:
    code, report = run_baseline(
        tmp_path, mongodb_url, "--destination-kind", "topic", "--baseline-variant", "topic-shared-cursor",
        "--messages", "40", "--producers", "1", "--consumers", "2",
    )  # fmt: skip
    [run] = report["runs"]
    assert run["errors"] == []
    assert run["cursors"] == 1
    assert (run["sent"], run["deliveries"], run["lost"], run["duplicated"]) == (40, 80, 0, 0)
    assert code == 0


def test_topic_baseline_blocks_across_two_gateways(tmp_path: Path, mongodb_url: str) -> None:
    """FerretDB's topic path: each simulated gateway takes its own publishes from memory and reads the other's."""
    code, report = run_baseline(
        tmp_path, mongodb_url, "--destination-kind", "topic", "--baseline-variant", "topic-blocks", "--gateways", "2",
        "--messages", "600", "--producers", "2", "--consumers", "2", "--baseline-batch", "16",
    )  # fmt: skip
    [run] = report["runs"]
    assert run["errors"] == []
    assert run["cursors"] == 2
    assert (run["sent"], run["deliveries"], run["lost"], run["duplicated"]) == (600, 1200, 0, 0)
    assert code == 0


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--baseline", "mongodb://127.0.0.1:1/", "--baseline-variant", "x"],
        check=False, capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "unknown --baseline-variant" in proc.stderr


def test_gateways_needs_spawn(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--gateways", "2", "--messages", "1"],
        check=False, capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--gateways needs --spawn" in proc.stderr


@pytest.mark.postgresql
@pytest.mark.parametrize(("kind", "variant", "deliveries"), [("queue", "queue-claim", 600), ("topic", "topic-log", 1200)])
def test_postgresql_baseline(tmp_path: Path, postgresql_url: str, kind: str, variant: str, deliveries: int) -> None:
    tables_before = count_tables(postgresql_url)
    code, report = run_baseline(
        tmp_path, postgresql_url, "--destination-kind", kind, "--messages", "600", "--producers", "2",
        "--consumers", "2", "--gateways", "2", "--baseline-batch", "32",
    )  # fmt: skip
    assert report["server"]["postgresql"]
    (run,) = report["runs"]
    assert run["variant"] == variant
    assert (run["sent"], run["deliveries"], run["lost"], run["duplicated"]) == (600, deliveries, 0, 0)
    assert code == 0
    assert count_tables(postgresql_url) == tables_before  # the bench dropped every table it made


def count_tables(url: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"))
        finally:
            await conn.close()

    return asyncio.run(count())


@pytest.mark.redis
@pytest.mark.parametrize(("kind", "variant", "deliveries"), [("queue", "queue-claim", 600), ("topic", "topic-log", 1200)])
def test_redis_baseline(tmp_path: Path, redis_url: str, kind: str, variant: str, deliveries: int) -> None:
    keys_before = count_keys(redis_url)
    code, report = run_baseline(
        tmp_path, redis_url, "--destination-kind", kind, "--messages", "600", "--producers", "2",
        "--consumers", "2", "--gateways", "2", "--baseline-batch", "32",
    )  # fmt: skip
    assert report["server"]["redis"]
    assert report["server"]["appendfsync"] == "always"  # the test server's; the report names it
    (run,) = report["runs"]
    assert run["variant"] == variant
    assert run["errors"] == []
    assert (run["sent"], run["deliveries"], run["lost"], run["duplicated"]) == (600, deliveries, 0, 0)
    assert code == 0
    assert count_keys(redis_url) == keys_before  # the bench deleted every key it made, the write marks included


def count_keys(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.dbsize())
    finally:
        client.close()
