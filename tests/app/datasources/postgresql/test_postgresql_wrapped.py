"""``[[wrap]]`` of an existing PostgreSQL table: rows matching a filter delivered as JSON, leased in
``<ns>_wrap_leases`` (the table is never altered), consumed by ACK (delete, or the ``ack_set`` update), requeue and
dead-letter, fenced by lease tokens; identifiers quoted and values bound; a mistake is one sentence at open."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from app.datasources.interface import (
    Changes,
    NewMessage,
    DatasourceError,
    DatasourceOptions,
    QueueStats,
    Release,
    StoredMessage,
    WrappedTable,
)
from app.datasources.postgresql import PgDatasource
from app.datasources.registry import open_datasource
from tests.app.api.conftest import api_client

pytestmark = pytest.mark.postgresql

NOW = 1_700_000_000_000
DEST = "/queue/orders.new"
LEASE_MS = 30_000


@pytest.fixture
def namespace() -> str:
    return f"w{uuid.uuid4().hex[:12]}"


@pytest.fixture
def table() -> str:
    return f"orders_{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def conn(postgresql_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(postgresql_url)
    try:
        yield connection
    finally:
        await connection.close()


async def make_orders(conn: asyncpg.Connection, table: str, rows: list[tuple[int, str]]) -> None:
    await conn.execute(f'CREATE TABLE "{table}" (id integer PRIMARY KEY, status text NOT NULL, amount numeric)')
    await conn.executemany(f'INSERT INTO "{table}" (id, status, amount) VALUES ($1, $2, $1::integer * 1.5)', rows)


async def open_wrapped(url: str, namespace: str, *wraps: WrappedTable, **options: Any) -> PgDatasource:
    ds = await open_datasource(url, DatasourceOptions(namespace=namespace, wrapped_tables=wraps, **options))
    assert isinstance(ds, PgDatasource)
    return ds


@pytest.fixture
async def orders(postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection) -> AsyncIterator[PgDatasource]:
    """Orders 3, 1, 2 are new, 4 is done; the wrap delivers the new ones."""
    await make_orders(conn, table, [(3, "new"), (1, "new"), (2, "new"), (4, "done")])
    ds = await open_wrapped(postgresql_url, namespace, WrappedTable(DEST, table, filter={"status": "new"}))
    try:
        yield ds
    finally:
        await ds.close()


async def claim(ds: PgDatasource, owner: str = "a", limit: int = 10, now_ms: int = NOW, lease_ms: int = LEASE_MS) -> list[StoredMessage]:
    return await ds.queues.claim(DEST, owner=owner, limit=limit, lease_ms=lease_ms, now_ms=now_ms)


def ids(messages: list[StoredMessage]) -> list[int]:
    return [json.loads(m.body)["id"] for m in messages]


async def table_ids(conn: asyncpg.Connection, table: str) -> list[int]:
    return [r[0] for r in await conn.fetch(f'SELECT id FROM "{table}" ORDER BY id')]


async def test_matching_rows_are_delivered_as_json_in_key_order(orders: PgDatasource, table: str, namespace: str, conn: asyncpg.Connection) -> None:
    messages = await claim(orders)
    assert [json.loads(m.body) for m in messages] == [
        {"id": n, "status": "new", "amount": float(n * 1.5)} for n in (1, 2, 3)
    ]
    assert all(m.headers == {"content-type": "application/json", "postgresql-table": table} for m in messages)
    assert all(m.destination == DEST and m.deliveries == 1 and m.message_id.startswith("wrapped:") for m in messages)
    assert await claim(orders, owner="b") == []  # all leased
    # the table itself is untouched: the leases are rows of the gateway's own table
    assert [tuple(r) for r in await conn.fetch(f'SELECT id, status FROM "{table}" ORDER BY id')] == [
        (1, "new"), (2, "new"), (3, "new"), (4, "done"),
    ]  # fmt: skip
    assert await conn.fetchval(f'SELECT count(*) FROM "{namespace}_wrap_leases"') == 3


async def test_an_ack_deletes_the_row(orders: PgDatasource, table: str, namespace: str, conn: asyncpg.Connection) -> None:
    first, second, _ = await claim(orders)
    await orders.queues.ack([first.message_id], [first.lease])
    assert await table_ids(conn, table) == [2, 3, 4]
    await orders.queues.ack([second.message_id])  # unfenced: by key alone
    assert await table_ids(conn, table) == [3, 4]
    assert await conn.fetchval(f'SELECT count(*) FROM "{namespace}_wrap_leases"') == 1  # the one still held


async def test_ack_set_updates_the_row_instead_and_it_stays(
    postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection
) -> None:
    await make_orders(conn, table, [(1, "new"), (2, "new")])
    wrap = WrappedTable(DEST, table, filter={"status": "new"}, ack_set={"status": "done", "amount": 0})
    ds = await open_wrapped(postgresql_url, namespace, wrap)
    try:
        first, _ = await claim(ds)
        await ds.queues.ack([first.message_id], [first.lease])
        assert [tuple(r) for r in await conn.fetch(f'SELECT id, status, amount FROM "{table}" ORDER BY id')] == [
            (1, "done", 0), (2, "new", 3),
        ]  # fmt: skip
        assert await claim(ds, owner="b", now_ms=NOW + 2 * LEASE_MS) != []  # 2's lease lapsed; 1 is done
        assert await ds.queues.stats(DEST, now_ms=NOW + 2 * LEASE_MS) == QueueStats(ready=0, unacked=1)
    finally:
        await ds.close()


async def test_an_ack_set_that_leaves_the_row_matching_is_warned_of(
    postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await make_orders(conn, table, [(1, "new")])
    wrap = WrappedTable(DEST, table, filter={"status": "new"}, ack_set={"amount": 0})
    ds = await open_wrapped(postgresql_url, namespace, wrap)
    try:
        [held] = await claim(ds)
        with caplog.at_level(logging.WARNING, "stompgate.datasource.postgresql"):
            await ds.queues.ack([held.message_id], [held.lease])
        assert "still matches the filter" in caplog.text
        assert ids(await claim(ds)) == [1]  # delivered again, as the warning says
    finally:
        await ds.close()


async def test_a_requeued_row_is_delivered_again_counting_its_deliveries(orders: PgDatasource) -> None:
    first, *_ = await claim(orders, limit=1)
    await orders.queues.release([first.message_id], Release.REQUEUE, [first.lease])
    [again] = await claim(orders, owner="b", limit=1)
    assert again.message_id == first.message_id and again.deliveries == 2 and again.lease != first.lease
    await orders.queues.release([first.message_id], Release.REQUEUE, [first.lease])  # stale: b keeps it
    assert ids(await claim(orders, owner="c", limit=1)) == [2]


@pytest.mark.parametrize("ack_set", [None, {"status": "failed"}], ids=["delete", "ack_set"])
async def test_a_dead_lettered_row_is_copied_to_the_dlq_then_acked(
    postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection, ack_set: dict[str, Any] | None
) -> None:
    await make_orders(conn, table, [(1, "new"), (2, "new")])
    ds = await open_wrapped(postgresql_url, namespace, WrappedTable(DEST, table, filter={"status": "new"}, ack_set=ack_set))
    try:
        first, _ = await claim(ds)
        token = ds.queues.wake_token(f"{DEST}.DLQ")
        await ds.queues.release([first.message_id], Release.DEAD_LETTER, [first.lease])
        assert token.is_set()  # its consumers are woken
        await ds.queues.release([first.message_id], Release.DEAD_LETTER, [first.lease])  # a repeat changes nothing
        [dead] = await ds.queues.claim(f"{DEST}.DLQ", owner="x", limit=10, lease_ms=LEASE_MS, now_ms=NOW)
        assert json.loads(dead.body) == {"id": 1, "status": "new", "amount": 1.5}
        assert dead.headers["postgresql-table"] == table and dead.original_destination == DEST
        assert first.message_id in dead.message_id and dead.deliveries == 1
        rows = [tuple(r) for r in await conn.fetch(f'SELECT id, status FROM "{table}" ORDER BY id')]
        assert rows == ([(2, "new")] if ack_set is None else [(1, "failed"), (2, "new")])
        assert await conn.fetchval(f'SELECT count(*) FROM "{namespace}_wrap_leases"') == 1
        # the dead letter is a message of the gateway's own queue: its ACK deletes it, and touches no row
        await ds.queues.ack([dead.message_id], [dead.lease])
        assert await conn.fetchval(f'SELECT count(*) FROM "{namespace}_messages"') == 0
        assert [tuple(r) for r in await conn.fetch(f'SELECT id, status FROM "{table}" ORDER BY id')] == rows
    finally:
        await ds.close()


async def test_after_a_lease_lapses_and_another_claims_the_first_ack_changes_nothing(
    orders: PgDatasource, table: str, conn: asyncpg.Connection
) -> None:
    [old] = await claim(orders, owner="a", limit=1, lease_ms=1_000)
    [new] = await claim(orders, owner="b", limit=1, now_ms=NOW + 2_000)
    assert new.message_id == old.message_id and new.deliveries == 2
    await orders.queues.ack([old.message_id], [old.lease])
    await orders.queues.release([old.message_id], Release.DEAD_LETTER, [old.lease])
    assert await table_ids(conn, table) == [1, 2, 3, 4]
    assert await claim(orders, owner="c", limit=1, now_ms=NOW + 3_000) != [new]  # b still holds 1
    await orders.queues.ack([new.message_id], [new.lease])
    assert await table_ids(conn, table) == [2, 3, 4]


async def test_a_renewed_lease_is_kept(orders: PgDatasource, table: str, conn: asyncpg.Connection) -> None:
    held = await claim(orders, owner="a", lease_ms=1_000)
    await orders.queues.renew("a", lease_ms=10_000, now_ms=NOW + 500)
    assert await claim(orders, owner="b", now_ms=NOW + 5_000) == []
    assert await claim(orders, owner="b", now_ms=NOW + 11_000) != []  # the renewed lease lapses in its turn
    await orders.queues.renew("b", lease_ms=10_000, now_ms=NOW + 11_000)
    await orders.queues.ack([m.message_id for m in held], [m.lease for m in held])  # a's tokens are stale
    assert await table_ids(conn, table) == [1, 2, 3, 4]


async def test_stats_peek_destinations_and_purge(orders: PgDatasource) -> None:
    stats = await orders.queues.stats(DEST, now_ms=NOW)
    assert (stats.ready, stats.unacked) == (3, 0)
    assert ids(await orders.queues.peek(DEST, limit=2, offset=1, now_ms=NOW)) == [2, 3]
    await claim(orders, limit=1)
    stats = await orders.queues.stats(DEST, now_ms=NOW)
    assert (stats.ready, stats.unacked) == (2, 1)
    peeked = await orders.queues.peek(DEST, limit=10, now_ms=NOW)
    assert ids(peeked) == [2, 3] and all(m.deliveries == 0 for m in peeked)
    assert ids(await orders.queues.peek(DEST, limit=10, now_ms=NOW + 2 * LEASE_MS)) == [1, 2, 3]  # lapsed: ready
    assert DEST in await orders.queues.destinations()
    with pytest.raises(DatasourceError, match="refusing to delete its rows"):
        await orders.queues.purge(DEST)


async def test_a_wrap_whose_rows_are_all_consumed_is_not_a_destination(orders: PgDatasource) -> None:
    held = await claim(orders)
    await orders.queues.ack([m.message_id for m in held], [m.lease for m in held])
    assert DEST not in await orders.queues.destinations()


async def test_gateways_racing_deliver_every_row_exactly_once(
    postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection
) -> None:
    rows = 300
    await make_orders(conn, table, [(n, "new") for n in range(rows)])
    wrap = WrappedTable(DEST, table, filter={"status": "new"})
    gateways = [await open_wrapped(postgresql_url, namespace, wrap) for _ in range(2)]
    delivered: list[int] = []

    async def claimer(ds: PgDatasource, owner: str) -> None:
        while True:
            got = await claim(ds, owner=owner, limit=3, now_ms=int(time.time() * 1000))
            if not got:
                return
            delivered.extend(ids(got))

    try:
        await asyncio.gather(*(claimer(ds, f"{g}-{n}") for g, ds in enumerate(gateways) for n in range(4)))
    finally:
        for ds in gateways:
            await ds.close()
    assert sorted(delivered) == list(range(rows))


async def test_identifiers_are_quoted_and_values_bound(
    postgresql_url: str, namespace: str, conn: asyncpg.Connection
) -> None:
    name = f'we"ird; DROP TABLE x; -- {uuid.uuid4().hex[:6]}'
    await conn.execute(f'CREATE TABLE "{name.replace(chr(34), chr(34) * 2)}" ("na""me" text PRIMARY KEY)')
    await conn.execute(f'INSERT INTO "{name.replace(chr(34), chr(34) * 2)}" VALUES ($1), ($2)', "a", "b")
    hostile = WrappedTable(DEST, name, filter={'na"me': {"$in": ["'; DROP TABLE x; --", "b"]}})
    ds = await open_wrapped(postgresql_url, namespace, hostile)
    try:
        [row] = await claim(ds)
        assert json.loads(row.body) == {'na"me': "b"}
        await ds.queues.ack([row.message_id], [row.lease])
    finally:
        await ds.close()
    quoted = name.replace('"', '""')
    assert [r[0] for r in await conn.fetch(f'SELECT "na""me" FROM "{quoted}"')] == ["a"]
    bad_column = WrappedTable(DEST, name, filter={'status"; DROP TABLE x; --': "new"})
    with pytest.raises(DatasourceError, match="has no column"):
        await open_wrapped(postgresql_url, namespace, bad_column)
    assert await conn.fetchval(f'SELECT count(*) FROM "{quoted}"') == 1


async def test_a_composite_primary_key(postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection) -> None:
    await conn.execute(f'CREATE TABLE "{table}" (region text, id integer, PRIMARY KEY (region, id))')
    await conn.execute(f"INSERT INTO \"{table}\" VALUES ('eu', 1), ('us', 1), ('eu', 2)")
    ds = await open_wrapped(postgresql_url, namespace, WrappedTable(DEST, table))
    try:
        messages = await claim(ds)
        assert [json.loads(m.body) for m in messages] == [
            {"region": "eu", "id": 1}, {"region": "eu", "id": 2}, {"region": "us", "id": 1},
        ]  # fmt: skip
        await ds.queues.ack([messages[2].message_id], [messages[2].lease])
        assert [tuple(r) for r in await conn.fetch(f'SELECT * FROM "{table}" ORDER BY region, id')] == [("eu", 1), ("eu", 2)]
    finally:
        await ds.close()


async def test_a_schema_qualified_table_and_a_key_of_choice(
    postgresql_url: str, namespace: str, conn: asyncpg.Connection
) -> None:
    schema = f"shop_{uuid.uuid4().hex[:8]}"
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.execute(f'CREATE TABLE "{schema}".orders (ref text UNIQUE NOT NULL, status text)')  # no primary key
    await conn.execute(f"INSERT INTO \"{schema}\".orders VALUES ('b', 'new'), ('a', 'new'), ('c', NULL)")
    wrap = WrappedTable(DEST, f"{schema}.orders", key=("ref",), filter={"status": {"$ne": None}})
    ds = await open_wrapped(postgresql_url, namespace, wrap)
    try:
        messages = await claim(ds)
        assert [json.loads(m.body)["ref"] for m in messages] == ["a", "b"]
        assert messages[0].headers["postgresql-table"] == f"{schema}.orders"
        await ds.queues.ack([messages[0].message_id], [messages[0].lease])
        assert [r[0] for r in await conn.fetch(f'SELECT ref FROM "{schema}".orders ORDER BY ref')] == ["b", "c"]
    finally:
        await ds.close()


FILTERS = {  # filter -> the ids of orders 1 (new, 1.5), 2 (new, 3.0), 3 (done, 4.5) it matches
    "plain": ({"status": "new"}, [1, 2]),
    "$gt/$lte": ({"amount": {"$gt": 1.5, "$lte": 4.5}}, [2, 3]),
    "$in": ({"id": {"$in": [1, 3, 99]}}, [1, 3]),
    "$nin": ({"id": {"$nin": [1, 3]}}, [2]),
    "$or": ({"$or": [{"id": 1}, {"status": "done"}]}, [1, 3]),
    "$nor": ({"$nor": [{"id": 1}, {"status": "done"}]}, [2]),
    "$not": ({"amount": {"$not": {"$gt": 2}}}, [1]),
    "$regex": ({"status": {"$regex": "^d"}}, [3]),
    "$exists": ({"amount": {"$exists": True}, "status": {"$ne": "new"}}, [3]),
    "null": ({"amount": None}, []),
}


@pytest.mark.parametrize("case", sorted(FILTERS))
async def test_filter_operators(case: str, postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection) -> None:
    query, expected = FILTERS[case]
    await make_orders(conn, table, [(1, "new"), (2, "new"), (3, "done")])
    ds = await open_wrapped(postgresql_url, namespace, WrappedTable(DEST, table, filter=query))
    try:
        assert ids(await ds.queues.peek(DEST, limit=10, now_ms=NOW)) == expected
    finally:
        await ds.close()


async def test_a_notification_wakes_a_waiter_at_once_and_without_one_it_polls(
    postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection
) -> None:
    await make_orders(conn, table, [])
    ds = await open_wrapped(postgresql_url, namespace, WrappedTable(DEST, table), poll_interval=30.0)
    try:
        token = ds.queues.wake_token(DEST)
        waiter = asyncio.ensure_future(ds.queues.wait(DEST, 600, token))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        # what the README suggests the application runs (e.g. from a trigger) after inserting a row
        await conn.execute(f'INSERT INTO "{table}" VALUES (1, $1)', "new")
        await conn.execute("SELECT pg_notify($1, $2)", f"{namespace}_wake", f"p4:{DEST}")
        await asyncio.wait_for(waiter, 10)  # long before the 30 s poll interval
    finally:
        await ds.close()
    ds = await open_wrapped(postgresql_url, namespace, WrappedTable(DEST, table), poll_interval=0.2)
    try:
        # the poll interval, not the 600 s asked for
        await asyncio.wait_for(ds.queues.wait(DEST, 600, ds.queues.wake_token(DEST)), 5)
    finally:
        await ds.close()


START_UP_ERRORS = {
    "missing table": (
        lambda t: WrappedTable(DEST, f"{t}_missing"), r'^wrap /queue/orders\.new: table "orders_\w+_missing" does not exist'
    ),
    "missing column": (
        lambda t: WrappedTable(DEST, t, filter={"statsu": "new"}), r'^wrap /queue/orders\.new: table "orders_\w+" has no column "statsu"'
    ),
    "missing ack_set column": (
        lambda t: WrappedTable(DEST, t, ack_set={"don": True}), r'has no column "don" \(in ack_set\)'
    ),
    "wrong value type": (
        lambda t: WrappedTable(DEST, t, filter={"id": "seven"}), r"^wrap /queue/orders\.new: the value of filter\.id does not fit"
    ),
    "wrong ack_set type": (
        lambda t: WrappedTable(DEST, t, ack_set={"amount": "lots"}), r"the value of ack_set\.amount does not fit"
    ),
    "regex on a number": (
        lambda t: WrappedTable(DEST, t, filter={"id": {"$regex": "1"}}), r"^wrap /queue/orders\.new: PostgreSQL refused"
    ),
    "no primary key": (lambda t: WrappedTable(DEST, f"{t}_nokey"), r"has no primary key; name the columns"),
    # an ACK deletes by the key and a lease is kept by it: a key must name one row, and NULL names none
    "nullable key": (lambda t: WrappedTable(DEST, t, key=("amount",)), r'the key column "amount" of table "orders_\w+" may be NULL'),
    "key not unique": (lambda t: WrappedTable(DEST, t, key=("status",)), r"no unique index of table \S+ is on exactly the key"),
}


@pytest.mark.parametrize("case", sorted(START_UP_ERRORS))
async def test_a_mistake_is_one_sentence_at_open(
    case: str, postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection
) -> None:
    make, pattern = START_UP_ERRORS[case]
    await make_orders(conn, table, [(1, "new")])
    await conn.execute(f'CREATE TABLE "{table}_nokey" (id integer)')
    with pytest.raises(DatasourceError, match=pattern) as raised:
        await open_wrapped(postgresql_url, namespace, make(table))
    assert "\n" not in str(raised.value)
    assert await table_ids(conn, table) == [1]


async def test_an_ack_of_a_row_that_arrives_with_sends_deletes_the_row(
    orders: PgDatasource, conn: asyncpg.Connection, table: str
) -> None:
    # Group commit writes SENDs and the ACKs that came with them as one apply: a wrapped row's ACK must still reach
    # its table, not the gateway's own messages.
    first = (await claim(orders, limit=1))[0]
    send = NewMessage(message_id=f"s-{uuid.uuid4().hex}", destination="/queue/other", headers={}, body=b"x")
    await orders.apply(Changes(queue=[send], acks=[(first.message_id, first.lease)]))
    assert await conn.fetchval(f'SELECT count(*) FROM "{table}" WHERE id = 1') == 0
    assert (await orders.queues.stats("/queue/other", now_ms=NOW)).ready == 1


# -- found by review: each of these failed before its fix --------------------------------------------------------


async def one_row_table(conn: asyncpg.Connection, table: str, columns: str, values: str) -> None:
    await conn.execute(f'CREATE TABLE "{table}" ({columns})')
    await conn.execute(f'INSERT INTO "{table}" VALUES {values}')


@pytest.mark.parametrize("columns", ["k integer PRIMARY KEY, t text", "t integer PRIMARY KEY, k text"])
async def test_columns_named_like_the_statements_aliases_are_columns(
    columns: str, postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection
) -> None:
    # A bare alias in SQL names a column of that name first: the key of a table keyed "k" was the number, not the
    # row, and every ACK failed; a column "t" became the body.
    await one_row_table(conn, table, columns, "(1, 'x')")
    ds = await open_wrapped(postgresql_url, namespace, WrappedTable(DEST, table))
    try:
        [m] = await claim(ds)
        assert sorted(json.loads(m.body)) == ["k", "t"]
        await ds.queues.ack([m.message_id], [m.lease])
        assert await conn.fetchval(f'SELECT count(*) FROM "{table}"') == 0
    finally:
        await ds.close()


async def test_a_not_null_domain_column_does_not_stop_acks(
    postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection
) -> None:
    # The key JSON read back as a whole row of the table checked every other column's domain (NOT NULL): now only
    # the key columns are read back, as their own types.
    domain = f"d_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE DOMAIN {domain} AS text NOT NULL")
    await one_row_table(conn, table, f"id integer PRIMARY KEY, note {domain}", "(1, 'x')")
    ds = await open_wrapped(postgresql_url, namespace, WrappedTable(DEST, table))
    try:
        [m] = await claim(ds)
        send = NewMessage(message_id=f"s-{uuid.uuid4().hex}", destination="/queue/other", headers={}, body=b"x")
        await ds.apply(Changes(queue=[send], acks=[(m.message_id, m.lease)]))
        assert await conn.fetchval(f'SELECT count(*) FROM "{table}"') == 0
    finally:
        await ds.close()


async def test_a_float_key_is_the_same_text_whatever_the_sessions_float_digits(
    postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection
) -> None:
    # With extra_float_digits=0 (from the URL, a role or the database) 0.30000000000000004 printed as 0.3: the ACK of
    # that row deleted the row 0.3 and left its own.
    await one_row_table(conn, table, "x float8 PRIMARY KEY, status text", "(0.1::float8 + 0.2::float8, 'new'), (0.3, 'done')")
    url = postgresql_url + ("&" if "?" in postgresql_url else "?") + "extra_float_digits=0"
    ds = await open_wrapped(url, namespace, WrappedTable(DEST, table, filter={"status": "new"}))
    try:
        [m] = await claim(ds)
        await ds.queues.ack([m.message_id], [m.lease])
        assert [r[0] for r in await conn.fetch(f'SELECT status FROM "{table}"')] == ["done"]
    finally:
        await ds.close()


async def test_gateways_in_other_time_zones_lease_a_timestamp_key_once(
    postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection
) -> None:
    await one_row_table(conn, table, "at timestamptz PRIMARY KEY, status text", "('2024-01-01 12:00:00+00', 'new')")
    sep = "&" if "?" in postgresql_url else "?"
    a = await open_wrapped(postgresql_url + sep + "timezone=UTC", namespace, WrappedTable(DEST, table))
    b = await open_wrapped(postgresql_url + sep + "TimeZone=Asia/Tokyo", namespace, WrappedTable(DEST, table))
    try:
        assert len(await claim(a, owner="a")) == 1
        assert await claim(b, owner="b") == []
    finally:
        await a.close()
        await b.close()


async def test_a_lease_token_is_never_handed_out_twice(
    postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection
) -> None:
    # An ACK deletes the lease row; the next lease of that key started again at token 1, so a stale consumer's ACK
    # under token 1 took effect on a later delivery of the row.
    await one_row_table(conn, table, "id integer PRIMARY KEY, status text", "(1, 'new')")
    wrap = WrappedTable(DEST, table, filter={"status": "new"}, ack_set={"status": "done"})
    ds = await open_wrapped(postgresql_url, namespace, wrap)
    try:
        [stale] = await claim(ds, owner="a", lease_ms=1_000)
        [b] = await claim(ds, owner="b", now_ms=NOW + 2_000)
        await ds.queues.ack([b.message_id], [b.lease])
        await conn.execute(f"UPDATE \"{table}\" SET status = 'new' WHERE id = 1")
        [c] = await claim(ds, owner="c", now_ms=NOW + 3_000)
        assert len({stale.lease, b.lease, c.lease}) == 3
        await ds.queues.ack([stale.message_id], [stale.lease])
        assert await conn.fetchval(f'SELECT status FROM "{table}" WHERE id = 1') == "new"
    finally:
        await ds.close()


@pytest.mark.parametrize("how", ["ack", "dead-letter"])
async def test_a_row_the_application_moved_out_of_the_filter_is_left_alone(
    how: str, postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection
) -> None:
    await one_row_table(conn, table, "id integer PRIMARY KEY, status text", "(1, 'new')")
    ds = await open_wrapped(postgresql_url, namespace, WrappedTable(DEST, table, filter={"status": "new"}))
    try:
        [m] = await claim(ds)
        await conn.execute(f"UPDATE \"{table}\" SET status = 'cancelled' WHERE id = 1")
        if how == "ack":
            await ds.queues.ack([m.message_id], [m.lease])
        else:
            await ds.queues.release([m.message_id], Release.DEAD_LETTER, [m.lease])
            assert await ds.queues.stats(f"{DEST}.DLQ", now_ms=NOW) == QueueStats(ready=0, unacked=0)
        assert await conn.fetchval(f'SELECT status FROM "{table}" WHERE id = 1') == "cancelled"
    finally:
        await ds.close()


async def test_a_rest_purge_of_a_wrapped_table_is_a_409_problem(
    postgresql_url: str, namespace: str, table: str, conn: asyncpg.Connection
) -> None:
    # The backend refuses to delete an application's rows in bulk; that is the caller's request refused, not a 500.
    await make_orders(conn, table, [(1, "new")])
    wrap = [{"destination": DEST, "table": table}]
    async with api_client(raise_app_exceptions=False, store=postgresql_url, namespace=namespace, wrap=wrap) as api:
        response = await api.client.delete(f"/messages/queue/{DEST.removeprefix('/queue/')}")
        assert response.status_code == 409, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "refusing to delete its rows" in response.json()["detail"]
    assert await table_ids(conn, table) == [1]
