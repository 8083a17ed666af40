"""Redis-only behaviour: start-up failures are one sentence, the persistence check says what a RECEIPT means, other
gateways' work wakes a waiter through the notification channel, a COMMIT is one script, a replayed write takes effect
once, and the topic stream's own trimming reports a Gap; on one server and on a Redis Cluster (``two_gateways``).
The key layout: a namespace of another layout is refused, no destination's keys are another's, and on Cluster each
namespace is one slot."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.datasources.interface import (
    Changes,
    DatasourceError,
    DatasourceOptions,
    DatasourceUnavailable,
    Gap,
    NewMessage,
    Published,
    Release,
    ScanMark,
    StoredMessage,
)
from app.datasources.interface import SCAN_BUDGET
from app.datasources.redis import RedisDatasource
from app.datasources.registry import open_datasource
from tests.gateway_process import free_port
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

NOW = 1_700_000_000_000
LEASE = 30_000
Q = "/queue/rd"


def msg(n: int | str, destination: str = Q, priority: int = 4) -> NewMessage:
    return NewMessage(
        message_id=f"m-{n}-{uuid.uuid4().hex[:8]}", destination=destination, headers={"n": str(n)}, body=b"x",
        priority=priority, published_at=NOW,
    )  # fmt: skip


@pytest.fixture
def namespace() -> str:
    return f"r{uuid.uuid4().hex[:12]}"


async def open_redis(url: str, namespace: str, **options: object) -> RedisDatasource:
    ds = await open_datasource(url, DatasourceOptions(namespace=namespace, **options))  # type: ignore[arg-type]
    assert isinstance(ds, RedisDatasource)
    return ds


@pytest.fixture(params=["redis_url", "redis_cluster_url"])
async def two_gateways(
    request: pytest.FixtureRequest, namespace: str
) -> AsyncIterator[tuple[RedisDatasource, RedisDatasource]]:
    """Two gateways on one namespace: of one server, and of a Redis Cluster of three masters (where a COMMIT across
    destinations, a dead-letter and a wake-up must work the same, the namespace in one slot)."""
    url = request.getfixturevalue(request.param)
    a, b = await open_redis(url, namespace), await open_redis(url, namespace)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


@pytest.fixture(scope="module")
def password_server() -> AsyncIterator[RedisServer]:
    server = RedisServer(password="s3cret-pass").start()
    try:
        yield server  # type: ignore[misc]
    finally:
        server.cleanup()


# -- wake-ups across gateways ------------------------------------------------------------------------------------------


async def test_another_gateways_put_wakes_a_waiter(two_gateways: tuple[RedisDatasource, RedisDatasource]) -> None:
    a, b = two_gateways
    assert not a.shared and not b.shared  # notifications flow: no polling
    waiter = asyncio.ensure_future(a.queues.wait(Q, 30.0))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await b.queues.put([msg(1)])
    await asyncio.wait_for(waiter, 5.0)
    assert time.monotonic() - started < 2.0
    [got] = await a.queues.claim(Q, owner="a", limit=5, lease_ms=LEASE, now_ms=NOW)
    assert got.headers["n"] == "1"


async def test_another_gateways_requeue_wakes_a_waiter(two_gateways: tuple[RedisDatasource, RedisDatasource]) -> None:
    a, b = two_gateways
    await b.queues.put([msg(1)])
    [got] = await b.queues.claim(Q, owner="b", limit=5, lease_ms=LEASE, now_ms=NOW)
    waiter = asyncio.ensure_future(a.queues.wait(Q, 30.0))
    await asyncio.sleep(0.05)
    await b.apply(Changes(requeue=[(got.message_id, got.lease)]))
    await asyncio.wait_for(waiter, 5.0)


async def test_another_gateways_publish_reaches_a_follower(two_gateways: tuple[RedisDatasource, RedisDatasource]) -> None:
    a, b = two_gateways
    follower = a.topics.follow(after=None)
    try:
        first = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0.2)
        [position] = await b.topics.publish([msg(1, destination="/topic/rd")])
        event = await asyncio.wait_for(first, 5.0)
        assert isinstance(event, Published) and event.position == position
    finally:
        await follower.aclose()  # type: ignore[attr-defined]
    # a live follower opened after B's next publish starts after it: the notification carried the position
    [skipped] = await b.topics.publish([msg(2, destination="/topic/rd")])
    await asyncio.sleep(0.2)
    live = a.topics.follow(after=None)
    try:
        first = asyncio.ensure_future(anext(live))
        await asyncio.sleep(0.2)
        [newest] = await b.topics.publish([msg(3, destination="/topic/rd")])
        event = await asyncio.wait_for(first, 5.0)
        assert isinstance(event, Published) and event.position == newest == skipped + 1
    finally:
        await live.aclose()  # type: ignore[attr-defined]


async def test_a_lapsed_lease_requeued_by_a_claim_reaches_other_gateways(
    two_gateways: tuple[RedisDatasource, RedisDatasource],
) -> None:
    """A claim that finds lapsed leases makes them ready again at their old places and says so on the channel: the
    other gateway's waiters wake and its selector scans start over (the message sorts before their marks)."""
    a, b = two_gateways
    await a.queues.put([msg("red")])
    await a.queues.put([msg(n) for n in range(5)])
    [red] = await a.queues.claim(Q, owner="a", limit=1, lease_ms=LEASE, now_ms=NOW)
    mark = ScanMark()
    wanted = lambda h: h["n"] == "red"  # noqa: E731
    assert await b.queues.claim(Q, owner="b", limit=1, lease_ms=LEASE, now_ms=NOW, selector=wanted, scan=mark) == []
    assert mark.after is not None and not mark.more  # a finished scan: its mark is past the red message's place
    token = b.queues.wake_token(Q)
    later = NOW + LEASE + 1
    assert await a.queues.claim(Q, owner="a", limit=1, lease_ms=LEASE, now_ms=later, selector=lambda h: False) == []
    await asyncio.wait_for(b.queues.wait(Q, 30, token), 5)  # woken by the requeue of the lapsed lease
    [again] = await b.queues.claim(Q, owner="b", limit=1, lease_ms=LEASE, now_ms=later, selector=wanted, scan=mark)
    assert again.message_id == red.message_id and again.deliveries == 2


