"""Queues on Redis: each state change one script (``scripts``), the rules of ``app.datasources.rules`` in Lua.

A claim without a selector is one script: expired messages swept, lapsed leases ready again, the first ``limit``
ready ones (in claim order, the ``ready`` sorted set's order) leased. Scripts run one at a time on the server, so no
two claims, from any gateway, take the same message.

Selectors are evaluated in Python while scanning the ready backlog in claim order (``app.datasources.scanning``): a
script returns a window of ready ids with their headers after the subscription's mark, and a second script claims the
chosen ids, each only if still ready. Another gateway's puts and requeues reach the ``ScanBook`` through the
notification channel. A destination's messages become visible in seq order (seq is taken inside the put's script).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from app.datasources import rules
from app.datasources.interface import (
    PEEK_SCAN_LIMIT,
    SCAN_BUDGET,
    HeaderFilter,
    NewMessage,
    PollQueue,
    QueueStats,
    Release,
    ScanMark,
    StoredMessage,
)
from app.datasources.redis.store import Store, _text, message_from, order_key, order_score
from app.datasources.scanning import ScanBook, scan_in_order
from app.datasources.sql_rows import decode_headers
from app.datasources.wakeups import Signals

__all__ = ["RedisPollQueue"]

PEEK_BATCH = 256


class RedisPollQueue(PollQueue):
    puts_visible_in_seq_order = True

    def __init__(self, store: Store) -> None:
        self._store = store
        self._signals = Signals()
        self._scans = ScanBook()
        store.on_notification(self._notified)
        store.on_listener_lost(self._listener_lost)

    # -- notifications ---------------------------------------------------------------------------------------------

    def _notified(self, payload: str) -> None:
        kind, _, destination = payload.partition(":")
        if kind.startswith("p") and kind[1:].isdigit():
            self._scans.put(destination, int(kind[1:]))
        elif kind == "r":
            self._scans.requeue(destination)
        else:
            return  # a topic's
        self._signals.notify(destination)

    def _listener_lost(self) -> None:
        """Notifications may have been missed: every scan starts over and every waiter looks again."""
        self._scans.requeue_all()
        self._signals.notify_all()

    # -- after a write ---------------------------------------------------------------------------------------------

    def after_put(self, messages: Sequence[NewMessage]) -> None:
        """Local waiters and scans learn at once (the notification also comes back later)."""
        for m in messages:
            self._scans.put(m.destination, m.priority)
        for destination in {m.destination for m in messages}:
            self._signals.notify(destination)

    def after_release(self, woken: Sequence[str]) -> None:
        for destination in woken:  # back at their old places (or new in a .DLQ): scans must look again
            self._scans.requeue(destination)
            self._signals.notify(destination)

    # -- PollQueue -------------------------------------------------------------------------------------------------

    async def put(self, messages: Sequence[NewMessage]) -> None:
        if messages:
            await self._store.write(queue=messages)
            self.after_put(messages)

    async def claim(
        self,
        destination: str,
        *,
        owner: str,
        limit: int,
        lease_ms: int,
        now_ms: int,
        selector: HeaderFilter | None = None,
        native_selector: Mapping[str, object] | None = None,
        scan: ScanMark | None = None,
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        lease_until = rules.lease_until(now_ms, lease_ms)
        if selector is None:
            requeued, rows = await self._store.script("CLAIM", [destination, now_ms, owner, lease_until, limit])
            if requeued:
                self.after_release([destination])
            return [message_from(r) for r in rows]
        return await self._claim_matching(destination, owner, lease_until, now_ms, limit, selector, scan)

    async def _claim_matching(
        self,
        destination: str,
        owner: str,
        lease_until: int,
        now_ms: int,
        limit: int,
        selector: HeaderFilter,
        scan: ScanMark | None,
    ) -> list[StoredMessage]:
        # The book's version before the window is read: a put or requeue this gateway learns of meanwhile makes the
        # mark stale (recording the version after the read would pass over it).
        before = ScanMark()
        if scan is not None:
            self._scans.record(destination, before, None, False)
        start = self._scans.resume_after(destination, scan) if scan is not None else None
        budget = SCAN_BUDGET if scan is not None else None
        count = budget + 1 if budget is not None else -1  # one more than the budget: the scan knows there is more
        after = "" if start is None else order_score(*start)
        requeued, rows = await self._store.script("SCAN", [destination, now_ms, after, count])
        if requeued:
            start = None  # the script read from the beginning: lapsed leases are back at their old places
            self.after_release([destination])
        window = [(int(float(rows[i + 1])), rows[i], rows[i + 2]) for i in range(0, len(rows), 3)]
        found = scan_in_order(
            ((*order_key(score), (message_id, headers)) for score, message_id, headers in window),
            lambda item: selector(decode_headers(_text(item[1]))),
            want=limit,
            budget=budget,
            after=start,
        )
        if scan is not None:
            self._scans.record(destination, scan, found.last, found.more)
            if scan.version != before.version:
                scan.version = before.version
        if not found.chosen:
            return []
        ids = [message_id for message_id, _ in found.chosen]
        rows = await self._store.script("CLAIM_IDS", [destination, now_ms, owner, lease_until, *ids])
        out = [message_from(r) for r in rows]
        out.sort(key=lambda m: rules.delivery_order(m.priority, m.seq))
        return out

    async def ack(self, message_ids: Sequence[str], leases: Sequence[int] | None = None) -> None:
        if message_ids:
            await self._store.write(acks=_held(message_ids, leases), buffered=False)

    async def release(self, message_ids: Sequence[str], how: Release, leases: Sequence[int] | None = None) -> None:
        if not message_ids:
            return
        held = _held(message_ids, leases)
        if how is Release.REQUEUE:
            result = await self._store.write(requeue=held, buffered=False)
        else:
            result = await self._store.write(dead_letter=held, buffered=False)
        self.after_release(result.woken)

    async def renew(self, owner: str, *, lease_ms: int, now_ms: int) -> None:
        await self._store.script("RENEW", [owner, rules.lease_until(now_ms, lease_ms)])

    def wake_token(self, destination: str) -> asyncio.Event:
        return self._signals.event(destination)

    async def wait(self, destination: str, timeout: float, token: asyncio.Event | None = None) -> None:
        await self._signals.wait(destination, timeout, token)

    async def stats(self, destination: str, *, now_ms: int) -> QueueStats:
        ready, unacked = await self._store.script("STATS", [destination, now_ms])
        return QueueStats(ready=int(ready), unacked=int(unacked))

    async def _peek_rows(self, destination: str, now_ms: int, after: str, count: int) -> list[Any]:
        rows: list[Any] = await self._store.script("PEEK", [destination, now_ms, after, count])
        return rows

    async def peek(
        self, destination: str, *, limit: int, offset: int = 0, now_ms: int, selector: HeaderFilter | None = None
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        if selector is None:
            rows = await self._peek_rows(destination, now_ms, "", offset + limit)
            return [message_from(r[1:]) for r in rows[offset:]]
        out: list[StoredMessage] = []
        skip, examined, after = offset, 0, ""
        while examined < PEEK_SCAN_LIMIT:
            rows = await self._peek_rows(destination, now_ms, after, min(PEEK_BATCH, PEEK_SCAN_LIMIT - examined))
            for row in rows:
                examined += 1
                message = message_from(row[1:])
                if not selector(message.headers):
                    continue
                if skip:
                    skip -= 1
                    continue
                out.append(message)
                if len(out) == limit:
                    return out
            if len(rows) < PEEK_BATCH:
                break
            after = _text(rows[-1][0])
        return out

    async def destinations(self) -> list[str]:
        members = await self._store.call(lambda: self._store.client.smembers(self._store.dests))
        return sorted(_text(m) for m in members)

    async def purge(self, destination: str) -> int:
        return int(await self._store.script("PURGE", [destination]))

    def close(self) -> None:
        self._signals.notify_all()


def _held(message_ids: Sequence[str], leases: Sequence[int] | None) -> list[tuple[str, int | None]]:
    if leases is None:
        return [(i, None) for i in message_ids]
    return list(zip(message_ids, leases, strict=True))
