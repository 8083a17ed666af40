"""Queues on PostgreSQL: one table of messages (``<ns>_messages``); the state rules are ``app.datasources.rules``' SQL
forms, and this module is their storage.

A claim is one statement: the destination's claimable rows in claim order, locked ``FOR UPDATE SKIP LOCKED`` (so two
claims, from any gateways, never take the same row and never wait for each other), updated and returned. Ready rows
are served by a partial index in claim order; rows whose lease lapsed by a second one, and the first ``limit`` of
both are taken. ACKs and releases are fenced by the lease token in the same statement.

Selectors are evaluated in Python while scanning the ready backlog in claim order (``app.datasources.scanning``):
a subscription's scan resumes after its mark and examines at most ``SCAN_BUDGET`` rows per claim. Another gateway's
puts and requeues reach the ``ScanBook`` through notifications, which carry the priority of what was put.

Wrapped tables (``DatasourceOptions.wrapped_tables``), rows of an existing table delivered as JSON: see ``wrapped``.
Their destinations are routed there by name, their message ids by ``WRAPPED_PREFIX``; selectors are ignored on them
(every matching row goes to any subscriber), as on MongoDB.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from app.datasources import rules
from app.datasources.interface import (
    DatasourceRefused,
    PEEK_SCAN_LIMIT,
    SCAN_BUDGET,
    HeaderFilter,
    Held,
    NewMessage,
    PollQueue,
    QueueStats,
    Release,
    ScanMark,
    StoredMessage,
)
from app.datasources.postgresql.rows import (
    NEW_COLUMNS,
    columns,
    decode_headers,
    message_from_row,
    new_arrays,
    unnest_new,
)
from app.datasources.postgresql.store import Store, WriteAttempt
from app.datasources.postgresql.wrapped import WRAPPED_PREFIX, WrappedTables
from app.datasources.scanning import ScanBook, scan_in_order
from app.datasources.wakeups import Signals

__all__ = ["PgPollQueue"]

SCAN_BATCH = 256  # rows fetched at a time while scanning with a selector
EXPIRED_SWEEP_S = 1.0  # how often a gateway deletes a destination's expired messages (wall clock, at claim time)
MAX_PAYLOAD = 7_900  # bytes of a NOTIFY payload (PostgreSQL takes 8,000); longer destinations wake everyone

_NOT_EXPIRED = rules.SQL_NOT_EXPIRED.format(now="$2")
_CLAIMABLE = rules.SQL_CLAIMABLE.format(now="$2")
_ORDER = rules.SQL_CLAIM_ORDER


def put_payload(destination: str, priority: int) -> str:
    """A notification that ``destination`` has new work of ``priority`` (``*``: of any destination)."""
    return f"p{priority}:{destination}" if len(destination.encode()) <= MAX_PAYLOAD else "*"


def requeue_payload(destination: str) -> str:
    return f"r:{destination}" if len(destination.encode()) <= MAX_PAYLOAD else "*"


class PgPollQueue(PollQueue):
    # seq is taken at insert and seen at commit: a put that took seq 1 may commit after one that took seq 2
    puts_visible_in_seq_order = False

    def __init__(self, store: Store, wrapped: WrappedTables | None = None) -> None:
        self._store = store
        self._wrapped = wrapped if wrapped is not None else WrappedTables(store, ())
        self._signals = Signals()
        self._scans = ScanBook(same_priority_puts_stale=True)
        self._swept_at: dict[str, float] = {}  # destination -> monotonic time of this gateway's last sweep
        m = store.messages
        cols = columns(m)
        # The same placeholders in every statement: $1 destination, $2 now; the rest per statement.
        ready = f"destination = $1 AND state = 0 AND {_NOT_EXPIRED}"
        lapsed = f"destination = $1 AND state = 1 AND lease_until <= $2 AND {_NOT_EXPIRED}"
        claim_set = rules.SQL_CLAIM_SET.format(owner="$3", lease_until="$4")
        # One statement, so one round trip and its own transaction: the insert in a data-modifying CTE (run to
        # completion whatever the outer query reads), and the wake-ups it owes, delivered when it commits.
        insert = f"INSERT INTO {m} ({NEW_COLUMNS}) SELECT * FROM {unnest_new(1)}"
        notify = "SELECT pg_notify($8, payload) FROM unnest($9::text[]) AS payload"
        # ... with this put's write mark (Store.write_once), a replay's skip of what an earlier try stored (its mark
        # gone), and the fenced ACKs that arrived with it (group commit: one statement, one commit for both)
        self._sql_put: dict[tuple[bool, bool, bool], str] = {}
        for again in (False, True):
            for marked in (False, True):
                for acking in (False, True):
                    sql = f"WITH stored AS ({insert}{' ON CONFLICT (message_id) DO NOTHING' if again else ''})"
                    n = 10
                    if marked:
                        sql += f", marked AS (INSERT INTO {store.writes} (id, at) VALUES (${n}, ${n + 1}))"
                        n += 2
                    if acking:
                        sql += (
                            f", acked AS (DELETE FROM {m} USING unnest(${n}::text[], ${n + 1}::bigint[]) AS held(id, lease) "
                            f"WHERE {m}.message_id = held.id AND {m}.lease = held.lease)"
                        )
                    self._sql_put[(again, marked, acking)] = f"{sql} {notify}"
        self._sql_notify = "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload"
        # Ready and lapsed rows each locked in claim order, skipping rows other claims hold, then the first $5 of
        # both taken. With lapsed rows about, rows locked but not taken stay locked to the end of the statement, and
        # a claim running meanwhile may have skipped them and found nothing: the claim then NOTIFYs ($6, $7), so
        # such a claimer looks again at its commit instead of at its next poll.
        self._sql_claim = (
            f"WITH ready AS (SELECT seq, priority FROM {m} WHERE {ready} ORDER BY {_ORDER} LIMIT $5 "
            "FOR UPDATE SKIP LOCKED), "
            f"lapsed AS (SELECT seq, priority FROM {m} WHERE {lapsed} ORDER BY {_ORDER} LIMIT $5 FOR UPDATE SKIP LOCKED), "
            f"pick AS (SELECT seq FROM (SELECT * FROM ready UNION ALL SELECT * FROM lapsed) AS both_kinds "
            f"ORDER BY {_ORDER} LIMIT $5), "
            "wake AS (SELECT pg_notify($6, $7) FROM (SELECT 1 FROM lapsed LIMIT 1) AS any_lapsed) "
            f"UPDATE {m} SET {claim_set} FROM pick WHERE {m}.seq = pick.seq "
            f"RETURNING {cols}, (SELECT count(*) FROM wake)"  # referenced, so that the wake-up is sent
        )
        self._sql_claim_seqs = (
            f"UPDATE {m} SET {claim_set} WHERE seq = ANY($5::bigint[]) AND destination = $1 AND {_CLAIMABLE} "
            f"RETURNING {cols}"
        )
        # expired and not held under a live lease: never to be delivered (rules.claimable), so deleted
        self._sql_sweep = f"DELETE FROM {m} WHERE destination = $1 AND expires_at <= $2 AND (state = 0 OR lease_until <= $2)"
        self._sql_requeue_lapsed = f"UPDATE {m} SET {rules.SQL_REQUEUE_SET} WHERE {lapsed}"
        self._sql_scan = f"SELECT priority, seq, headers FROM {m} WHERE {ready} ORDER BY {_ORDER} LIMIT $3"
        # resuming after (priority p, seq s): the rest of p's band, then the lower priorities
        self._sql_scan_after = (
            f"SELECT priority, seq, headers FROM {m} WHERE {ready} AND (priority < $3 OR (priority = $3 AND seq > $4)) "
            f"ORDER BY {_ORDER} LIMIT $5"
        )
        self._sql_peek = f"SELECT {cols} FROM {m} WHERE destination = $1 AND {_CLAIMABLE} ORDER BY {_ORDER}"
        held = "unnest($1::text[], $2::bigint[]) AS held(id, lease)"
        is_held = f"{m}.message_id = held.id AND {m}.lease = held.lease"  # fenced: only under the consumer's lease
        self._sql_ack_fenced = f"DELETE FROM {m} USING {held} WHERE {is_held}"
        self._sql_ack = f"DELETE FROM {m} WHERE message_id = ANY($1::text[])"
        self._sql_release: dict[tuple[Release, bool], str] = {}
        for how, sets in ((Release.REQUEUE, rules.SQL_REQUEUE_SET), (Release.DEAD_LETTER, rules.SQL_DEAD_LETTER_SET)):
            self._sql_release[(how, True)] = (
                f"UPDATE {m} SET {sets} FROM {held} WHERE {is_held} AND {m}.state = 1 RETURNING {m}.destination"
            )
            self._sql_release[(how, False)] = (
                f"UPDATE {m} SET {sets} WHERE message_id = ANY($1::text[]) AND state = 1 RETURNING destination"
            )
        # Rows another statement holds are skipped (an ACK deleting them, a release, a claim of a lapsed lease):
        # waiting for them in another order than that statement's would deadlock, and the next renewal catches any
        # that are still held.
        self._sql_renew = (
            f"UPDATE {m} SET lease_until = $1 WHERE seq IN "
            f"(SELECT seq FROM {m} WHERE owner = $2 AND state = 1 FOR UPDATE SKIP LOCKED)"
        )
        store.on_notification(self._notified)
        store.on_listener_lost(self._listener_lost)

    # -- notifications ---------------------------------------------------------------------------------------------

    def _notified(self, payload: str) -> None:
        if payload == "*":
            self._listener_lost()
            return
        kind, _, destination = payload.partition(":")
        if kind.startswith("p") and kind[1:].isdigit():
            self._scans.put(destination, int(kind[1:]))
        elif kind == "r":
            self._scans.requeue(destination)
        else:
            return  # a topic's, or not ours
        self._signals.notify(destination)

    def _listener_lost(self) -> None:
        """Notifications may have been missed: every scan starts over and every waiter looks again."""
        self._scans.requeue_all()
        self._signals.notify_all()

    # -- writes that other modules join into one transaction (PgDatasource.apply) ---------------------------------

    async def put_in(
        self,
        conn: asyncpg.Connection,
        messages: Sequence[NewMessage],
        retry: bool = False,
        mark: WriteAttempt | None = None,
        acks: Sequence[Held] = (),
    ) -> None:
        """Insert ``messages``, with ``mark``'s token when given (``Store.write_once``), and delete the messages
        ``acks`` hold under their leases: one statement, in the caller's transaction or its own. With ``retry`` (an
        earlier try may have committed, its mark since collected) the ids already stored are this very put's, and
        are skipped."""
        top: dict[str, int] = {}
        for message in messages:
            top[message.destination] = max(top.get(message.destination, 0), message.priority)
        marks = mark.mark_args() if mark is not None else ()
        acked = ([i for i, _ in acks], [lease for _, lease in acks]) if acks else ()
        await conn.execute(
            self._sql_put[(retry, mark is not None, bool(acks))],
            *new_arrays(messages),
            self._store.channel,
            [put_payload(d, p) for d, p in top.items()],
            *marks,
            *acked,
        )

    def after_put(self, messages: Sequence[NewMessage]) -> None:
        """After the commit: local waiters and scans learn at once (the notification also comes back later)."""
        for m in messages:
            self._scans.put(m.destination, m.priority)
        for destination in {m.destination for m in messages}:
            self._signals.notify(destination)

    async def ack_in(self, conn: asyncpg.Connection, message_ids: Sequence[str], leases: Sequence[int] | None) -> None:
        plain, wrapped = _split(message_ids, leases)
        if wrapped:
            await self._wrapped.ack_in(conn, wrapped, fenced=leases is not None)
        if not plain:
            return
        if leases is None:
            await conn.execute(self._sql_ack, [i for i, _ in plain])
        else:
            await conn.execute(self._sql_ack_fenced, [i for i, _ in plain], [lease for _, lease in plain])

    async def release_in(
        self, conn: asyncpg.Connection, message_ids: Sequence[str], how: Release, leases: Sequence[int] | None
    ) -> set[str]:
        plain, wrapped = _split(message_ids, leases)
        woken: set[str] = set()
        if wrapped:
            woken |= await self._wrapped.release_in(conn, wrapped, how, fenced=leases is not None)
        if plain:
            sql = self._sql_release[(how, leases is not None)]
            ids = [i for i, _ in plain]
            args: list[Any] = [ids] if leases is None else [ids, [lease for _, lease in plain]]
            woken |= {row[0] for row in await conn.fetch(sql, *args)}
        if woken:
            await conn.execute(self._sql_notify, self._store.channel, [requeue_payload(d) for d in woken])
        return woken

    def after_release(self, woken: set[str]) -> None:
        for destination in woken:  # back at their old places (or new in a .DLQ): scans must look again
            self._scans.requeue(destination)
            self._signals.notify(destination)

    # -- PollQueue ----------------------------------------------------------------------------------------------

    async def put(self, messages: Sequence[NewMessage]) -> None:
        if not messages:
            return

        attempt = WriteAttempt()
        await self._store.write_once(
            attempt, lambda conn, again: self.put_in(conn, messages, again, None if again else attempt), len(messages)
        )
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
        wrapped = self._wrapped.get(destination)
        if wrapped is not None:  # a selector is ignored here, as on MongoDB: every matching row goes to anyone
            return await self._wrapped.claim(wrapped, owner, limit, lease_until, now_ms)
        await self._sweep_expired(destination, now_ms)
        if selector is None:
            wake = (self._store.channel, requeue_payload(destination))
            records = await self._store.run(
                lambda conn: conn.fetch(self._sql_claim, destination, now_ms, owner, lease_until, limit, *wake),
                transaction=False,  # one statement: its own transaction
            )
        else:
            records = await self._claim_matching(destination, owner, lease_until, now_ms, limit, selector, scan)
        out = [message_from_row(r) for r in records]
        out.sort(key=lambda s: (-s.priority, s.seq))  # RETURNING gives no order
        return out

    async def _sweep_expired(self, destination: str, now_ms: int) -> None:
        now = time.monotonic()
        if now - self._swept_at.get(destination, 0.0) < EXPIRED_SWEEP_S:
            return
        self._swept_at[destination] = now
        await self._store.run(lambda conn: conn.execute(self._sql_sweep, destination, now_ms), transaction=False)

    async def _claim_matching(
        self,
        destination: str,
        owner: str,
        lease_until: int,
        now_ms: int,
        limit: int,
        selector: HeaderFilter,
        scan: ScanMark | None,
    ) -> list[asyncpg.Record]:
        """Scan the ready backlog in claim order for messages the selector takes, then claim those (each only if
        still claimable: another gateway may have taken it since it was read)."""

        requeued: list[str] = []

        async def work(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            if await conn.fetch(self._sql_requeue_lapsed + " RETURNING 1", destination, now_ms):
                # lapsed leases are ready again, at their old places: scans here and on other gateways look again
                self._scans.requeue(destination)
                await conn.execute("SELECT pg_notify($1, $2)", self._store.channel, requeue_payload(destination))
                requeued.append(destination)
            start = self._scans.resume_after(destination, scan) if scan is not None else None
            budget = SCAN_BUDGET if scan is not None else None
            rows = await self._scan_rows(conn, destination, now_ms, start, budget)
            found = scan_in_order(
                ((r[0], r[1], (r[1], r[2])) for r in rows),
                lambda row: selector(decode_headers(row[1])),
                want=limit,
                budget=budget,
                after=start,
            )
            if scan is not None:
                self._scans.record(destination, scan, found.last, found.more)
            if not found.chosen:
                return []
            seqs = [seq for seq, _ in found.chosen]
            return await conn.fetch(self._sql_claim_seqs, destination, now_ms, owner, lease_until, seqs)

        records = await self._store.run(work)
        if requeued:
            self._signals.notify(destination)  # other subscriptions of this gateway look again too
        return records

    async def _scan_rows(
        self, conn: asyncpg.Connection, destination: str, now_ms: int, after: tuple[int, int] | None, budget: int | None
    ) -> list[asyncpg.Record]:
        """The ready rows after ``after`` in claim order: one more than the budget (so the scan knows there is
        more), or all of them without one, fetched a batch at a time."""
        rows: list[asyncpg.Record] = []
        want = budget + 1 if budget is not None else None
        while want is None or len(rows) < want:
            batch_size = SCAN_BATCH if want is None else min(SCAN_BATCH, want - len(rows))
            if after is None:
                batch = await conn.fetch(self._sql_scan, destination, now_ms, batch_size)
            else:
                batch = await conn.fetch(self._sql_scan_after, destination, now_ms, after[0], after[1], batch_size)
            rows += batch
            if len(batch) < batch_size:
                break
            after = (batch[-1][0], batch[-1][1])
        return rows

    async def ack(self, message_ids: Sequence[str], leases: Sequence[int] | None = None) -> None:
        if message_ids:
            await self._store.run(lambda conn: self.ack_in(conn, message_ids, leases), transaction=False)

    async def release(self, message_ids: Sequence[str], how: Release, leases: Sequence[int] | None = None) -> None:
        if message_ids:
            woken = await self._store.run(lambda conn: self.release_in(conn, message_ids, how, leases))
            self.after_release(woken)

    async def renew(self, owner: str, *, lease_ms: int, now_ms: int) -> None:
        lease_until = rules.lease_until(now_ms, lease_ms)
        await self._store.run(lambda conn: conn.execute(self._sql_renew, lease_until, owner), transaction=False)
        await self._wrapped.renew(owner, lease_until)

    def wake_token(self, destination: str) -> asyncio.Event:
        return self._signals.event(destination)

    async def wait(self, destination: str, timeout: float, token: asyncio.Event | None = None) -> None:
        if self._wrapped.get(destination) is not None:
            # rows the application inserts send no notification (unless it NOTIFYs, see README): look again soon
            timeout = min(timeout, self._store.options.poll_interval)
        await self._signals.wait(destination, timeout, token)

    async def stats(self, destination: str, *, now_ms: int) -> QueueStats:
        wrapped = self._wrapped.get(destination)
        if wrapped is not None:
            return await self._wrapped.stats(wrapped, now_ms)
        sql = (
            f"SELECT count(*) FILTER (WHERE {_CLAIMABLE}), count(*) FILTER (WHERE state = 1 AND lease_until > $2) "
            f"FROM {self._store.messages} WHERE destination = $1"
        )
        row = await self._store.run(lambda conn: conn.fetchrow(sql, destination, now_ms), transaction=False)
        assert row is not None  # an aggregate always answers one row
        return QueueStats(ready=int(row[0]), unacked=int(row[1]))

    async def peek(
        self, destination: str, *, limit: int, offset: int = 0, now_ms: int, selector: HeaderFilter | None = None
    ) -> list[StoredMessage]:
        wrapped = self._wrapped.get(destination)
        if wrapped is not None:
            if selector is None:
                return await self._wrapped.peek(wrapped, now_ms, limit, offset)
            # as on MongoDB: the first PEEK_SCAN_LIMIT, filtered here
            scanned = await self._wrapped.peek(wrapped, now_ms, PEEK_SCAN_LIMIT, 0)
            return [m for m in scanned if selector(m.headers)][offset : offset + limit]
        if selector is None:
            sql = self._sql_peek + " LIMIT $3 OFFSET $4"
            records = await self._store.run(
                lambda conn: conn.fetch(sql, destination, now_ms, limit, offset), transaction=False
            )
            return [message_from_row(r) for r in records]

        async def work(conn: asyncpg.Connection) -> list[StoredMessage]:
            out: list[StoredMessage] = []
            skip = offset
            cursor = conn.cursor(self._sql_peek + " LIMIT $3", destination, now_ms, PEEK_SCAN_LIMIT, prefetch=SCAN_BATCH)
            async for record in cursor:
                message = message_from_row(record)
                if not selector(message.headers):
                    continue
                if skip:
                    skip -= 1
                    continue
                out.append(message)
                if len(out) == limit:
                    break
            return out

        return await self._store.run(work)  # a cursor lives in a transaction

    async def destinations(self) -> list[str]:
        sql = f"SELECT DISTINCT destination FROM {self._store.messages} ORDER BY destination"
        found = [r[0] for r in await self._store.run(lambda conn: conn.fetch(sql), transaction=False)]
        if not self._wrapped:
            return found
        return sorted({*found, *await self._wrapped.destinations()})

    async def purge(self, destination: str) -> int:
        wrapped = self._wrapped.get(destination)
        if wrapped is not None:
            raise DatasourceRefused(
                f"purge: {destination} wraps the existing table {wrapped.setting.table!r}; "
                "refusing to delete its rows in bulk"
            )
        sql = f"DELETE FROM {self._store.messages} WHERE destination = $1"
        status = await self._store.run(lambda conn: conn.execute(sql, destination), transaction=False)
        return int(status.split()[-1])

    def close(self) -> None:
        self._signals.notify_all()


def _split(
    message_ids: Sequence[str], leases: Sequence[int] | None
) -> tuple[list[tuple[str, int | None]], list[tuple[str, int | None]]]:
    """The plain messages and the wrapped rows among ``message_ids``, each with its lease token (None: unfenced)."""
    plain: list[tuple[str, int | None]] = []
    wrapped: list[tuple[str, int | None]] = []
    for index, message_id in enumerate(message_ids):
        held = (message_id, None if leases is None else leases[index])
        (wrapped if message_id.startswith(WRAPPED_PREFIX) else plain).append(held)
    return plain, wrapped
