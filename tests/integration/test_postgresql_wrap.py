"""The README's "Wrapping an existing collection or table" on PostgreSQL, end to end: rows inserted with asyncpg into a
table the gateway never created, a real gateway configured by a TOML file with a ``[[wrap]]`` table, a stomp.py
consumer with ``ack:client-individual``. An ACK deletes the row; a wrap naming a missing column stops ``serve`` with
one line on stderr."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.gateway_process import Gateway, start_gateway
from tests.integration.stomppy_helpers import connect

pytestmark = [pytest.mark.postgresql, pytest.mark.timeout(120)]

DESTINATION = "/queue/orders.new"


def sql(url: str, statement: str, *args: object) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(statement, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.fixture
def orders(postgresql_url: str) -> Iterator[str]:
    """An existing table of the operator's: two new orders and one done."""
    table = f"orders_{uuid.uuid4().hex[:8]}"
    sql(postgresql_url, f'CREATE TABLE "{table}" (id integer PRIMARY KEY, status text NOT NULL, total numeric)')
    sql(postgresql_url, f"INSERT INTO \"{table}\" VALUES (1, 'new', 9.5), (2, 'new', 20), (3, 'done', 1)")
    yield table
    sql(postgresql_url, f'DROP TABLE "{table}"')


def write_config(tmp_path: Path, store: str, wrap: str) -> Path:
    config = tmp_path / "stompgate.toml"
    config.write_text(f'[stompgate]\nstore = "{store}"\nnamespace = "g{uuid.uuid4().hex[:12]}"\n\n[[wrap]]\n{wrap}')
    return config


@pytest.fixture
def gateway(tmp_path: Path, postgresql_url: str, orders: str) -> Iterator[Gateway]:
    wrap = f'destination = "{DESTINATION}"\ntable = "{orders}"\nfilter = {{ status = "new" }}\n'
    config = write_config(tmp_path, postgresql_url, wrap)
    gw = start_gateway(tmp_path, postgresql_url, ["--config", str(config), "--poll-interval", "0.1"])
    try:
        yield gw
    finally:
        gw.stop()


def test_rows_are_delivered_as_json_and_an_ack_deletes_them(gateway: Gateway, postgresql_url: str, orders: str) -> None:
    consumer = connect(gateway.stomp_port)
    consumer.conn.subscribe(DESTINATION, id="s1", ack="client-individual")
    messages = [consumer.get(timeout=20) for _ in range(2)]
    assert [json.loads(m.body) for m in messages] == [
        {"id": 1, "status": "new", "total": 9.5}, {"id": 2, "status": "new", "total": 20},
    ]  # fmt: skip
    assert all(m.headers["content-type"] == "application/json" for m in messages)
    assert all(m.headers["postgresql-table"] == orders for m in messages)
    assert consumer.nothing()  # order 3 is done: not delivered
    for message in messages:
        receipt = consumer.receipt()
        consumer.ack(message, receipt=receipt)
        consumer.wait_receipt(receipt)  # the RECEIPT of an ACK comes once the row is deleted
    assert [tuple(r) for r in sql(postgresql_url, f'SELECT id, status FROM "{orders}"')] == [(3, "done")]

    # a row the application inserts later is delivered too (within the poll interval)
    sql(postgresql_url, f"INSERT INTO \"{orders}\" VALUES (4, 'new', 5)")
    assert json.loads(consumer.get(timeout=20).body)["id"] == 4
    consumer.disconnect()


def test_a_wrap_naming_a_missing_column_is_one_line_on_stderr(tmp_path: Path, postgresql_url: str, orders: str) -> None:
    wrap = f'destination = "{DESTINATION}"\ntable = "{orders}"\nfilter = {{ statsu = "new" }}\n'
    config = write_config(tmp_path, postgresql_url, wrap)
    result = subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("STOMPGATE_")},
    )  # fmt: skip
    assert result.returncode != 0, result.stderr  # 1, as any store that cannot be opened (2: bad settings)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines == [f'stompgate: wrap {DESTINATION}: table "{orders}" has no column "statsu" (in filter)'], result.stderr
