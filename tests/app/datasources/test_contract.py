"""The datasource contract: one test per rule of ``app.datasources.interface``, run against every backend."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping

import pytest

from app.datasources.interface import (
    PEEK_SCAN_LIMIT,
    SCAN_BUDGET,
    Changes,
    Datasource,
    DatasourceError,
    Gap,
    NewMessage,
    Published,
    Release,
    ScanMark,
    StoredMessage,
    TailEvent,
)

from .conftest import TOPIC_RETENTION

NOW = 1_700_000_000_000
LEASE = 30_000
Q = "/queue/contract"


def msg(
    n: int | str,
    *,
    destination: str = Q,
    priority: int = 4,
    expires_at: int | None = None,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
) -> NewMessage:
    return NewMessage(
        message_id=f"m-{n}-{uuid.uuid4().hex[:8]}" if isinstance(n, int) else n,
        destination=destination,
        headers=dict(headers) if headers is not None else {"n": str(n)},
        body=body if body is not None else f"body {n}".encode(),
        priority=priority,
        expires_at=expires_at,
        published_at=NOW,
    )


async def claim(
    ds: Datasource, *, owner: str = "o1", limit: int = 100, now: int = NOW, destination: str = Q
) -> list[StoredMessage]:
    return await ds.queues.claim(destination, owner=owner, limit=limit, lease_ms=LEASE, now_ms=now)


def numbers(messages: list[StoredMessage]) -> list[str]:
    return [m.headers["n"] for m in messages]


async def next_event(it: AsyncIterator[TailEvent], timeout: float = 5.0) -> TailEvent:
    return await asyncio.wait_for(anext(it), timeout)


async def no_event(it: AsyncIterator[TailEvent], wait: float = 0.2) -> None:
    task = asyncio.ensure_future(anext(it))
    done, _ = await asyncio.wait({task}, timeout=wait)
    assert not done, f"unexpected event {task.result() if done else None}"
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await task


# -- PollQueue -------------------------------------------------------------------------------------------------------


async def test_put_is_visible_to_claim_with_every_field(datasource: Datasource) -> None:
    new = NewMessage(
        message_id="id-1",
        destination=Q,
        headers={"content-type": "text/plain", "x-ü": "v:a\nl"},
        body=b"\x00bin\x00ary\xff",
        priority=7,
        expires_at=NOW + 60_000,
        published_at=NOW - 5,
    )
    await datasource.queues.put([new])
    [got] = await claim(datasource)
    assert got.message_id == "id-1"
    assert got.destination == Q
    assert dict(got.headers) == {"content-type": "text/plain", "x-ü": "v:a\nl"}
    assert got.body == b"\x00bin\x00ary\xff"
    assert got.priority == 7
    assert got.expires_at == NOW + 60_000
    assert got.published_at == NOW - 5
    assert got.deliveries == 1
    assert got.original_destination is None


async def test_fifo_within_a_priority(datasource: Datasource) -> None:
    for n in range(10):
        await datasource.queues.put([msg(n)])
    await datasource.queues.put([msg(n) for n in range(10, 20)])
    got = await claim(datasource)
    assert numbers(got) == [str(n) for n in range(20)]
    assert [m.seq for m in got] == sorted(m.seq for m in got)


async def test_higher_priority_first(datasource: Datasource) -> None:
    await datasource.queues.put([msg(0, priority=1), msg(1, priority=9), msg(2, priority=4), msg(3, priority=9)])
    await datasource.queues.put([msg(4, priority=0), msg(5, priority=4)])
    assert numbers(await claim(datasource)) == ["1", "3", "2", "5", "0", "4"]


async def test_claim_takes_at_most_limit(datasource: Datasource) -> None:
    await datasource.queues.put([msg(n) for n in range(5)])
    assert numbers(await claim(datasource, limit=2)) == ["0", "1"]
    assert numbers(await claim(datasource, limit=2)) == ["2", "3"]
    assert numbers(await claim(datasource, limit=2)) == ["4"]
    assert await claim(datasource, limit=2) == []


async def test_claim_of_an_empty_or_unknown_destination(datasource: Datasource) -> None:
    assert await claim(datasource, destination="/queue/nothing-here") == []


async def test_destinations_are_separate(datasource: Datasource) -> None:
    await datasource.queues.put([msg(1, destination="/queue/a"), msg(2, destination="/queue/b")])
    assert numbers(await claim(datasource, destination="/queue/a")) == ["1"]
    assert numbers(await claim(datasource, destination="/queue/b")) == ["2"]


async def test_lease_is_exclusive_until_it_expires(datasource: Datasource) -> None:
    await datasource.queues.put([msg(1)])
    [first] = await claim(datasource, owner="a")
    assert first.deliveries == 1
    assert await claim(datasource, owner="b", now=NOW + LEASE - 1) == []
    [again] = await claim(datasource, owner="b", now=NOW + LEASE)
    assert again.message_id == first.message_id
    assert again.deliveries == 2


async def test_expired_messages_are_never_claimed(datasource: Datasource) -> None:
    await datasource.queues.put(
        [msg(1, expires_at=NOW), msg(2, expires_at=NOW + 1000), msg(3), msg(4, expires_at=NOW - 1)]
    )
    assert numbers(await datasource.queues.peek(Q, limit=10, now_ms=NOW)) == ["2", "3"]
    assert (await datasource.queues.stats(Q, now_ms=NOW)).ready == 2
    assert numbers(await claim(datasource, now=NOW + 1000)) == ["3"]


async def test_expired_while_leased_is_not_redelivered(datasource: Datasource) -> None:
    await datasource.queues.put([msg(1, expires_at=NOW + LEASE + 10)])
    assert len(await claim(datasource)) == 1
    assert await claim(datasource, now=NOW + LEASE + 10) == []


async def test_requeue_keeps_place_and_counts_deliveries(datasource: Datasource) -> None:
    await datasource.queues.put([msg(n) for n in range(3)])
    first = await claim(datasource, limit=1)
    assert numbers(first) == ["0"]
    await datasource.queues.release([first[0].message_id], Release.REQUEUE)
    got = await claim(datasource)
    assert numbers(got) == ["0", "1", "2"]
    assert [m.deliveries for m in got] == [2, 1, 1]
    await datasource.queues.release([m.message_id for m in got], Release.REQUEUE)
    assert [m.deliveries for m in await claim(datasource)] == [3, 2, 2]


async def test_dead_letter_moves_once_to_dlq(datasource: Datasource) -> None:
    await datasource.queues.put([msg(1), msg(2)])
    got = await claim(datasource)
    await datasource.queues.release([got[0].message_id], Release.DEAD_LETTER)
    await datasource.queues.release([got[0].message_id], Release.DEAD_LETTER)  # not leased any more: ignored
    assert [m.message_id for m in await claim(datasource, now=NOW + LEASE)] == [got[1].message_id]
    dlq = await claim(datasource, destination=Q + ".DLQ")
    [dead] = dlq
    assert dead.message_id == got[0].message_id
    assert dead.destination == Q + ".DLQ"
    assert dead.original_destination == Q
    assert dead.deliveries == 1  # reset by the move, then counted by this claim
    assert dead.body == b"body 1"
    assert await datasource.queues.peek(Q + ".DLQ.DLQ", limit=10, now_ms=NOW) == []


async def test_ack_deletes_and_ignores_unknown_ids(datasource: Datasource) -> None:
    await datasource.queues.put([msg(1), msg(2)])
    got = await claim(datasource)
    await datasource.queues.ack([got[0].message_id, "never-stored"])
    await datasource.queues.ack([got[0].message_id])
    later = await claim(datasource, now=NOW + LEASE)
    assert [m.message_id for m in later] == [got[1].message_id]
    stats = await datasource.queues.stats(Q, now_ms=NOW + LEASE)
    assert (stats.ready, stats.unacked) == (0, 1)


async def test_release_of_unknown_ids_is_ignored(datasource: Datasource) -> None:
    await datasource.queues.release(["nope"], Release.REQUEUE)
    await datasource.queues.release(["nope"], Release.DEAD_LETTER)
    assert await datasource.queues.destinations() == []


async def test_renew_extends_every_lease_of_an_owner(datasource: Datasource) -> None:
    await datasource.queues.put([msg(1), msg(2), msg(3)])
    await claim(datasource, owner="a", limit=2)
    await claim(datasource, owner="b", limit=1)
    await datasource.queues.renew("a", lease_ms=LEASE, now_ms=NOW + LEASE - 1)
    later = NOW + LEASE + 5
    assert numbers(await claim(datasource, owner="c", now=later)) == ["3"]
    assert numbers(await claim(datasource, owner="c", now=NOW + 2 * LEASE - 1)) == ["1", "2"]


async def test_concurrent_claims_never_return_the_same_message(datasource: Datasource) -> None:
    total = 500
    await datasource.queues.put([msg(n) for n in range(total)])

    async def claimer(owner: str) -> list[str]:
        mine: list[str] = []
        while True:
            got = await claim(datasource, owner=owner, limit=7)
            if not got:
                return mine
            mine += [m.message_id for m in got]
            await datasource.queues.ack([m.message_id for m in got[::2]])

    results = await asyncio.gather(*(claimer(f"c{i}") for i in range(8)))
    everything = [i for r in results for i in r]
    assert len(everything) == total
    assert len(set(everything)) == total


async def test_claim_with_selector_takes_only_matching(datasource: Datasource) -> None:
    await datasource.queues.put(
        [msg(n, headers={"n": str(n), "color": "red" if n % 3 == 0 else "blue"}) for n in range(10)]
    )
    got = await datasource.queues.claim(
        Q, owner="a", limit=3, lease_ms=LEASE, now_ms=NOW, selector=lambda h: h.get("color") == "red"
    )
    assert numbers(got) == ["0", "3", "6"]
    assert numbers(await claim(datasource, limit=3)) == ["1", "2", "4"]


async def test_wait_wakes_on_put(datasource: Datasource) -> None:
    waiter = asyncio.ensure_future(datasource.queues.wait(Q, 10.0))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    started = time.monotonic()
    await datasource.queues.put([msg(1)])
    await asyncio.wait_for(waiter, 5.0)
    assert time.monotonic() - started < 2.0


async def test_wait_wakes_on_requeue(datasource: Datasource) -> None:
    await datasource.queues.put([msg(1)])
    [got] = await claim(datasource)
    waiter = asyncio.ensure_future(datasource.queues.wait(Q, 10.0))
    await asyncio.sleep(0.05)
    await datasource.queues.release([got.message_id], Release.REQUEUE)
    await asyncio.wait_for(waiter, 5.0)


async def test_wait_times_out_without_work(datasource: Datasource) -> None:
    started = time.monotonic()
    await datasource.queues.wait(Q, 0.2)
    assert 0.15 <= time.monotonic() - started < 2.0


async def test_wait_ignores_other_destinations(datasource: Datasource) -> None:
    # The waiter's own timeout is far beyond the look below, so that a loaded machine cannot end it first.
    waiter = asyncio.ensure_future(datasource.queues.wait(Q, 30))
    await asyncio.sleep(0.02)
    await datasource.queues.put([msg(1, destination="/queue/other")])
    await asyncio.sleep(0.1)  # the other destination's wake-up, and its echo from the database, have had time
    assert not waiter.done()
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter


async def test_stats_peek_destinations_purge(datasource: Datasource) -> None:
    queues = datasource.queues
    await queues.put([msg(n) for n in range(5)] + [msg(9, destination="/queue/other", priority=9)])
    await claim(datasource, limit=2)
    stats = await queues.stats(Q, now_ms=NOW)
    assert (stats.ready, stats.unacked) == (3, 2)
    lapsed = await queues.stats(Q, now_ms=NOW + LEASE)
    assert (lapsed.ready, lapsed.unacked) == (5, 0)
    assert numbers(await queues.peek(Q, limit=2, now_ms=NOW)) == ["2", "3"]
    assert numbers(await queues.peek(Q, limit=10, offset=1, now_ms=NOW)) == ["3", "4"]
    assert numbers(await queues.peek(Q, limit=10, now_ms=NOW, selector=lambda h: h["n"] != "3")) == ["2", "4"]
    assert numbers(await queues.peek(Q, limit=10, now_ms=NOW + LEASE)) == ["0", "1", "2", "3", "4"]
    peeked = await queues.peek(Q, limit=10, now_ms=NOW)
    assert all(m.deliveries == 0 for m in peeked)
    assert sorted(await queues.destinations()) == sorted([Q, "/queue/other"])
    assert await queues.purge(Q) == 5
    assert await queues.destinations() == ["/queue/other"]
    assert (await queues.stats(Q, now_ms=NOW)).ready == 0
    assert await claim(datasource, now=NOW + LEASE) == []
    assert await queues.purge("/queue/unknown") == 0


async def test_put_of_many_is_stored_in_order(datasource: Datasource) -> None:
    batch = [msg(n, body=bytes(256)) for n in range(1000)]
    await datasource.queues.put(batch)
    got = await claim(datasource, limit=1000)
    assert [m.message_id for m in got] == [m.message_id for m in batch]


# -- TailQueue -------------------------------------------------------------------------------------------------------

T = "/topic/contract"


async def publish(ds: Datasource, count: int, start: int = 0) -> list[int]:
    return await ds.topics.publish([msg(n, destination=T) for n in range(start, start + count)])


def published(event: TailEvent) -> Published:
    assert isinstance(event, Published), event
    return event


async def test_publish_positions_increase(tail_datasource: Datasource) -> None:
    assert await tail_datasource.topics.last_position() == 0
    first = await publish(tail_datasource, 3)
    second = await publish(tail_datasource, 2, start=3)
    positions = first + second
    assert positions == sorted(positions) and len(set(positions)) == 5
    assert await tail_datasource.topics.last_position() == positions[-1]
    assert await tail_datasource.topics.publish([]) == []


async def test_follow_from_none_is_live_only(tail_datasource: Datasource) -> None:
    await publish(tail_datasource, 3)
    follower = tail_datasource.topics.follow(after=None)
    try:
        first = asyncio.ensure_future(next_event(follower))
        await asyncio.sleep(0.3)  # let the follower attach (a backend may find "the end" when iteration starts)
        positions = await publish(tail_datasource, 2, start=3)
        events = [published(await first), published(await next_event(follower))]
        assert [e.position for e in events] == positions
        assert [e.message.headers["n"] for e in events] == ["3", "4"]
        assert events[0].message.destination == T
        assert events[0].message.body == b"body 3"
        await no_event(follower)
    finally:
        await follower.aclose()  # type: ignore[attr-defined]


async def test_follow_after_a_position_replays_then_goes_live(tail_datasource: Datasource) -> None:
    positions = await publish(tail_datasource, 5)
    follower = tail_datasource.topics.follow(after=positions[1])
    try:
        replayed = [published(await next_event(follower)) for _ in range(3)]
        assert [e.position for e in replayed] == positions[2:]
        live_task = asyncio.ensure_future(next_event(follower))
        await asyncio.sleep(0.05)
        [live_position] = await publish(tail_datasource, 1, start=5)
        live = published(await live_task)
        assert live.position == live_position
        assert live.message.headers["n"] == "5"
    finally:
        await follower.aclose()  # type: ignore[attr-defined]


async def test_two_followers_each_see_everything(tail_datasource: Datasource) -> None:
    a = tail_datasource.topics.follow(after=None)
    b = tail_datasource.topics.follow(after=None)
    try:
        firsts = [asyncio.ensure_future(next_event(f)) for f in (a, b)]
        await asyncio.sleep(0.3)  # let the followers attach
        positions = await publish(tail_datasource, 4)
        for follower, first in zip((a, b), firsts):
            got = [published(await first).position] + [published(await next_event(follower)).position for _ in range(3)]
            assert got == positions
    finally:
        await a.aclose()  # type: ignore[attr-defined]
        await b.aclose()  # type: ignore[attr-defined]


async def test_follow_reports_a_gap_when_retention_was_trimmed(tail_datasource: Datasource) -> None:
    positions: list[int] = []
    for start in range(0, 4 * TOPIC_RETENTION, 25):
        positions += await publish(tail_datasource, 25, start=start)
    trim = getattr(tail_datasource.topics, "trim", None)  # a backend that trims lazily documents this hook
    if trim is not None:
        await trim()
    follower = tail_datasource.topics.follow(after=positions[0])
    try:
        gap = await next_event(follower)
        assert isinstance(gap, Gap), gap
        assert gap.expected == positions[1]
        assert positions[1] < gap.oldest <= positions[-TOPIC_RETENTION]
        rest = [published(await next_event(follower)) for _ in range(positions[-1] - gap.oldest + 1)]
        assert [e.position for e in rest] == list(range(gap.oldest, positions[-1] + 1))
        await no_event(follower)
    finally:
        await follower.aclose()  # type: ignore[attr-defined]


async def test_no_gap_when_the_window_reaches_back(tail_datasource: Datasource) -> None:
    positions = await publish(tail_datasource, 10)
    follower = tail_datasource.topics.follow(after=positions[0])
    try:
        assert published(await next_event(follower)).position == positions[1]
    finally:
        await follower.aclose()  # type: ignore[attr-defined]


async def test_cursors_save_and_load(tail_datasource: Datasource) -> None:
    topics = tail_datasource.topics
    assert await topics.load_cursor("client-1/sub-1") is None
    await topics.save_cursor("client-1/sub-1", 7)
    await topics.save_cursor("client-1/sub-2", 3)
    assert await topics.load_cursor("client-1/sub-1") == 7
    await topics.save_cursor("client-1/sub-1", 12)
    assert await topics.load_cursor("client-1/sub-1") == 12
    assert await topics.load_cursor("client-1/sub-2") == 3
    await topics.delete_cursor("client-1/sub-1")
    assert await topics.load_cursor("client-1/sub-1") is None
    assert await topics.load_cursor("client-1/sub-2") == 3
    await topics.delete_cursor("client-1/sub-1")  # deleting what is gone is no error


async def test_ping(datasource: Datasource) -> None:
    await datasource.ping()


@pytest.mark.parametrize("how", [Release.REQUEUE, Release.DEAD_LETTER])
async def test_release_wakes_nothing_lost(datasource: Datasource, how: Release) -> None:
    await datasource.queues.put([msg(n) for n in range(20)])
    got = await claim(datasource, limit=20)
    await datasource.queues.release([m.message_id for m in got], how)
    destination = Q if how is Release.REQUEUE else Q + ".DLQ"
    assert len(await claim(datasource, destination=destination, limit=100)) == 20


async def test_a_put_between_an_empty_claim_and_the_wait_is_not_missed(datasource: Datasource) -> None:
    """The eventcount: the token taken before the claim sees a put made after the claim came back empty."""
    token = datasource.queues.wake_token(Q)
    assert await claim(datasource) == []
    await datasource.queues.put([msg(1)])  # lands between the empty claim and the wait
    started = time.monotonic()
    await datasource.queues.wait(Q, 30.0, token)
    assert time.monotonic() - started < 5.0  # woken, not timed out (30 s)
    assert numbers(await claim(datasource)) == ["1"]



class CountingSelector:
    """A selector that counts how many messages it examined: what a claim costs the gateway."""

    def __init__(self, wanted: str) -> None:
        self.wanted = wanted
        self.calls = 0

    def __call__(self, headers: Mapping[str, str]) -> bool:
        self.calls += 1
        return headers.get("color") == self.wanted


async def scan_claim(ds: Datasource, selector: CountingSelector, mark: ScanMark, owner: str = "o1") -> list[StoredMessage]:
    selector.calls = 0
    return await ds.queues.claim(Q, owner=owner, limit=10, lease_ms=LEASE, now_ms=NOW, selector=selector, scan=mark)


async def test_a_selector_scan_of_a_deep_backlog_is_bounded_per_claim_and_goes_on(datasource: Datasource) -> None:
    deep = 3 * SCAN_BUDGET + 10
    await datasource.queues.put([msg(i, headers={"color": "blue"}) for i in range(deep)])
    await datasource.queues.put([msg("wanted", headers={"color": "red", "n": "wanted"})])
    selector, mark = CountingSelector("red"), ScanMark()
    got: list[StoredMessage] = []
    claims = 0
    while not got:
        got = await scan_claim(datasource, selector, mark)
        claims += 1
        assert selector.calls <= SCAN_BUDGET  # a bounded cost per claim, whatever the depth
        assert got or mark.more, "an empty claim before the end of the backlog must say there is more"
        assert claims <= deep // SCAN_BUDGET + 2, "the scan must go on from where it stopped, not start over"
    assert [m.headers["n"] for m in got] == ["wanted"]


async def test_a_requeue_or_a_higher_priority_put_is_seen_by_a_finished_scan(datasource: Datasource) -> None:
    await datasource.queues.put([msg("r1", headers={"color": "red", "n": "r1"})])
    [taken] = await claim(datasource, owner="other")  # another consumer holds the only red message
    await datasource.queues.put([msg(i, headers={"color": "blue"}) for i in range(20)])
    selector, mark = CountingSelector("red"), ScanMark()
    assert await scan_claim(datasource, selector, mark) == [] and not mark.more
    await datasource.queues.release([taken.message_id], Release.REQUEUE)  # back at its old place, before the mark
    assert [m.headers["n"] for m in await scan_claim(datasource, selector, mark)] == ["r1"]
    assert await scan_claim(datasource, selector, mark) == []
    await datasource.queues.put([msg("urgent", priority=9, headers={"color": "red", "n": "urgent"})])
    assert [m.headers["n"] for m in await scan_claim(datasource, selector, mark)] == ["urgent"]


async def test_a_finished_scan_examines_only_what_is_new_on_a_local_store(datasource: Datasource) -> None:
    await datasource.queues.put([msg(i, headers={"color": "blue"}) for i in range(300)])
    selector, mark = CountingSelector("red"), ScanMark()
    assert await scan_claim(datasource, selector, mark) == []
    assert selector.calls == 300
    await datasource.queues.put([msg("late", headers={"color": "blue"})])
    assert await scan_claim(datasource, selector, mark) == []
    if datasource.shared or not datasource.queues.puts_visible_in_seq_order:
        # other gateways' puts cannot be seen, or a put of the mark's priority may sort before it: a finished scan
        # starts over (bounded by its budget)
        assert selector.calls == 301
    else:
        assert selector.calls == 1  # not the 300 it had already found not matching


async def test_a_peek_with_a_selector_examines_a_bounded_part_of_the_backlog(datasource: Datasource) -> None:
    await datasource.queues.put([msg(i, headers={"color": "blue"}) for i in range(PEEK_SCAN_LIMIT + 5)])
    await datasource.queues.put([msg("deep", headers={"color": "red"})])
    selector = CountingSelector("red")
    peeked = await datasource.queues.peek(Q, limit=10, now_ms=NOW, selector=selector)
    assert peeked == [] and selector.calls <= PEEK_SCAN_LIMIT


async def test_a_late_ack_or_release_under_a_lapsed_lease_touches_nothing(datasource: Datasource) -> None:
    """Leases are fenced: consumer A's lease lapses (its gateway stalled), B claims the message again; A's late ACK
    or NACK, carrying A's lease token, must neither delete nor requeue what B now holds."""
    await datasource.queues.put([msg(1), msg(2)])
    first = await claim(datasource, owner="a", limit=2)
    assert len(first) == 2 and len({m.lease for m in first}) >= 1
    later = NOW + LEASE + 1  # A's leases have lapsed
    again = await claim(datasource, owner="b", limit=2, now=later)
    assert sorted(m.message_id for m in again) == sorted(m.message_id for m in first)
    lease_a = {m.message_id: m.lease for m in first}
    lease_b = {m.message_id: m.lease for m in again}
    assert all(lease_a[i] != lease_b[i] for i in lease_a)  # every claim gets a new token
    ids = sorted(lease_a)
    await datasource.queues.ack(ids, [lease_a[i] for i in ids])  # A's late ACK
    await datasource.queues.release(ids, Release.DEAD_LETTER, [lease_a[i] for i in ids])  # A's late NACK
    stats = await datasource.queues.stats(Q, now_ms=later)
    assert (stats.ready, stats.unacked) == (0, 2)  # both still held by B, nothing deleted or moved
    await datasource.queues.release([ids[0]], Release.REQUEUE, [lease_b[ids[0]]])  # B's own release works
    await datasource.queues.ack([ids[1]], [lease_b[ids[1]]])  # and B's own ACK
    stats = await datasource.queues.stats(Q, now_ms=later)
    assert (stats.ready, stats.unacked) == (1, 0)