async def test_another_gateways_higher_priority_put_is_seen_by_a_finished_scan(
    two_gateways: tuple[RedisDatasource, RedisDatasource],
) -> None:
    a, b = two_gateways
    await a.queues.put([msg(n) for n in range(5)])
    mark = ScanMark()
    wanted = lambda h: h["n"] == "urgent"  # noqa: E731
    assert await b.queues.claim(Q, owner="b", limit=1, lease_ms=LEASE, now_ms=NOW, selector=wanted, scan=mark) == []
    token = b.queues.wake_token(Q)
    await a.queues.put([msg("urgent", priority=9)])
    # as a subscription does: wait for a wake-up, claim, and wait again if that found nothing. (On a cluster the
    # first put's notification may come late, through the cluster bus, and wake it before the urgent one's does.)
    got: list[StoredMessage] = []
    while not got:
        await asyncio.wait_for(b.queues.wait(Q, 30, token), 5)
        token = b.queues.wake_token(Q)
        got = await b.queues.claim(Q, owner="b", limit=1, lease_ms=LEASE, now_ms=NOW, selector=wanted, scan=mark)
    assert [m.headers["n"] for m in got] == ["urgent"]


# -- COMMIT and replays ------------------------------------------------------------------------------------------------


async def test_a_commit_is_all_or_nothing(two_gateways: tuple[RedisDatasource, RedisDatasource]) -> None:
    """The script checks every message id before it changes anything: a COMMIT whose last message reuses a stored id
    leaves no trace, not even the ACK, the requeue, the dead-letter or the publish that came before it."""
    a, b = two_gateways
    await a.queues.put([msg("x1"), msg("x2"), msg("x3")])
    one, two, three = await a.queues.claim(Q, owner="a", limit=3, lease_ms=LEASE, now_ms=NOW)
    with pytest.raises(DatasourceError, match="message id already stored"):
        await a.apply(
            Changes(
                queue=[msg("new", destination="/queue/rd.out"), NewMessage(one.message_id, "/queue/rd.out", {}, b"")],
                topic=[msg("t", destination="/topic/rd")],
                acks=[(one.message_id, one.lease)],
                requeue=[(two.message_id, two.lease)],
                dead_letter=[(three.message_id, three.lease)],
            )
        )
    assert await b.topics.last_position() == 0
    assert await b.queues.destinations() == [Q]
    stats = await b.queues.stats(Q, now_ms=NOW)
    assert (stats.ready, stats.unacked) == (0, 3)
    # the same COMMIT without the clash: everything at once
    await a.apply(
        Changes(
            queue=[msg("new", destination="/queue/rd.out")],
            topic=[msg("t", destination="/topic/rd")],
            acks=[(one.message_id, one.lease)],
            requeue=[(two.message_id, two.lease)],
            dead_letter=[(three.message_id, three.lease)],
        )
    )
    assert await b.topics.last_position() == 1
    assert sorted(await b.queues.destinations()) == sorted([Q, Q + ".DLQ", "/queue/rd.out"])
    [again] = await b.queues.claim(Q, owner="b", limit=5, lease_ms=LEASE, now_ms=NOW)
    assert again.message_id == two.message_id and again.deliveries == 2
    [dead] = await b.queues.claim(Q + ".DLQ", owner="b", limit=5, lease_ms=LEASE, now_ms=NOW)
    assert (dead.message_id, dead.original_destination, dead.deliveries) == (three.message_id, Q, 1)


