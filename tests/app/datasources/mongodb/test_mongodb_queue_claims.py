"""The FerretDB claim path of ``MongoPollQueue`` (``ferretdb_claims``): the candidate window's size and reuse, the
skipping of stale copies of this process's own messages (``HeldVersions``), and claim tokens left by a claimer that
died (looked up by ``_id`` when the loss comes round again, ``LostTokens``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.datasources.interface import Datasource, DatasourceOptions, NewMessage
from app.datasources.mongodb import MongoDatasource, ferretdb_claims
from app.datasources.mongodb.ferretdb_claims import (
    LOST_RECHECK_S,
    WINDOW,
    WINDOW_BYTES,
    WINDOW_MAX,
    WINDOW_S,
    HeldVersions,
    LostTokens,
    Window,
    window_size,
)
from app.datasources.mongodb.queues import MongoPollQueue
from app.datasources.registry import open_datasource

NOW = 1_700_000_000_000
Q = "/queue/claims"
LEASE = 60_000


def doc(n: int, claims: int = 0, body: bytes = b"x") -> dict[str, Any]:
    return {"_id": f"m{n}", "priority": 4, "seq": n, "claims": claims, "expires_at": 2**62, "body": body}


# -- pure ------------------------------------------------------------------------------------------------------------


def test_held_skips_stale_copies_of_local_claims_and_acks() -> None:
    held = HeldVersions()
    assert held.mark(doc(1))  # a claim from version 0 starts
    assert not held.mark(doc(1))  # a second copy at version 0 (another window) is stale
    held.settle([doc(1)], [doc(1, claims=1)])  # won: stored now at version 1
    assert not held.mark(doc(1))  # copy read before the lease landed
    assert held.mark(doc(1, claims=1))  # our own lease expired: a legitimate re-claim
    held.settle([doc(1, claims=1)], [])  # ... lost it: forgotten
    assert "m1" not in held.versions
    held.retire(["m1"])  # acked: every copy is stale
    assert not held.mark(doc(1, claims=5))
    held.forget(["m2"])  # releasing something never marked is fine
    assert held.mark(doc(2))
    held.settle([doc(2)], [])  # the claim failed: nothing held
    assert held.mark(doc(2))


def test_a_lost_token_is_looked_up_only_when_it_comes_round_again_later() -> None:
    lost = LostTokens()
    assert not lost.due("q|m1", 1, 100.0)  # first loss: the winner is nearly always alive
    assert not lost.due("q|m1", 1, 100.0 + LOST_RECHECK_S / 2)
    assert lost.due("q|m1", 1, 100.0 + LOST_RECHECK_S)  # still at that version a while later
    assert not lost.due("q|m1", 1, 100.0 + LOST_RECHECK_S * 1.5)  # looked up just now
    assert not lost.due("q|m1", 2, 100.0 + LOST_RECHECK_S * 3)  # another version: a new first loss
    lost.won("q|m1")
    assert not lost.due("q|m1", 2, 100.0 + LOST_RECHECK_S * 4)
    assert not lost.due("q|m2", 1, 10_000.0)  # ... and m1 is dropped as too old
    assert list(lost.seen) == ["q|m2"]


def test_window_takes_fresh_candidates_only() -> None:
    held = HeldVersions()
    window = Window([doc(1), doc(2), {**doc(3), "expires_at": NOW - 1}, doc(4)], NOW, 0, True, 0.0)
    assert [d["_id"] for d in window.take(2, NOW, held)] == ["m1", "m2"]
    stale = Window([doc(1), doc(2), doc(5)], NOW, 0, True, 0.0)
    assert [d["_id"] for d in stale.take(5, NOW, held)] == ["m5"]  # m1, m2 are being claimed here
    assert [d["_id"] for d in window.take(5, NOW, held)] == ["m4"]  # m3 expired


def test_window_reuse_follows_the_read_duration() -> None:
    quick = Window([doc(1)], NOW, 0, False, 0.01)
    assert quick.max_age == WINDOW_S
    assert quick.usable(NOW + 200, 0)
    assert not quick.usable(NOW + int(WINDOW_S * 1000), 0)  # leases that expired since must be seen
    assert not quick.usable(NOW, 1)  # a local release or purge
    slow = Window([doc(1)], NOW, 0, False, 0.2)
    assert slow.max_age == pytest.approx(0.8)
    assert slow.usable(NOW + 700, 0)  # not re-read every WINDOW_MS while a read costs this much
    assert not slow.usable(NOW + 800, 0)
    assert not slow.usable(NOW + LEASE, 0)


def test_window_size_grows_behind_a_backlog_within_the_byte_budget() -> None:
    assert window_size(None, 100) == WINDOW
    assert window_size(None, 400) == 800
    complete = Window([doc(1)], NOW, 0, True, 0.0)
    assert window_size(complete, 10) == WINDOW
    small = Window([doc(i, body=b"x" * 256) for i in range(WINDOW)], NOW, 0, False, 0.0)
    assert window_size(small, 10) == WINDOW_MAX
    large = Window([doc(i, body=b"x" * (WINDOW_BYTES // 100)) for i in range(4)], NOW, 0, False, 0.0)
    assert window_size(large, 10) == WINDOW


# -- on the server ---------------------------------------------------------------------------------------------------


@pytest.fixture
async def ds(ferretdb_url: str) -> AsyncIterator[Datasource]:
    """On FerretDB alone: the claim-token path these tests are about runs there only (mongo-java-server and a real
    MongoDB claim with ``find_one_and_update``)."""
    d = await open_datasource(ferretdb_url, DatasourceOptions(namespace=f"t{uuid.uuid4().hex[:12]}"))
    try:
        assert isinstance(d, MongoDatasource) and d.is_ferretdb
        yield d
    finally:
        await d.close()


def new(n: int) -> NewMessage:
    return NewMessage(message_id=f"m{n}-{uuid.uuid4().hex[:8]}", destination=Q, headers={}, body=f"{n}".encode(),
                      published_at=NOW)  # fmt: skip


class CountingFindOne:
    def __init__(self, queue: MongoPollQueue) -> None:
        self.calls = 0
        self._inner = queue._claims.find_one
        queue._claims.find_one = self  # type: ignore[method-assign]

    async def __call__(self, filter: dict[str, Any], **kw: Any) -> Any:
        self.calls += 1
        return await self._inner(filter, **kw)


@pytest.mark.mongodb
async def test_stale_window_copies_of_claimed_and_acked_messages_cost_no_token(ds: Datasource) -> None:
    queue = ds.queues
    assert isinstance(queue, MongoPollQueue)
    msgs = [new(i) for i in range(6)]
    await queue.put(msgs)
    before = await queue._coll.find_list({"destination": Q}, sort=[("seq", 1)])  # every copy shows version 0
    lookups = CountingFindOne(queue)

    first = await queue.claim(Q, owner="g", limit=2, lease_ms=LEASE, now_ms=NOW)
    assert [m.message_id for m in first] == [m.message_id for m in msgs[:2]]
    # a window read before those leases landed: its copies of m0, m1 must not be claimed again
    queue._windows[Q] = Window(list(before), NOW, queue._generation[Q], True, 0.0)
    second = await queue.claim(Q, owner="g", limit=2, lease_ms=LEASE, now_ms=NOW)
    assert [m.message_id for m in second] == [m.message_id for m in msgs[2:4]]

    await queue.ack([m.message_id for m in first + second])
    queue._windows[Q] = Window(list(before), NOW, queue._generation[Q], True, 0.0)
    third = await queue.claim(Q, owner="g", limit=6, lease_ms=LEASE, now_ms=NOW)
    assert [m.message_id for m in third] == [m.message_id for m in msgs[4:]]
    assert lookups.calls == 0  # no token was lost, so none was looked up
    assert await queue._claims.count_documents({}) == 6


@pytest.mark.mongodb
async def test_a_token_of_a_claimer_that_died_is_passed_over(ds: Datasource, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ferretdb_claims, "LOST_RECHECK_S", 0.0)
    queue = ds.queues
    assert isinstance(queue, MongoPollQueue)
    dead, alive = new(1), new(2)
    await queue.put([dead, alive])
    at = int(time.time() * 1000)
    # claimers that inserted their tokens and never wrote the lease: one lease expired, one still running
    await queue._claims.insert_many([
        {"_id": f"q|{dead.message_id}|1", "m": dead.message_id, "until": NOW - 1, "at": at},
        {"_id": f"q|{alive.message_id}|1", "m": alive.message_id, "until": NOW + LEASE, "at": at},
    ])  # fmt: skip
    lookups = CountingFindOne(queue)
    assert await queue.claim(Q, owner="g", limit=2, lease_ms=LEASE, now_ms=NOW) == []
    assert lookups.calls == 0  # a first loss: the holder is taken to be alive
    claimed = await queue.claim(Q, owner="g", limit=2, lease_ms=LEASE, now_ms=NOW)
    assert [m.message_id for m in claimed] == [dead.message_id]
    assert lookups.calls == 2  # lost again: one look-up by ``_id`` per lost token
    stored = await queue._coll.find_one({"_id": dead.message_id})
    assert stored is not None and stored["claims"] == 2 and stored["owner"] == "g"
    untouched = await queue._coll.find_one({"_id": alive.message_id})
    assert untouched is not None and untouched["claims"] == 0 and untouched["state"] == "ready"