async def test_acks_of_one_message_under_two_leases_in_one_batch_are_each_judged(datasource: Datasource) -> None:
    """One ACK batch may name a message twice: a late consumer's stale lease and the new holder's. The new holder's
    ACK must still delete it (a dict by id once kept only one of the two leases)."""
    await datasource.queues.put([msg(1)])
    [old] = await claim(datasource, owner="g1")
    [new] = await claim(datasource, owner="g1", now=NOW + LEASE + 1)  # the first lease lapsed: claimed again
    await datasource.queues.ack([new.message_id, old.message_id], [new.lease, old.lease])
    stats = await datasource.queues.stats(Q, now_ms=NOW + LEASE + 1)
    assert (stats.ready, stats.unacked) == (0, 0)
    await datasource.queues.put([msg(2)])
    [old] = await claim(datasource, owner="g1")
    [new] = await claim(datasource, owner="g1", now=NOW + LEASE + 1)
    await datasource.queues.release([new.message_id, old.message_id], Release.REQUEUE, [new.lease, old.lease])
    stats = await datasource.queues.stats(Q, now_ms=NOW + LEASE + 1)
    assert (stats.ready, stats.unacked) == (1, 0)


async def test_a_late_ack_with_no_claim_since_still_deletes(datasource: Datasource) -> None:
    """Only a later claim changes the lease: a consumer that was merely slow (its lease lapsed, nobody took the
    message) still acknowledges it, on every store."""
    await datasource.queues.put([msg(1)])
    [got] = await claim(datasource, owner="a")
    later = NOW + LEASE + 1  # a's lease lapsed; b looks (its selector takes nothing), which requeues lapsed leases
    taken = await datasource.queues.claim(Q, owner="b", limit=1, lease_ms=LEASE, now_ms=later, selector=lambda h: False)
    assert taken == []
    await datasource.queues.ack([got.message_id], [got.lease])
    stats = await datasource.queues.stats(Q, now_ms=NOW + LEASE + 1)
    assert (stats.ready, stats.unacked) == (0, 0)