async def test_a_write_replayed_after_its_answer_was_lost_takes_effect_once(
    two_gateways: tuple[RedisDatasource, RedisDatasource], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The injected fault: the put's script runs, then the answer is lost (DatasourceUnavailable, so the failover
    buffer replays it). Meanwhile gateway B delivers the message and its ACK deletes it: the replay finds the
    write's mark and stores nothing again."""
    a, b = two_gateways
    original = a.store.script
    calls = 0
    consumed = asyncio.Event()

    async def lossy_script(name: str, args: Any) -> Any:
        nonlocal calls
        if name != "APPLY":
            return await original(name, args)
        calls += 1
        if calls == 2:  # the replay: only after B consumed the message
            await consumed.wait()
        result = await original(name, args)
        if calls == 1:
            raise DatasourceUnavailable("Redis: Connection closed by server.")
        return result

    monkeypatch.setattr(a.store, "script", lossy_script)
    token = b.queues.wake_token(Q)
    put = asyncio.ensure_future(a.queues.put([msg("once")]))
    await b.queues.wait(Q, 30, token)  # the first try took effect (its notification came)
    [got] = await b.queues.claim(Q, owner="b", limit=5, lease_ms=LEASE, now_ms=NOW)
    await b.queues.ack([got.message_id], [got.lease])
    consumed.set()
    await asyncio.wait_for(put, 30)
    assert calls == 2
    assert await b.queues.claim(Q, owner="b", limit=5, lease_ms=LEASE, now_ms=NOW) == []  # not stored again
    # a publish replayed the same way returns the positions of its first try
    calls = 0
    consumed.set()
    positions = await a.topics.publish([msg("t1", destination="/topic/rd"), msg("t2", destination="/topic/rd")])
    assert calls == 2 and positions == [1, 2]
    assert await b.topics.last_position() == 2


# -- topics ------------------------------------------------------------------------------------------------------------


async def test_the_streams_own_trimming_reports_a_gap(redis_url: str, namespace: str) -> None:
    """Without ``trim()``: XADD's MAXLEN ~ trims whole stream nodes, keeping at least the retention."""
    ds = await open_redis(redis_url, namespace, topic_retention=100)
    try:
        for start in range(0, 1000, 100):
            await ds.topics.publish([msg(n, destination="/topic/rd") for n in range(start, start + 100)])
        follower = ds.topics.follow(after=3)
        try:
            gap = await asyncio.wait_for(anext(follower), 5)
            assert isinstance(gap, Gap) and gap.expected == 4
            assert 4 < gap.oldest <= 901  # at least the retention (100) is kept
            first = await asyncio.wait_for(anext(follower), 5)
            assert isinstance(first, Published) and first.position == gap.oldest
        finally:
            await follower.aclose()  # type: ignore[attr-defined]
    finally:
        await ds.close()


