"""MongoDB-specific behaviour (FerretDB here, ``MONGODB_URL`` elsewhere): exactly-once claims across processes,
wrapped collections, native selectors, the failover buffer."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import uuid
from collections.abc import AsyncIterator

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import BulkWriteError

from app.datasources.interface import (
    Datasource,
    DatasourceOptions,
    NewMessage,
    Published,
    QueueStats,
    Release,
    WrappedCollection,
)
from app.datasources.mongodb import topics as topics_module
from app.datasources.mongodb._common import Collection, whose_duplicates
from app.datasources.mongodb.topics import MongoTailQueue, topic_doc
from app.datasources.registry import open_datasource
from tests.mongodb_server import FerretDBServer, require_ferretdb

pytestmark = pytest.mark.mongodb

NOW = 1_700_000_000_000
Q = "/queue/mongo"


def msg(n: int, headers: dict[str, str] | None = None, destination: str = Q) -> NewMessage:
    return NewMessage(
        message_id=f"m{n}-{uuid.uuid4().hex[:8]}",
        destination=destination,
        headers=headers if headers is not None else {"n": str(n)},
        body=f"body {n}".encode(),
        published_at=NOW,
    )


@pytest.fixture
async def ds(mongodb_url: str) -> AsyncIterator[Datasource]:
    d = await open_datasource(mongodb_url, DatasourceOptions(namespace=f"t{uuid.uuid4().hex[:12]}"))
    try:
        yield d
    finally:
        await d.close()


async def test_native_selector_is_evaluated_in_the_database(ds: Datasource) -> None:
    assert ds.native_selectors
    await ds.queues.put(
        [
            msg(1, {"type": "order", "priority": "7", "x.y": "1"}),
            msg(2, {"type": "order", "priority": "3"}),
            msg(3, {"type": "quote", "priority": "9"}),
        ]
    )
    got = await ds.queues.claim(
        Q, owner="o", limit=10, lease_ms=1000, now_ms=NOW,
        native_selector={"type": "order", "priority": {"$gt": "5"}},
    )
    assert [m.headers["priority"] for m in got] == ["7"]
    assert got[0].headers["x.y"] == "1"
    got = await ds.queues.claim(
        Q, owner="o", limit=10, lease_ms=1000, now_ms=NOW, native_selector={"$or": [{"type": "quote"}, {"priority": "3"}]}
    )
    assert sorted(m.headers["type"] for m in got) == ["order", "quote"]


async def test_wrapped_collection_is_delivered_as_json(mongodb_url: str) -> None:
    name = f"jobs{uuid.uuid4().hex[:8]}"
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_url)
    try:
        jobs = client.get_default_database("stompgate")[name]
        await jobs.insert_many([{"kind": "video", "n": i} for i in range(3)] + [{"kind": "audio", "n": 9}])
        options = DatasourceOptions(
            namespace=f"t{uuid.uuid4().hex[:12]}",
            wrapped=(WrappedCollection(destination="/queue/jobs.video", collection=name, filter={"kind": "video"}),),
        )
        ds = await open_datasource(mongodb_url, options)
        try:
            first = await ds.queues.claim("/queue/jobs.video", owner="a", limit=2, lease_ms=60_000, now_ms=NOW)
            assert len(first) == 2
            assert first[0].headers["content-type"] == "application/json"
            assert json.loads(first[0].body)["kind"] == "video"
            assert "_sg_state" not in json.loads(first[0].body)
            # leased: another claimer gets only the third
            second = await ds.queues.claim("/queue/jobs.video", owner="b", limit=5, lease_ms=60_000, now_ms=NOW)
            assert [json.loads(m.body)["n"] for m in second] == [2]
            await ds.queues.ack([first[0].message_id])
            await ds.queues.release([first[1].message_id], Release.REQUEUE)
            again = await ds.queues.claim("/queue/jobs.video", owner="c", limit=5, lease_ms=60_000, now_ms=NOW)
            assert [m.message_id for m in again] == [first[1].message_id]
            assert again[0].deliveries == 2
            assert await jobs.count_documents({"kind": "video"}) == 2  # one acked = deleted
            assert await jobs.count_documents({"kind": "audio"}) == 1  # never touched
        finally:
            await ds.close()
    finally:
        await client.close()


async def test_a_dead_lettered_document_is_acked_in_the_dlq(mongodb_url: str) -> None:
    # The copy in <destination>.DLQ is a message of the gateway's own queue: its ACK deletes it there (an id with the
    # wrapped prefix was routed to the wrapped collection, deleted nothing, and the dead letter came back forever).
    name = f"jobs{uuid.uuid4().hex[:8]}"
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_url)
    try:
        jobs = client.get_default_database("stompgate")[name]
        await jobs.insert_one({"kind": "video", "n": 1})
        options = DatasourceOptions(
            namespace=f"t{uuid.uuid4().hex[:12]}",
            wrapped=(WrappedCollection(destination="/queue/jobs.video", collection=name, filter={"kind": "video"}),),
        )
        ds = await open_datasource(mongodb_url, options)
        try:
            [job] = await ds.queues.claim("/queue/jobs.video", owner="a", limit=5, lease_ms=60_000, now_ms=NOW)
            await ds.queues.release([job.message_id], Release.DEAD_LETTER, [job.lease])
            assert await jobs.count_documents({}) == 0
            dlq = "/queue/jobs.video.DLQ"
            [dead] = await ds.queues.claim(dlq, owner="a", limit=5, lease_ms=60_000, now_ms=NOW)
            assert json.loads(dead.body)["n"] == 1
            await ds.queues.ack([dead.message_id], [dead.lease])
            assert await ds.queues.stats(dlq, now_ms=NOW + 120_000) == QueueStats(ready=0, unacked=0)
        finally:
            await ds.close()
    finally:
        await client.close()


def _claimer_process(url: str, namespace: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    async def run() -> list[str]:
        ds = await open_datasource(url, DatasourceOptions(namespace=namespace))
        try:
            async def one(owner: str) -> list[str]:
                mine: list[str] = []
                empty = 0
                while empty < 3:
                    got = await ds.queues.claim(Q, owner=owner, limit=25, lease_ms=600_000, now_ms=NOW)
                    if not got:
                        empty += 1
                        await asyncio.sleep(0.05)
                        continue
                    empty = 0
                    mine += [m.message_id for m in got]
                return mine

            parts = await asyncio.gather(one(f"{namespace}-{uuid.uuid4().hex[:4]}-a"), one("b" + uuid.uuid4().hex[:4]))
            return [i for p in parts for i in p]
        finally:
            await ds.close()

    out.put(asyncio.run(run()))


@pytest.mark.slow
async def test_two_processes_claim_each_message_exactly_once(mongodb_url: str) -> None:
    """Two processes claiming from one server through the datasource, two claimers in each, 1,500 messages: each
    claimed exactly once, none lost. (The issue's 5,000 messages run through two gateways and four STOMP consumers in
    tests/integration/test_mongodb_gateways.py; here, below the gateway, the claims race without one. Here the time
    grows faster than the backlog: 5,000 messages took 80 s on each server, 1,500 take 11 s.)"""
    total = 1_500
    namespace = f"t{uuid.uuid4().hex[:12]}"
    ds = await open_datasource(mongodb_url, DatasourceOptions(namespace=namespace))
    try:
        messages = [msg(n) for n in range(total)]
        await ds.queues.put(messages)
        ctx = multiprocessing.get_context("spawn")
        out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
        procs = [ctx.Process(target=_claimer_process, args=(mongodb_url, namespace, out)) for _ in range(2)]
        for p in procs:
            p.start()
        results = [await asyncio.to_thread(out.get, True, 300) for _ in procs]
        for p in procs:
            await asyncio.to_thread(p.join, 10)
        everything = [i for r in results for i in r]
        assert len(everything) == len(set(everything)), "a message was claimed twice"
        assert set(everything) == {m.message_id for m in messages}, "a message was lost"
    finally:
        await ds.close()


@pytest.mark.slow
async def test_puts_survive_a_server_kill_and_restart() -> None:
    server = FerretDBServer(require_ferretdb())
    server.start()
    try:
        ds = await open_datasource(
            server.url, DatasourceOptions(namespace="fo", server_selection_timeout_ms=500, failover_buffer=1000)
        )
        try:
            stored: list[str] = []

            async def producer() -> None:
                for n in range(300):
                    m = msg(n)
                    await ds.queues.put([m])
                    stored.append(m.message_id)

            task = asyncio.create_task(producer())
            while len(stored) < 50:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.start)
            await asyncio.wait_for(task, 60)
            got = await ds.queues.peek(Q, limit=1000, now_ms=NOW)
            assert {m.message_id for m in got} >= set(stored)
            await ds.ping()
        finally:
            await ds.close()
    finally:
        server.cleanup()


async def test_a_duplicate_that_this_very_call_wrote_is_told_from_another_message(mongodb_url: str) -> None:
    """An insert refused as a duplicate is judged by what is stored: its own documents (an earlier attempt of the same
    call got in, its reply lost), nothing at all (FerretDB answers a duplicate key error for an insert racing its
    catalogue set-up right after a restart: a publish then failed as "already stored" in the restart test below), or
    another message with that id (a real duplicate). The number only that call was given (position, seq) tells."""
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_url)
    try:
        coll = Collection(client.get_default_database("stompgate")[f"dup{uuid.uuid4().hex[:8]}"])
        await coll.insert_many([{"_id": "a", "position": 5}, {"_id": "b", "position": 6}])
        with pytest.raises(BulkWriteError) as own:
            await coll.insert_many([{"_id": "a", "position": 5}, {"_id": "c", "position": 7}])
        assert await whose_duplicates(coll, own.value, "position") == "ours"
        with pytest.raises(BulkWriteError) as other:
            await coll.insert_many([{"_id": "b", "position": 9}])
        assert await whose_duplicates(coll, other.value, "position") == "other"
        await coll.delete_many({"_id": "a"})  # what the refused insert named is not there: not about our documents
        assert await whose_duplicates(coll, own.value, "position") == "absent"
    finally:
        await client.close()


@pytest.mark.slow
async def test_the_tailable_follower_resumes_after_the_server_restarts_under_it() -> None:
    """The MongoDB way of following the log (a tailable awaitData cursor) on a server that is killed and started
    again while the follower waits in it: the follower opens a new cursor from where it was and goes on, in order,
    with nothing skipped and nothing repeated. FerretDB keeps its data in PostgreSQL across the restart, which a
    real MongoDB does too; the in-memory test server would start empty, so the restart is FerretDB's."""
    server = FerretDBServer(require_ferretdb())
    server.start()
    try:
        ds = await open_datasource(
            server.url, DatasourceOptions(namespace="tr", server_selection_timeout_ms=500, failover_buffer=1000)
        )
        try:
            topics = ds.topics
            assert isinstance(topics, MongoTailQueue)
            topics.follow_mode = "cursor"
            t = "/topic/restart"
            assert await topics.publish([msg(n, destination=t) for n in range(10)]) == list(range(1, 11))
            follower = topics.follow(after=0)
            first = [await asyncio.wait_for(follower.__anext__(), 15) for _ in range(10)]
            assert [e.position for e in first if isinstance(e, Published)] == list(range(1, 11))
            waiting = asyncio.ensure_future(follower.__anext__())  # the cursor is open, nothing more to read
            await asyncio.to_thread(server.kill)
            await asyncio.to_thread(server.start)
            assert await topics.publish([msg(n, destination=t) for n in range(10, 20)]) == list(range(11, 21))
            rest = [await asyncio.wait_for(waiting, 60)]
            rest += [await asyncio.wait_for(follower.__anext__(), 30) for _ in range(9)]
            assert [e.position for e in rest if isinstance(e, Published)] == list(range(11, 21))
        finally:
            await ds.close()
    finally:
        server.cleanup()