# -- Datasource.apply (a STOMP COMMIT) --------------------------------------------------------------------------------


async def test_apply_stores_sends_and_settles_held_messages_together(datasource: Datasource) -> None:
    await datasource.queues.put([msg(1), msg(2), msg(3)])
    one, two, three = await claim(datasource)
    follower = datasource.topics.follow(after=None)
    try:
        await datasource.apply(
            Changes(
                queue=[msg(4, destination="/queue/contract.out")],
                topic=[msg(5, destination="/topic/contract")],
                acks=[(one.message_id, one.lease)],
                requeue=[(two.message_id, two.lease)],
                dead_letter=[(three.message_id, three.lease)],
            )
        )
        event = await next_event(follower)
        assert isinstance(event, Published) and event.message.headers["n"] == "5"
    finally:
        await follower.aclose()  # type: ignore[attr-defined]
    assert numbers(await claim(datasource, destination="/queue/contract.out")) == ["4"]
    assert numbers(await claim(datasource)) == ["2"]  # requeued; the ACKed one is gone
    assert numbers(await claim(datasource, destination=Q + ".DLQ")) == ["3"]


async def test_apply_that_fails_part_way_leaves_the_acks_undone(datasource: Datasource) -> None:
    """The injected failure: the COMMIT's second queue message reuses a stored message id, which every store
    refuses. A store with transactions (``atomic_changes``) then shows nothing of the COMMIT; every store leaves its
    ACKs undone, because writes go first (a consumer's input is never deleted while its output was lost)."""
    await datasource.queues.put([msg("held"), msg("taken")])
    held = (await claim(datasource, limit=1))[0]
    with pytest.raises(DatasourceError):
        await datasource.apply(
            Changes(
                queue=[msg(1, destination="/queue/contract.out"), msg("taken", destination="/queue/contract.out")],
                topic=[msg(2, destination="/topic/contract")],
                acks=[(held.message_id, held.lease)],
            )
        )
    if datasource.atomic_changes:
        assert await claim(datasource, destination="/queue/contract.out") == []
        assert await datasource.topics.last_position() == 0
    # not ACKed: still held under its lease, and back to the next consumer once that lapses
    assert (await datasource.queues.stats(Q, now_ms=NOW)).unacked == 1
    assert [m.message_id for m in await claim(datasource, now=NOW + LEASE + 1)] == ["held", "taken"]