async def test_a_cursor_resumes_a_durable_subscription(two_gateways: tuple[RedisDatasource, RedisDatasource]) -> None:
    a, b = two_gateways
    positions = await a.topics.publish([msg(n, destination="/topic/rd") for n in range(5)])
    await a.topics.save_cursor("client/sub", positions[2])
    follower = b.topics.follow(after=await b.topics.load_cursor("client/sub"))
    try:
        got = [await asyncio.wait_for(anext(follower), 5) for _ in range(2)]
        assert [e.position for e in got if isinstance(e, Published)] == positions[3:]
    finally:
        await follower.aclose()  # type: ignore[attr-defined]


# -- durability: what a RECEIPT means ----------------------------------------------------------------------------------


async def test_a_weaker_fsync_setting_is_warned_about(caplog: pytest.LogCaptureFixture, namespace: str) -> None:
    server = RedisServer(appendfsync="everysec").start()
    try:
        with caplog.at_level(logging.INFO, logger="stompgate.datasource.redis"):
            ds = await open_redis(server.url, namespace)
            await ds.close()
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "appendfsync everysec" in warnings[0] and "a RECEIPT means" in warnings[0], warnings
    finally:
        server.cleanup()


async def test_an_evicting_memory_policy_is_warned_about(caplog: pytest.LogCaptureFixture, namespace: str) -> None:
    server = RedisServer(extra=["--maxmemory-policy", "allkeys-lru"]).start()
    try:
        with caplog.at_level(logging.WARNING, logger="stompgate.datasource.redis"):
            ds = await open_redis(server.url, namespace)
            await ds.close()
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "maxmemory-policy allkeys-lru" in warnings[0], warnings
    finally:
        server.cleanup()


async def test_always_fsync_gives_no_warning(caplog: pytest.LogCaptureFixture, redis_url: str, namespace: str) -> None:
    if os.environ.get("REDIS_URL"):
        pytest.skip("REDIS_URL names a server whose settings this test does not know")
    with caplog.at_level(logging.INFO, logger="stompgate.datasource.redis"):
        ds = await open_redis(redis_url, namespace)
        await ds.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("a RECEIPT means stored on disk" in r.getMessage() for r in caplog.records)


async def test_without_config_the_check_says_it_could_not_check(caplog: pytest.LogCaptureFixture, namespace: str) -> None:
    server = RedisServer(extra=["--rename-command", "CONFIG", ""]).start()  # as managed services do
    try:
        with caplog.at_level(logging.WARNING, logger="stompgate.datasource.redis"):
            ds = await open_redis(server.url, namespace)
            await ds.close()
        [warning] = [r.getMessage() for r in caplog.records]
        assert "could not check the persistence settings" in warning and "appendfsync always" in warning
    finally:
        server.cleanup()


# -- start-up failures ---------------------------------------------------------------------------------------------------


async def test_start_up_failures_raise_one_sentence(password_server: RedisServer, namespace: str) -> None:
    port = password_server.port
    cases = {
        f"redis://127.0.0.1:{free_port()}/0": "cannot reach Redis at 127.0.0.1:",
        f"redis://:wrong-pass@127.0.0.1:{port}/0": f"Redis at 127.0.0.1:{port} refused the login",
        f"redis://127.0.0.1:{port}/0": f"Redis at 127.0.0.1:{port} refused the login",  # no password given
        "redis://:s3cret-pass@127.0.0.1:notaport/0": "the Redis URL is not valid",
        f"redis://:s3cret-pass@127.0.0.1:{port}/zero": "the Redis URL is not valid",
    }
    for url, phrase in cases.items():
        with pytest.raises(DatasourceError) as caught:
            await open_redis(url, namespace)
        text = str(caught.value)
        assert phrase in text and "\n" not in text, (url, text)
        assert "s3cret" not in text and "wrong-pass" not in text, text
    ds = await open_redis(password_server.url, namespace)  # the right password works
    await ds.close()


def serve(store: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "serve", "--store", store,
         "--stomp-port", str(free_port()), "--http-port", str(free_port())],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=dict(os.environ),
    )  # fmt: skip


def test_start_up_failures_exit_with_one_line(password_server: RedisServer, tmp_path: Path) -> None:
    cases = {
        f"redis://127.0.0.1:{free_port()}/0": "cannot reach Redis at 127.0.0.1:",
        f"redis://:wrong-pass@127.0.0.1:{password_server.port}/0": "refused the login",
        "redis://:s3cret-pass@127.0.0.1:notaport/0": "the Redis URL is not valid",
    }
    for url, phrase in cases.items():
        result = serve(url, tmp_path)
        assert result.returncode != 0, url
        assert "Traceback" not in result.stderr, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and phrase in lines[0], (url, result.stderr)
        assert "s3cret" not in result.stderr and "wrong-pass" not in result.stderr


