"""PostgreSQL-only behaviour: topic positions commit in number order, other gateways' work wakes a waiter through
LISTEN/NOTIFY, the schema is versioned, a COMMIT is one transaction, and start-up failures are one sentence."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from app.datasources.interface import (
    Changes,
    DatasourceError,
    DatasourceOptions,
    DatasourceUnavailable,
    NewMessage,
    Published,
    ScanMark,
)
from app.datasources.postgresql import PgDatasource
from app.datasources.postgresql.store import SCHEMA_VERSION
from app.datasources.registry import open_datasource
from tests.gateway_process import free_port

pytestmark = pytest.mark.postgresql

NOW = 1_700_000_000_000


def msg(n: int | str, destination: str = "/queue/pg", priority: int = 4) -> NewMessage:
    return NewMessage(
        message_id=f"m-{n}-{uuid.uuid4().hex[:8]}", destination=destination, headers={"n": str(n)}, body=b"x",
        priority=priority, published_at=NOW,
    )  # fmt: skip


@pytest.fixture
def namespace() -> str:
    return f"p{uuid.uuid4().hex[:12]}"


async def open_pg(url: str, namespace: str, **options: object) -> PgDatasource:
    ds = await open_datasource(url, DatasourceOptions(namespace=namespace, **options))  # type: ignore[arg-type]
    assert isinstance(ds, PgDatasource)
    return ds


@pytest.fixture
async def two_gateways(postgresql_url: str, namespace: str) -> AsyncIterator[tuple[PgDatasource, PgDatasource]]:
    a, b = await open_pg(postgresql_url, namespace), await open_pg(postgresql_url, namespace)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def waiting_on_locks(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"))


async def test_a_follower_never_passes_a_position_whose_transaction_is_open(
    two_gateways: tuple[PgDatasource, PgDatasource], postgresql_url: str
) -> None:
    a, b = two_gateways
    follower = b.topics.follow(after=0)
    # Gateway A's publish of m1 is held open in the middle of its transaction (after taking its position).
    async with a.store.connection() as held:
        tx = held.transaction()
        await tx.start()
        first = await a._topics.publish_in(held, [msg(1, "/topic/t")])
        # Meanwhile gateway B publishes m2: it must not commit a position past m1's while m1 is uncommitted.
        second = asyncio.ensure_future(b.topics.publish([msg(2, "/topic/t")]))
        probe = await asyncpg.connect(postgresql_url)
        try:
            # B's publish must come to wait for A's head row lock (were positions a sequence's, it would complete)
            while not second.done() and await waiting_on_locks(probe) == 0:
                await asyncio.sleep(0.01)
        finally:
            await probe.close()
        assert not second.done()
        await tx.commit()
    assert first == 1
    assert await asyncio.wait_for(second, 10) == [2]
    seen = []
    async for event in follower:
        assert isinstance(event, Published)
        seen.append((event.position, event.message.headers["n"]))
        if len(seen) == 2:
            break
    assert seen == [(1, "1"), (2, "2")]


async def test_a_rolled_back_publish_leaves_no_hole(two_gateways: tuple[PgDatasource, PgDatasource]) -> None:
    a, b = two_gateways
    async with a.store.connection() as conn:
        tx = conn.transaction()
        await tx.start()
        await a._topics.publish_in(conn, [msg(1, "/topic/t"), msg(2, "/topic/t")])
        await tx.rollback()
    assert await b.topics.publish([msg(3, "/topic/t")]) == [1]


async def test_another_gateways_put_wakes_a_waiter(two_gateways: tuple[PgDatasource, PgDatasource]) -> None:
    a, b = two_gateways
    assert a.store.listening and b.store.listening and not a.shared
    token = b.queues.wake_token("/queue/pg")
    waiter = asyncio.ensure_future(b.queues.wait("/queue/pg", 600, token))
    await a.queues.put([msg(1)])
    await asyncio.wait_for(waiter, 30)  # long before the 600 s timeout: the notification woke it
    [claimed] = await b.queues.claim("/queue/pg", owner="b", limit=5, lease_ms=30_000, now_ms=NOW)
    assert claimed.headers == {"n": "1"}


async def test_another_gateways_publish_wakes_a_follower(two_gateways: tuple[PgDatasource, PgDatasource]) -> None:
    a, b = two_gateways
    follower = b.topics.follow(after=None)
    nxt = asyncio.ensure_future(anext(follower))
    await a.topics.publish([msg(1, "/topic/t")])
    event = await asyncio.wait_for(nxt, 30)  # the follower waits IDLE_RECHECK_S between looks: woken before that
    assert isinstance(event, Published) and event.position == 1


async def test_expired_messages_are_deleted_not_kept(postgresql_url: str, namespace: str) -> None:
    ds = await open_pg(postgresql_url, namespace)
    try:
        expired = [NewMessage(message_id=f"x{i}", destination="/queue/pg", headers={}, body=b"", expires_at=NOW - 1)
                   for i in range(3)]  # fmt: skip
        await ds.queues.put([*expired, msg("live")])
        [live] = await ds.queues.claim("/queue/pg", owner="a", limit=10, lease_ms=30_000, now_ms=NOW)
        assert live.headers == {"n": "live"}
        count = await ds.store.run(lambda c: c.fetchval(f'SELECT count(*) FROM "{namespace}_messages"'))
        assert count == 1  # only the live one, claimed: the expired ones were deleted at claim time
    finally:
        await ds.close()


def red(headers: object) -> bool:
    return getattr(headers, "get")("n") in ("late", "early", "M", "N")


async def test_a_selector_scan_finds_a_message_that_committed_behind_its_mark(
    two_gateways: tuple[PgDatasource, PgDatasource],
) -> None:
    # seq is taken at insert and seen at commit: "late" took the lower seq but commits after "early" was scanned.
    a, _ = two_gateways
    mark = ScanMark()
    async with a.store.connection() as held:
        tx = held.transaction()
        await tx.start()
        await a._queues.put_in(held, [msg("late")])
        await a.queues.put([msg("early")])
        got = await a.queues.claim("/queue/pg", owner="a", limit=1, lease_ms=60_000, now_ms=NOW, selector=red, scan=mark)
        assert [m.headers["n"] for m in got] == ["early"]
        token = a.queues.wake_token("/queue/pg")
        await tx.commit()
    await a.queues.wait("/queue/pg", 60, token)  # its notification came
    got = await a.queues.claim("/queue/pg", owner="a", limit=1, lease_ms=60_000, now_ms=NOW, selector=red, scan=mark)
    assert [m.headers["n"] for m in got] == ["late"]


async def test_a_lapsed_lease_requeued_by_a_selector_claim_reaches_other_gateways(
    two_gateways: tuple[PgDatasource, PgDatasource],
) -> None:
    a, c = two_gateways
    await a.queues.put([msg("M"), msg("N")])
    [m] = await a.queues.claim("/queue/pg", owner="gone", limit=1, lease_ms=1_000, now_ms=NOW)  # then gone
    assert m.headers["n"] == "M"
    mark_c = ScanMark()
    got = await c.queues.claim("/queue/pg", owner="c", limit=1, lease_ms=60_000, now_ms=NOW, selector=red, scan=mark_c)
    assert [x.headers["n"] for x in got] == ["N"]  # C's mark is past M now
    token = c.queues.wake_token("/queue/pg")
    # A selector subscription on A that matches nothing looks after M's lease lapsed, and so puts M back.
    nothing = await a.queues.claim(
        "/queue/pg", owner="a", limit=1, lease_ms=60_000, now_ms=NOW + 5_000, selector=lambda h: False, scan=ScanMark()
    )
    assert nothing == []
    await c.queues.wait("/queue/pg", 60, token)  # told by A's notification
    got = await c.queues.claim(
        "/queue/pg", owner="c", limit=1, lease_ms=60_000, now_ms=NOW + 5_000, selector=red, scan=mark_c
    )
    assert [x.headers["n"] for x in got] == ["M"]


async def test_a_live_follower_starts_after_what_other_gateways_published(
    two_gateways: tuple[PgDatasource, PgDatasource],
) -> None:
    a, b = two_gateways
    told = b._topics._signals.event("log")
    await a.topics.publish([msg(f"old{i}", "/topic/t") for i in range(3)])
    await b._topics._signals.wait("log", 60, told)  # A's notification reached B (B itself published and read nothing)
    follower = b.topics.follow(after=None)
    await a.topics.publish([msg("new", "/topic/t")])
    event = await asyncio.wait_for(anext(follower), 30)
    assert isinstance(event, Published) and (event.position, event.message.headers["n"]) == (4, "new")


async def test_a_namespace_too_long_in_bytes_is_refused(postgresql_url: str) -> None:
    with pytest.raises(DatasourceError, match="too long"):
        await open_pg(postgresql_url, "é" * 26 + "a")  # 27 characters, 53 bytes: index names would be cut


async def test_a_value_the_driver_cannot_send_fails_the_call_not_the_buffer(postgresql_url: str, namespace: str) -> None:
    # The caller's error: a DatasourceError (not the driver's own exception), and not an outage, which the failover
    # buffer would replay forever, holding back every later write.
    ds = await open_pg(postgresql_url, namespace)
    try:
        bad = msg("bad")
        bad.expires_at = "soon"  # type: ignore[assignment]
        with pytest.raises(DatasourceError) as raised:
            await asyncio.wait_for(ds.queues.put([bad]), 30)
        assert raised.type is DatasourceError
        await asyncio.wait_for(ds.queues.put([msg("fine")]), 30)
    finally:
        await ds.close()


async def test_a_write_replayed_after_its_answer_was_lost_takes_effect_once(
    two_gateways: tuple[PgDatasource, PgDatasource], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The injected fault: the put commits, then its connection goes before the answer comes (as DatasourceUnavailable,
    # so the failover buffer replays it). Meanwhile gateway B delivers the message and its ACK deletes it.
    a, b = two_gateways
    original = a.store.run
    calls = 0
    consumed = asyncio.Event()

    async def lossy_run(work: Any, *, transaction: bool = True) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # the replay's first look at the database: only after B consumed the message
            await consumed.wait()
        result = await original(work, transaction=transaction)
        if calls == 1:
            raise DatasourceUnavailable("PostgreSQL: connection was closed in the middle of operation")
        return result

    monkeypatch.setattr(a.store, "run", lossy_run)
    token = b.queues.wake_token("/queue/pg")
    put = asyncio.ensure_future(a.queues.put([msg("once")]))
    await b.queues.wait("/queue/pg", 60, token)  # the first try committed (its notification came)
    [got] = await b.queues.claim("/queue/pg", owner="b", limit=5, lease_ms=30_000, now_ms=NOW)
    await b.queues.ack([got.message_id], [got.lease])
    consumed.set()
    await asyncio.wait_for(put, 30)
    assert calls >= 2
    assert await b.queues.claim("/queue/pg", owner="b", limit=5, lease_ms=30_000, now_ms=NOW) == []  # not stored again


async def test_a_replay_while_the_first_try_still_runs_on_the_server_takes_effect_once(
    postgresql_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The injected fault: the first try's statement ran on the server and its transaction is still open when the
    # connection's answer is lost (DatasourceUnavailable, so the failover buffer replays). The replay must not look
    # for the mark before that transaction ends (it would not see it, and store the message again or fail on the
    # duplicate): it waits for it, and does nothing once it committed.
    ds = await open_pg(postgresql_url, namespace)
    original = ds.store.run
    first_try: asyncio.Future[tuple[asyncpg.Connection, Any]] = asyncio.get_running_loop().create_future()
    calls = 0

    async def answer_lost_mid_transaction(work: Any, *, transaction: bool = True) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:
            return await original(work, transaction=transaction)
        held = await asyncpg.connect(postgresql_url)
        open_transaction = held.transaction()
        await open_transaction.start()
        await work(held)
        first_try.set_result((held, open_transaction))
        raise DatasourceUnavailable("PostgreSQL: connection was closed in the middle of operation")

    monkeypatch.setattr(ds.store, "run", answer_lost_mid_transaction)
    put = asyncio.ensure_future(ds.queues.put([msg("once")]))
    held, open_transaction = await asyncio.wait_for(first_try, 30)
    try:
        # the replay is under way once it waits for the first try's lock, or has ended (old code: an error)
        while not put.done() and not await held.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ):
            await asyncio.sleep(0.01)
        await open_transaction.commit()
        await asyncio.wait_for(put, 30)
        got = await ds.queues.claim("/queue/pg", owner="a", limit=5, lease_ms=30_000, now_ms=NOW)
        assert [m.headers["n"] for m in got] == ["once"]
    finally:
        await held.close()
        await ds.close()


async def test_a_claim_beside_lapsed_leases_wakes_a_claimer_it_left_empty(
    two_gateways: tuple[PgDatasource, PgDatasource],
) -> None:
    a, b = two_gateways
    await a.queues.put([msg("hi", priority=9), msg("lo", priority=1)])
    [hi] = await a.queues.claim("/queue/pg", owner="gone", limit=1, lease_ms=1, now_ms=NOW)  # its lease lapses
    async with a.store.connection() as other:  # A's claim of one, held open: it locks "hi" (lapsed) and "lo" (ready)
        tx = other.transaction()
        await tx.start()
        wake = (a.store.channel, "r:/queue/pg")
        picked = await other.fetch(a._queues._sql_claim, "/queue/pg", NOW + 10, "a", NOW + 60_000, 1, *wake)
        assert [r[0] for r in picked] == [hi.message_id]
        token = b.queues.wake_token("/queue/pg")
        assert await b.queues.claim("/queue/pg", owner="b", limit=1, lease_ms=60_000, now_ms=NOW + 10) == []
        await tx.commit()
    await b.queues.wait("/queue/pg", 600, token)  # woken at A's commit, not after a poll interval
    [lo] = await b.queues.claim("/queue/pg", owner="b", limit=1, lease_ms=60_000, now_ms=NOW + 10)
    assert lo.headers["n"] == "lo"


async def test_a_commit_is_one_transaction(two_gateways: tuple[PgDatasource, PgDatasource]) -> None:
    a, _ = two_gateways
    await a.queues.put([msg("held")])
    [held] = await a.queues.claim("/queue/pg", owner="a", limit=1, lease_ms=30_000, now_ms=NOW)
    existing = msg("dup")
    await a.queues.put([existing])
    changes = Changes(queue=[msg("new")], topic=[msg("t", "/topic/t")], acks=[(held.message_id, held.lease)])
    with pytest.raises(DatasourceError):  # the topic and ACK parts are fine; the duplicate id spoils the lot
        await a.apply(Changes(queue=[*changes.queue, existing], topic=changes.topic, acks=changes.acks))
    assert await a.topics.last_position() == 0
    stats = await a.queues.stats("/queue/pg", now_ms=NOW)
    assert (stats.ready, stats.unacked) == (1, 1)  # "dup" ready, "held" still leased: nothing of the COMMIT
    await a.apply(changes)
    stats = await a.queues.stats("/queue/pg", now_ms=NOW)
    assert (stats.ready, stats.unacked, await a.topics.last_position()) == (2, 0, 1)


async def test_the_schema_is_versioned_and_a_newer_one_is_refused(postgresql_url: str, namespace: str) -> None:
    ds = await open_pg(postgresql_url, namespace)
    await ds.close()
    conn = await asyncpg.connect(postgresql_url)
    try:
        assert await conn.fetchval(f'SELECT version FROM "{namespace}_schema"') == SCHEMA_VERSION == 3
        await conn.execute(f'UPDATE "{namespace}_schema" SET version = 99')
    finally:
        await conn.close()
    with pytest.raises(DatasourceError, match="version 99, newer than this stompgate knows"):
        await open_pg(postgresql_url, namespace)


async def test_commits_wait_for_the_disk_whatever_the_servers_default(postgresql_url: str, namespace: str) -> None:
    # The test cluster runs with synchronous_commit=off; the gateway's own connections turn it on.
    probe = await asyncpg.connect(postgresql_url)
    try:
        assert await probe.fetchval("SHOW synchronous_commit") == "off"
    finally:
        await probe.close()
    ds = await open_pg(postgresql_url, namespace)
    try:
        async with ds.store.connection() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await ds.close()


async def test_a_connection_goes_back_to_the_pool_without_a_round_trip(postgresql_url: str, namespace: str) -> None:
    # asyncpg's pool sends "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL" at every release, and
    # the operation waits for it: a second round trip per claim. The store leaves no session state to undo.
    ds = await open_pg(postgresql_url, namespace)
    probe = await asyncpg.connect(postgresql_url)
    try:
        pid = await ds.store.run(lambda conn: conn.fetchval("SELECT pg_backend_pid()"), transaction=False)
        assert await probe.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid) == "SELECT pg_backend_pid()"
        async with ds.store.connection() as conn:  # and the session's settings are still the store's
            assert await conn.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await probe.close()
        await ds.close()


async def test_a_version_1_schema_is_upgraded(postgresql_url: str, namespace: str) -> None:
    ds = await open_pg(postgresql_url, namespace)
    await ds.close()
    conn = await asyncpg.connect(postgresql_url)
    try:  # back to what version 1 had: no write marks (version 2), no leases of wrapped tables (version 3)
        await conn.execute(f'DROP TABLE "{namespace}_writes"')
        await conn.execute(f'DROP TABLE "{namespace}_wrap_leases"')
        await conn.execute(f'UPDATE "{namespace}_schema" SET version = 1')
        ds = await open_pg(postgresql_url, namespace)
        try:
            await ds.queues.put([msg("after the upgrade")])  # writes its mark
        finally:
            await ds.close()
        assert await conn.fetchval(f'SELECT version FROM "{namespace}_schema"') == 3
        assert await conn.fetchval(f'SELECT count(*) FROM "{namespace}_writes"') == 1
        assert await conn.fetchval(f'SELECT count(*) FROM "{namespace}_wrap_leases"') == 0
    finally:
        await conn.close()


async def test_old_write_marks_are_collected(postgresql_url: str, namespace: str) -> None:
    ds = await open_pg(postgresql_url, namespace)
    try:
        await ds.queues.put([msg("recent")])
        await ds.store.run(lambda c: c.execute(f'INSERT INTO "{namespace}_writes" (id, at) VALUES ($1, $2)', "old", 1))
        await ds.store.collect_marks()
        ids = await ds.store.run(lambda c: c.fetch(f'SELECT id FROM "{namespace}_writes"'))
        assert len(ids) == 1 and ids[0][0] != "old"
    finally:
        await ds.close()


async def test_gateways_starting_together_create_the_schema_once(postgresql_url: str, namespace: str) -> None:
    opened = await asyncio.gather(*(open_pg(postgresql_url, namespace) for _ in range(4)))
    for ds in opened:
        await ds.close()


def serve(store: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "serve", "--store", store,
         "--stomp-port", str(free_port()), "--http-port", str(free_port())],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=dict(os.environ),
    )  # fmt: skip


def test_start_up_failures_are_one_sentence(postgresql_url: str, tmp_path: Path) -> None:
    base = postgresql_url.rsplit("/", 1)[0]
    port = base.rsplit(":", 1)[1]
    cases = {
        f"{base}/no_such_database": "has no database no_such_database",
        f"postgresql://nobody@127.0.0.1:{port}/postgres": "refused the login",
        f"postgresql://postgres@127.0.0.1:{free_port()}/postgres": "cannot reach PostgreSQL at 127.0.0.1:",
        "postgresql://postgres:secret@127.0.0.1:notaport/db": "the PostgreSQL URL is not valid: Port could not be cast",
        "postgresql://postgres:secret@[::1/db": "is not a valid URL: Invalid IPv6 URL",
        f"{base}/postgres?sslmode=bogus": "`sslmode` parameter must be one of",
    }
    for url, phrase in cases.items():
        result = serve(url, tmp_path)
        assert result.returncode != 0, url
        assert "Traceback" not in result.stderr, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and phrase in lines[0], (url, result.stderr)
        assert "secret" not in result.stderr