async def test_full_failover_buffer_refuses_at_once() -> None:
    server = FerretDBServer(require_ferretdb())
    server.start()
    try:
        ds = await open_datasource(
            server.url, DatasourceOptions(namespace="fb", server_selection_timeout_ms=300, failover_buffer=2)
        )
        try:
            await asyncio.to_thread(server.stop)
            from app.datasources.interface import DatasourceUnavailable

            with pytest.raises(DatasourceUnavailable):
                await ds.ping()
            waiting = asyncio.create_task(ds.queues.put([msg(1), msg(2)]))
            await asyncio.sleep(0.8)
            with pytest.raises(DatasourceUnavailable, match="failover buffer full: 2 messages"):
                await ds.queues.put([msg(3)])
            await asyncio.to_thread(server.start)
            await asyncio.wait_for(waiting, 30)
            assert (await ds.queues.stats(Q, now_ms=NOW)).ready == 2
        finally:
            await ds.close()
    finally:
        server.cleanup()


@pytest.mark.parametrize("follow_mode", ["poll", "cursor"])
async def test_a_follower_waits_for_earlier_positions_committed_later(
    mongodb_url: str, follow_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two gateways reserve positions in batches and can commit out of order: here positions 11..1000 land before
    1..10, and the follower must yield 1..1000 in order, none skipped. The reorder window is set to nothing, so
    only the rule "skip a hole only once a complete look finds nothing in it" keeps 1..10: a cursor reads 11..1000
    first (natural order) and must not skip while it still has documents to read. (Under load, a cursor slower
    than the window lost 100 of 600 deliveries this way in `stompgate bench --gateways 2 --destination-kind topic`
    on FerretDB, before that rule.)"""
    monkeypatch.setattr(topics_module, "REORDER_SETTLE_S", 0.0)
    namespace = f"t{uuid.uuid4().hex[:8]}"
    ds = await open_datasource(mongodb_url, DatasourceOptions(namespace=namespace))
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongodb_url)
    try:
        topics = ds.topics
        assert isinstance(topics, MongoTailQueue)
        topics.follow_mode = follow_mode  # type: ignore[assignment]
        await topics.last_position()  # the capped collection and its seed exist
        coll = client.get_default_database("stompgate")[f"{namespace}.topics"]

        def doc(position: int) -> dict[str, object]:
            message = NewMessage(message_id=f"p{position}", destination="/topic/order", headers={}, body=b"x",
                                 published_at=NOW)  # fmt: skip
            return topic_doc(message, position, (1, 10) if position <= 10 else (11, 1000))

        assert await topics._sequences.allocate("topic", 10) == 1  # gateway A reserves 1..10,
        assert await topics._sequences.allocate("topic", 990) == 11  # gateway B 11..1000 and writes first
        await coll.insert_many([doc(p) for p in range(11, 1001)])
        await coll.insert_many([doc(p) for p in range(1, 11)])
        follower = topics.follow(after=0)
        positions = []
        while len(positions) < 1000:
            event = await asyncio.wait_for(follower.__anext__(), 15)
            assert isinstance(event, Published), event
            positions.append(event.position)
        assert positions == list(range(1, 1001))
    finally:
        await client.close()
        await ds.close()


@pytest.mark.parametrize("follow_mode", ["poll", "cursor"])
async def test_positions_reserved_and_never_written_are_skipped(mongodb_url: str, follow_mode: str) -> None:
    """A publisher that reserved positions and died leaves a hole, here across a block boundary (61..70 with blocks
    of 64): after the reorder window the follower goes on with what was published after it, in order; while
    nothing follows the hole, it holds nothing back and is waited for."""
    ds = await open_datasource(mongodb_url, DatasourceOptions(namespace=f"t{uuid.uuid4().hex[:8]}"))
    try:
        topics = ds.topics
        assert isinstance(topics, MongoTailQueue)
        topics.follow_mode = follow_mode  # type: ignore[assignment]
        assert topics_module.BLOCK == 64
        t = "/topic/holes"
        assert await topics.publish([msg(n, destination=t) for n in range(60)]) == list(range(1, 61))
        assert await topics._sequences.allocate("topic", 10) == 61  # reserved, never written
        follower = topics.follow(after=0)
        first = [await asyncio.wait_for(follower.__anext__(), 10) for _ in range(60)]
        assert [e.position for e in first if isinstance(e, Published)] == list(range(1, 61))
        waiting = asyncio.ensure_future(follower.__anext__())
        await asyncio.sleep(topics_module.REORDER_SETTLE_S + 0.5)
        assert not waiting.done()  # nothing after the hole yet
        assert await topics.publish([msg(n, destination=t) for n in range(5)]) == list(range(71, 76))
        rest = [await asyncio.wait_for(waiting, 10)]
        rest += [await asyncio.wait_for(follower.__anext__(), 10) for _ in range(4)]
        assert [e.position for e in rest if isinstance(e, Published)] == list(range(71, 76))
    finally:
        await ds.close()


@pytest.mark.parametrize("follow_mode", ["poll", "cursor"])
async def test_two_gateways_follow_each_others_publishes_in_order(mongodb_url: str, follow_mode: str) -> None:
    """Two gateways on one log, publishing interleaved batches: each follower yields every position in order, its
    own batches (from memory, in "poll" mode) and the other's (read from the database)."""
    options = DatasourceOptions(namespace=f"t{uuid.uuid4().hex[:8]}")
    a, b = await open_datasource(mongodb_url, options), await open_datasource(mongodb_url, options)
    try:
        followers = []
        for ds in (a, b):
            assert isinstance(ds.topics, MongoTailQueue)
            ds.topics.follow_mode = follow_mode  # type: ignore[assignment]
            followers.append(ds.topics.follow(after=0))
        t = "/topic/two"

        async def publish(ds: Datasource, n: int) -> None:
            for i in range(n):
                await ds.topics.publish([msg(k, destination=t) for k in range(1 + i % 7)])

        await asyncio.gather(publish(a, 30), publish(b, 30))
        end = await a.topics.last_position()
        assert end == 2 * sum(1 + i % 7 for i in range(30))
        for follower in followers:
            events = [await asyncio.wait_for(follower.__anext__(), 10) for _ in range(end)]
            assert [e.position for e in events if isinstance(e, Published)] == list(range(1, end + 1))
    finally:
        await a.close()
        await b.close()