async def test_acks_are_not_buffered_but_fail_for_the_broker_to_retry(namespace: str) -> None:
    """While Redis is down, an ACK raises DatasourceUnavailable (the broker retries it, then gives the message back)
    instead of waiting in the failover buffer, whose room is for SENDs; a put waits there and completes later."""
    server = RedisServer().start()
    ds = await open_redis(server.url, namespace)
    try:
        await ds.queues.put([msg(1)])
        [got] = await ds.queues.claim(Q, owner="a", limit=1, lease_ms=LEASE, now_ms=NOW)
        server.stop(kill=True)
        with pytest.raises(DatasourceUnavailable):
            await ds.queues.ack([got.message_id], [got.lease])
        put = asyncio.ensure_future(ds.queues.put([msg(2)]))
        await asyncio.sleep(0.3)
        assert not put.done() and ds.store.writer.waiting == 1
        server.start()
        await asyncio.wait_for(put, 20)
        await ds.queues.ack([got.message_id], [got.lease])
        assert [m.headers["n"] for m in await ds.queues.claim(Q, owner="a", limit=5, lease_ms=LEASE, now_ms=NOW)] == ["2"]
    finally:
        await ds.close()
        server.cleanup()


# -- failover: Redis restarted under load ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_redis_killed_under_load_loses_nothing_receipted(namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL to redis-server (appendfsync always) while producers put and publish, then a restart on the same port
    and data directory: the writes meanwhile wait in the failover buffer, every put and publish that returned is
    there once, the topic positions have no hole, and notifications flow again."""
    server = RedisServer().start()
    ds = await open_redis(server.url, namespace)
    stored: list[str] = []
    positions: list[int] = []
    try:
        killed = asyncio.Event()

        async def producer(p: int) -> None:
            for n in range(150):
                message = msg(f"{p}-{n}")
                await ds.queues.put([message])
                stored.append(message.message_id)
                if p == 0 and n == 30:
                    killed.set()
                await asyncio.sleep(0)

        async def publisher() -> None:
            for n in range(100):
                positions.extend(await ds.topics.publish([msg(f"t{n}", destination="/topic/rd")]))

        async def crash() -> None:
            await killed.wait()
            server.stop(kill=True)
            await asyncio.sleep(0.5)  # writes meet the outage and wait in the buffer
            server.start()

        with caplog.at_level(logging.WARNING):
            await asyncio.wait_for(asyncio.gather(*(producer(p) for p in range(4)), publisher(), crash()), 90)
        assert any("buffering writes" in r.getMessage() for r in caplog.records)  # the outage was met
        assert len(stored) == 600 and ds.store.writer.waiting == 0
        got = await ds.queues.claim(Q, owner="after", limit=1000, lease_ms=LEASE, now_ms=NOW)
        assert sorted(m.message_id for m in got) == sorted(stored)  # every one, once
        assert positions == list(range(1, 101))
        follower = ds.topics.follow(after=0)
        try:
            seen = [await asyncio.wait_for(anext(follower), 5) for _ in range(100)]
            assert [e.position for e in seen if isinstance(e, Published)] == positions
        finally:
            await follower.aclose()  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while ds.shared and time.monotonic() < deadline:  # the listener reconnected
            await asyncio.sleep(0.05)
        assert not ds.shared
        waiter = asyncio.ensure_future(ds.queues.wait(Q, 30.0))
        await asyncio.sleep(0.05)
        other = await open_redis(server.url, namespace)
        try:
            await other.queues.put([msg("after-restart")])
            await asyncio.wait_for(waiter, 5)
        finally:
            await other.close()
    finally:
        await ds.close()
        server.cleanup()


# -- found by review: each of these failed before its fix --------------------------------------------------------


def review_msg(message_id: str, destination: str, n: str = "x") -> NewMessage:
    return NewMessage(message_id=message_id, destination=destination, headers={"n": n}, body=b"x", published_at=NOW)


async def dead_letter_beside_direct_puts(ds: RedisDatasource, q: str, count: int) -> str:
    """``count`` messages put on ``q.DLQ`` itself, and the last of ``count`` messages of ``q`` dead-lettered into it.
    With a seq counter per destination the two last ones had one score, and a scan resuming after a score (exclusive)
    passed the second of them."""
    for start in range(0, count, 500):
        await ds.queues.put([review_msg(f"a-{i:06d}", q + ".DLQ") for i in range(start, min(count, start + 500))])
    for start in range(0, count, 500):
        await ds.queues.put([review_msg(f"q-{i:06d}", q, "dead") for i in range(start, min(count, start + 500))])
    claimed = await ds.queues.claim(q, owner="g", limit=count, lease_ms=LEASE, now_ms=NOW)
    await ds.queues.release([claimed[-1].message_id], Release.DEAD_LETTER, [claimed[-1].lease])
    return claimed[-1].message_id


async def test_a_peek_with_a_selector_sees_a_dead_letter_beside_direct_puts(redis_url: str, namespace: str) -> None:
    ds = await open_redis(redis_url, namespace)
    try:
        await dead_letter_beside_direct_puts(ds, "/queue/tie", 256)  # 256: a peek page ends on the last put
        assert len(await ds.queues.peek("/queue/tie.DLQ", limit=1000, now_ms=NOW, selector=lambda h: True)) == 257
    finally:
        await ds.close()


async def test_a_selector_scan_reaches_a_dead_letter_beside_direct_puts(redis_url: str, namespace: str) -> None:
    ds = await open_redis(redis_url, namespace)
    try:
        dead = await dead_letter_beside_direct_puts(ds, "/queue/tie2", SCAN_BUDGET)  # a scan window ends there
        mark = ScanMark()
        got: list[StoredMessage] = []
        for _ in range(4):  # the subscription's claims, as the broker makes them
            got += await ds.queues.claim(
                "/queue/tie2.DLQ", owner="s", limit=1, lease_ms=LEASE, now_ms=NOW,
                selector=lambda h: h.get("n") == "dead", scan=mark,
            )  # fmt: skip
        assert [m.message_id for m in got] == [dead]
    finally:
        await ds.close()


async def test_a_commit_with_a_lost_topic_head_is_stored_whole(redis_url: str, namespace: str) -> None:
    # The head counter gone (evicted, deleted, an older restore): the append's explicit stream id failed after the
    # queue part was written, and a script does not roll back. The head is now checked against the stream first.
    ds = await open_redis(redis_url, namespace)
    try:
        await ds.topics.publish([review_msg("t-1", "/topic/a"), review_msg("t-2", "/topic/a")])
        await ds.store.client.delete(ds.store.topic_head)
        await ds.apply(Changes(queue=[review_msg("c-1", "/queue/commit")], topic=[review_msg("t-3", "/topic/a")]))
        assert [m.message_id for m in await ds.queues.peek("/queue/commit", limit=10, now_ms=NOW)] == ["c-1"]
        assert await ds.topics.last_position() == 3
    finally:
        await ds.close()


async def test_an_owners_lease_set_holds_only_what_it_holds(redis_url: str, namespace: str) -> None:
    # RENEW walks the owner's set: ACKed, requeued and dead-lettered ids stayed in it, so every renewal walked every
    # id ever claimed since the last one (and a crashed gateway's set stayed for good).
    ds = await open_redis(redis_url, namespace)
    try:
        await ds.queues.put([review_msg(f"m-{i}", "/queue/own") for i in range(4)])
        got = await ds.queues.claim("/queue/own", owner="o", limit=4, lease_ms=LEASE, now_ms=NOW)
        await ds.queues.ack([got[0].message_id], [got[0].lease])
        await ds.queues.release([got[1].message_id], Release.REQUEUE, [got[1].lease])
        await ds.queues.release([got[2].message_id], Release.DEAD_LETTER, [got[2].lease])
        owned = await ds.store.client.smembers(f"{{{namespace}}}:own:o")
        assert {m.decode() if isinstance(m, bytes) else m for m in owned} == {got[3].message_id}
    finally:
        await ds.close()


async def test_no_destinations_keys_are_another_destinations(redis_url: str, namespace: str) -> None:
    """A destination's keys carry its length: a destination and a message id cannot spell another destination's keys.
    (Before, ``{ns:q:x}:m:1}:ready`` was both the message ``1}:ready`` of ``x`` and the ready set of ``x}:m:1``.)"""
    ds = await open_redis(redis_url, namespace)
    try:
        await ds.queues.put([NewMessage("1}:ready", "x", {}, b"a", 4, None, NOW)])
        await ds.queues.put([msg(2, destination="x}:m:1")])
        assert [m.body for m in await ds.queues.claim("x", owner="o", limit=5, lease_ms=LEASE, now_ms=NOW)] == [b"a"]
        [other] = await ds.queues.claim("x}:m:1", owner="o", limit=5, lease_ms=LEASE, now_ms=NOW)
        assert other.headers["n"] == "2"
    finally:
        await ds.close()


async def test_a_namespace_of_another_key_layout_is_refused(redis_url: str, namespace: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    try:
        await client.set(f"{{{namespace}:t}}:head", 7)  # the first build's topic head, which wrote no layout
        with pytest.raises(DatasourceError, match="key layout of an earlier stompgate build"):
            await open_redis(redis_url, namespace)
        await client.delete(f"{{{namespace}:t}}:head")
        await client.set(f"{{{namespace}}}:layout", 99)
        with pytest.raises(DatasourceError, match="has key layout 99, and this build knows layout 2 only"):
            await open_redis(redis_url, namespace)
        await client.delete(f"{{{namespace}}}:layout")
        ds = await open_redis(redis_url, namespace)  # a fresh namespace is written in this layout, and opens again
        await ds.close()
        assert await client.get(f"{{{namespace}}}:layout") == b"2"
        ds = await open_redis(redis_url, namespace)
        await ds.close()
    finally:
        await client.aclose()


async def test_on_a_cluster_namespaces_spread_over_the_masters(redis_cluster_url: str) -> None:
    """Each namespace is one slot, so on one master; different namespaces land on different masters."""
    masters: set[str] = set()
    for n in range(12):
        ds = await open_redis(redis_cluster_url, f"spread{n}-{uuid.uuid4().hex[:6]}")
        try:
            assert ds.store.cluster
            await ds.queues.put([msg(n)])
            client = ds.store.client
            from redis.asyncio.cluster import RedisCluster

            assert isinstance(client, RedisCluster)
            node = client.get_node_from_key(ds.store.anchor)
            assert node is not None
            assert int(await node.execute_command("EXISTS", ds.store.anchor)) == 1  # its keys are on that node
            masters.add(node.name)
        finally:
            await ds.queues.purge(Q)
            await ds.close()
    assert len(masters) > 1


async def test_a_cluster_url_with_another_database_is_one_sentence(redis_cluster_url: str, namespace: str) -> None:
    url = redis_cluster_url.rsplit("/", 1)[0] + "/3"
    with pytest.raises(DatasourceError) as caught:
        await open_redis(url, namespace)
    assert "is a cluster node, and a cluster has database 0 only, not 3" in str(caught.value)


async def test_a_follower_whose_cancel_the_client_swallowed_still_stops(redis_url: str, namespace: str) -> None:
    """redis-py sends each command under asyncio.wait_for, which on Python 3.11 can return normally when a cancel
    lands just as the send completes (the cancel is then lost, though the task still counts it). Injected here: a
    read that swallows the cancel. A follower must stop all the same, or a gateway's shutdown waits on it forever."""
    ds = await open_redis(redis_url, namespace)
    reading = asyncio.Event()
    try:
        client = ds.store.client
        real_xread = client.xread

        async def xread_swallowing_cancel(*args: Any, **kwargs: Any) -> Any:
            reading.set()
            try:
                return await real_xread(*args, **{**kwargs, "block": 200})
            except asyncio.CancelledError:
                return []  # what wait_for's race does: the cancel is gone, the call "succeeded"

        client.xread = xread_swallowing_cancel  # type: ignore[method-assign]

        async def follow() -> None:
            async for _ in ds.topics.follow(after=0):
                pass

        follower = asyncio.ensure_future(follow())
        await asyncio.wait_for(reading.wait(), 5)
        follower.cancel()
        done, _ = await asyncio.wait({follower}, timeout=5)
        assert follower in done, "the follower read on after its cancel"
        assert follower.cancelled()
    finally:
        await ds.close()
