"""Queues on SQLite: one table of messages (``<ns>_messages``), claimed in the single writer, so no two claims
return the same message. The state rules are ``app.datasources.rules``' SQL forms; this module is their storage.

Leases: a claim first requeues leases that expired before ``now_ms`` on its destination (the writer remembers the
earliest lease it granted, so this costs nothing on the hot path). Expired messages are deleted by a sweep at claim
time, at most every ``EXPIRED_SWEEP_S`` per destination. Selectors are evaluated in Python while scanning the backlog
in claim order (``app.datasources.scanning``): a subscription's scan resumes where its last one stopped and examines
at most ``SCAN_BUDGET`` rows per claim, because it runs in the writer every other write waits for.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from app.datasources import rules
from app.datasources.interface import (
    HeaderFilter,
    NewMessage,
    PollQueue,
    QueueStats,
    Release,
    ScanMark,
    StoredMessage,
    PEEK_SCAN_LIMIT,
    SCAN_BUDGET,
)
from app.datasources.scanning import ScanBook, scan_in_order
from app.datasources.sqlite.body_files import FILE_BODY_MIN
from app.datasources.sqlite.rows import (
    IN_CHUNK,
    MESSAGE_COLUMNS,
    SCAN_BATCH,
    chunks,
    decode_headers,
    headers_text,
    message_from_row,
)
from app.datasources.sqlite.store import Store, Write
from app.datasources.wakeups import Signals

__all__ = ["SqlitePollQueue"]

# A body longer than this is stored in the bodies table (store.py says why); shorter ones stay in the message row,
# where they fit its page (4 KiB) and a second insert would cost more than the rewrite saves.
SIDE_BODY_MIN = 2048
EXPIRED_SWEEP_S = 1.0  # how often a destination's expired messages are deleted (wall clock, at claim time)
_NO_LEASE = 1 << 62

# SQLite's placeholder in the rules' SQL forms
_CLAIMABLE = rules.SQL_CLAIMABLE.format(now="?")
_NOT_EXPIRED = rules.SQL_NOT_EXPIRED.format(now="?")
_CLAIM_SET = rules.SQL_CLAIM_SET.format(owner="?", lease_until="?")
_ORDER = rules.SQL_CLAIM_ORDER


class SqlitePollQueue(PollQueue):
    def __init__(self, store: Store) -> None:
        self._store = store
        self._signals = Signals()
        self._scans = ScanBook()  # touched only in the writer thread, with the writes and claims it tracks
        store.on_rollback.append(self._rolled_back)
        m = store.messages
        self._sql_put = (
            f"INSERT INTO {m} (message_id, destination, priority, expires_at, published_at, headers, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        self._sql_put_body = f"INSERT INTO {store.bodies} (seq, body) VALUES (?, ?)"
        # the message's columns with its body from the bodies table when it is there (an empty body in the row)
        # (length() of a blob reads only its size; the lookup runs only for rows whose body is empty)
        side_body = (
            f"CASE WHEN length({m}.body) > 0 THEN {m}.body "
            f"ELSE coalesce((SELECT b.body FROM {store.bodies} b WHERE b.seq = {m}.seq), {m}.body) END"
        )
        columns = ", ".join(side_body if c == "body" else c for c in MESSAGE_COLUMNS)
        # Claimable, given that a claim first requeues its destination's lapsed leases (``_requeue_lapsed``): then
        # ``state = 0`` is the whole first half of the rule, and the claim index (destination, state, ...) serves it.
        ready = f"destination = ? AND state = 0 AND {_NOT_EXPIRED}"
        self._sql_claim = (
            f"UPDATE {m} SET {_CLAIM_SET} "
            f"WHERE seq IN (SELECT seq FROM {m} WHERE {ready} ORDER BY {_ORDER} LIMIT ?) "
            f"RETURNING {columns}"
        )
        self._sql_claim_seqs = f"UPDATE {m} SET {_CLAIM_SET} WHERE seq IN ({{}}) RETURNING {columns}"
        self._sql_scan = f"SELECT priority, seq, headers FROM {m} WHERE {ready} ORDER BY {_ORDER}"
        # resuming a scan after (priority p, seq s): the rest of p's band, then the lower priorities
        self._sql_scan_band = f"SELECT priority, seq, headers FROM {m} WHERE {ready} AND priority = ? AND seq > ? ORDER BY seq"
        self._sql_scan_below = (
            f"SELECT priority, seq, headers FROM {m} WHERE {ready} AND priority < ? ORDER BY {_ORDER}"
        )
        self._sql_expire_leases = (
            f"UPDATE {m} SET {rules.SQL_REQUEUE_SET} WHERE destination = ? AND state = 1 AND lease_until <= ?"
        )
        self._sql_lease_floor = f"SELECT min(lease_until) FROM {m} WHERE destination = ? AND state = 1"
        self._sql_sweep = f"DELETE FROM {m} WHERE destination = ? AND state = 0 AND expires_at <= ?"
        self._sql_peek = f"SELECT {columns} FROM {m} WHERE destination = ? AND {_CLAIMABLE} ORDER BY {_ORDER}"

    # -- writer-thread helpers -------------------------------------------------------------------------------------
    def _rolled_back(self) -> None:
        """Claims answered early may have been undone: every scan looks again and every waiter is woken."""
        self._scans.requeue_all()
        self._store.call_on_loop(self._signals.notify_all)

    def _requeue_lapsed(self, conn: sqlite3.Connection, destination: str, now_ms: int) -> None:
        store = self._store
        floor = store.lease_floor.get(destination)
        if floor is not None and floor > now_ms:
            return
        if conn.execute(self._sql_expire_leases, (destination, now_ms)).rowcount:
            self._scans.requeue(destination)
        (earliest,) = conn.execute(self._sql_lease_floor, (destination,)).fetchone()
        store.lease_floor[destination] = _NO_LEASE if earliest is None else earliest

    def _sweep_expired(self, conn: sqlite3.Connection, destination: str, now_ms: int) -> None:
        now = time.monotonic()
        store = self._store
        if now - store.swept_at.get(destination, 0.0) < EXPIRED_SWEEP_S:
            return
        store.swept_at[destination] = now
        conn.execute(self._sql_sweep, (destination, now_ms))

    # -- PollQueue ----------------------------------------------------------------------------------------------
    async def put(self, messages: Sequence[NewMessage]) -> None:
        if messages:
            files = await self.write_bodies(messages)
            await self._store.write_naming(files, lambda: self.put_write(messages, files))

    async def write_bodies(self, messages: Sequence[NewMessage]) -> list[str | None] | None:
        """Write the bodies that go to files (``body_files``) before the put that names them; one name per message
        (None: stored in SQLite), or None when no body is that large."""
        large = [i for i, m in enumerate(messages) if len(m.body) >= FILE_BODY_MIN]
        if not large:
            return None
        names = await self._store.write_bodies([messages[i].body for i in large])
        files: list[str | None] = [None] * len(messages)
        for i, name in zip(large, names):
            files[i] = name
        return files

    def put_write(self, messages: Sequence[NewMessage], files: Sequence[str | None] | None = None) -> Write[None]:
        """The writer-thread step and the event-loop follow-up of a put (``SqliteDatasource.apply`` joins several).
        ``files``: what ``write_bodies`` returned for these messages."""
        bodies: Sequence[bytes | str] = (
            [m.body for m in messages] if files is None else [f or m.body for m, f in zip(messages, files)]
        )
        rows = [
            (m.message_id, m.destination, m.priority, m.expires_at, m.published_at, headers_text(m.headers), body)
            for m, body in zip(messages, bodies)
        ]
        sql, sql_body = self._sql_put, self._sql_put_body
        # a file's name (str) also goes to the bodies table: that is where a claim looks for a body not in its row
        side = files is not None or any(len(body) > SIDE_BODY_MIN for body in bodies)

        scans = self._scans

        def run(conn: sqlite3.Connection) -> None:
            if not side:
                conn.executemany(sql, rows)
            else:  # one at a time, in order (seq is the FIFO order); long bodies into the bodies table
                for row in rows:
                    body = row[6]
                    if isinstance(body, str) or len(body) > SIDE_BODY_MIN:
                        seq = conn.execute(sql, (*row[:6], b"")).lastrowid
                        conn.execute(sql_body, (seq, body))
                    else:
                        conn.execute(sql, row)
            for row in rows:
                scans.put(row[1], row[2])

        destinations = {m.destination for m in messages}

        def after(_: None) -> None:
            for destination in destinations:
                self._signals.notify(destination)

        return run, after

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
        store = self._store
        guard = store.body_files.guard()  # no file this claim may name is reused before it is read

        def run(conn: sqlite3.Connection) -> list[StoredMessage]:
            guard.enter()
            self._requeue_lapsed(conn, destination, now_ms)
            self._sweep_expired(conn, destination, now_ms)
            if selector is None:
                rows = conn.execute(self._sql_claim, (owner, lease_until, destination, now_ms, limit)).fetchall()
            else:
                rows = self._claim_matching(conn, destination, owner, lease_until, now_ms, limit, selector, scan)
            if rows:
                store.owner_destinations.setdefault(owner, set()).add(destination)
                floor = store.lease_floor.get(destination, _NO_LEASE)
                store.lease_floor[destination] = min(floor, lease_until)
            out = [message_from_row(row) for row in rows]
            out.sort(key=lambda s: (-s.priority, s.seq))  # RETURNING gives no order
            return out

        try:
            claimed = await store.write(run, early=True)
            if any(isinstance(m.body, str) for m in claimed):  # bodies kept as files: read beside the writer
                try:
                    claimed = await store.read_bodies(claimed)
                except Exception:
                    # The claim leased them to ``owner`` and hands them to nobody; the gateway renews every lease it
                    # holds, so they would stay leased until it restarts: give them back (fenced by their leases).
                    try:
                        await self.release([m.message_id for m in claimed], Release.REQUEUE, [m.lease for m in claimed])
                    except Exception:  # the store failed twice: they stay leased, as they did before this
                        pass
                    raise
        finally:
            guard.exit()
        return claimed

    def _claim_matching(
        self,
        conn: sqlite3.Connection,
        destination: str,
        owner: str,
        lease_until: int,
        now_ms: int,
        limit: int,
        selector: HeaderFilter,
        scan: ScanMark | None,
    ) -> list[Any]:
        """Scan the ready backlog in delivery order for messages the selector takes. With a ``scan`` mark (a
        subscription's), start after it and examine at most ``SCAN_BUDGET`` rows: this runs in the single writer,
        so a deep backlog that does not match must not hold up everybody's writes."""
        start = self._scans.resume_after(destination, scan) if scan is not None else None
        found = scan_in_order(
            ((priority, seq, (seq, headers)) for priority, seq, headers in self._scan_rows(conn, destination, now_ms, start)),
            lambda row: selector(decode_headers(row[1])),
            want=limit,
            budget=SCAN_BUDGET if scan is not None else None,
            after=start,
        )
        if scan is not None:
            self._scans.record(destination, scan, found.last, found.more)
        rows: list[Any] = []
        for chunk in chunks([seq for seq, _ in found.chosen]):
            rows += conn.execute(
                self._sql_claim_seqs.format(",".join("?" * len(chunk))), (owner, lease_until, *chunk)
            ).fetchall()
        return rows

    def _scan_rows(
        self, conn: sqlite3.Connection, destination: str, now_ms: int, after: tuple[int, int] | None
    ) -> Iterator[tuple[int, int, str]]:
        queries = (
            [(self._sql_scan, (destination, now_ms))]
            if after is None
            else [
                (self._sql_scan_band, (destination, now_ms, after[0], after[1])),
                (self._sql_scan_below, (destination, now_ms, after[0])),
            ]
        )
        for sql, params in queries:
            cursor = conn.execute(sql, params)
            try:
                while batch := cursor.fetchmany(SCAN_BATCH):
                    yield from batch
            finally:
                cursor.close()

    async def ack(self, message_ids: Sequence[str], leases: Sequence[int] | None = None) -> None:
        if message_ids:
            await self._store.write(*self.ack_write(message_ids, leases))

    def ack_write(self, message_ids: Sequence[str], leases: Sequence[int] | None) -> Write[None]:
        ids = list(message_ids)
        m = self._store.messages
        fenced = list(dict.fromkeys(zip(ids, leases))) if leases is not None else None

        def run(conn: sqlite3.Connection) -> None:
            if fenced is not None:  # only under the lease the consumer was given (a later claim changes it)
                for part in chunks(fenced, IN_CHUNK // 3):  # three parameters per message
                    ids_in = ",".join("?" * len(part))
                    pairs_in = ",".join("(?, ?)" for _ in part)
                    conn.execute(
                        f"DELETE FROM {m} WHERE message_id IN ({ids_in}) AND (message_id, lease) IN (VALUES {pairs_in})",
                        [i for i, _ in part] + [v for pair in part for v in pair],
                    )
                return
            for chunk in chunks(ids):
                conn.execute(f"DELETE FROM {m} WHERE message_id IN ({','.join('?' * len(chunk))})", chunk)

        return run, None

    async def release(self, message_ids: Sequence[str], how: Release, leases: Sequence[int] | None = None) -> None:
        if message_ids:
            await self._store.write(*self.release_write(message_ids, how, leases))

    def release_write(self, message_ids: Sequence[str], how: Release, leases: Sequence[int] | None) -> Write[set[str]]:
        ids = list(message_ids)
        m = self._store.messages
        fenced = list(zip(ids, leases)) if leases is not None else None
        if how is Release.DEAD_LETTER:
            sql = (
                f"UPDATE {m} SET {rules.SQL_DEAD_LETTER_SET} "
                "WHERE state = 1 AND message_id IN ({}) RETURNING destination"
            )
        else:
            sql = (
                f"UPDATE {m} SET {rules.SQL_REQUEUE_SET} "
                "WHERE state = 1 AND message_id IN ({}) RETURNING destination"
            )

        scans = self._scans

        def run(conn: sqlite3.Connection) -> set[str]:
            woken: set[str] = set()
            if fenced is not None:  # each only while still held under the lease its consumer was given
                one = sql.replace("message_id IN ({})", "message_id = ? AND lease = ?")
                for pair in fenced:
                    for (destination,) in conn.execute(one, pair):
                        woken.add(destination)
            else:
                for chunk in chunks(ids):
                    for (destination,) in conn.execute(sql.format(",".join("?" * len(chunk))), chunk):
                        woken.add(destination)
            for destination in woken:  # back at their old places (or new in a .DLQ): scans must look again
                scans.requeue(destination)
            return woken

        def after(woken: set[str]) -> None:
            for destination in woken:
                self._signals.notify(destination)

        return run, after

    async def renew(self, owner: str, *, lease_ms: int, now_ms: int) -> None:
        m = self._store.messages
        lease_until = rules.lease_until(now_ms, lease_ms)

        store = self._store
        sql = f"UPDATE {m} SET lease_until = ? WHERE destination = ? AND state = 1 AND owner = ?"

        def run(conn: sqlite3.Connection) -> None:
            destinations = store.owner_destinations.get(owner)
            if not destinations:
                return
            for destination in list(destinations):
                if conn.execute(sql, (lease_until, destination, owner)).rowcount == 0:
                    destinations.discard(destination)  # a rollback re-adds nothing, but claims add it back
            if not destinations:
                del store.owner_destinations[owner]

        await store.write(run)

    def wake_token(self, destination: str) -> asyncio.Event:
        return self._signals.event(destination)

    async def wait(self, destination: str, timeout: float, token: asyncio.Event | None = None) -> None:
        await self._signals.wait(destination, timeout, token)

    async def stats(self, destination: str, *, now_ms: int) -> QueueStats:
        m = self._store.messages

        def run(conn: sqlite3.Connection) -> QueueStats:
            ready, unacked = conn.execute(
                "SELECT "
                f"coalesce(sum({rules.SQL_CLAIMABLE.format(now=':now')}), 0), "
                "coalesce(sum(state = 1 AND lease_until > :now), 0) "
                f"FROM {m} WHERE destination = :dest",
                {"now": now_ms, "dest": destination},
            ).fetchone()
            return QueueStats(ready=int(ready), unacked=int(unacked))

        return await self._store.read(run)

    async def peek(
        self, destination: str, *, limit: int, offset: int = 0, now_ms: int, selector: HeaderFilter | None = None
    ) -> list[StoredMessage]:
        sql = self._sql_peek
        files = self._store.body_files

        def run(conn: sqlite3.Connection) -> list[StoredMessage]:
            guard = files.guard()  # no file this peek may name is reused before it is read
            guard.enter()
            cursor = conn.cursor()
            try:
                return scan(cursor)
            finally:
                # Reset the statement whatever happened: one left open (in a kept traceback) would hold the reader
                # on its snapshot, and a later peek, guarded from now, would see names freed since.
                cursor.close()
                guard.exit()

        def scan(cursor: sqlite3.Cursor) -> list[StoredMessage]:
            if selector is None:
                rows = cursor.execute(sql + " LIMIT ? OFFSET ?", (destination, now_ms, now_ms, limit, offset))
                return files.load_if_present([message_from_row(row) for row in rows])
            out: list[StoredMessage] = []
            skip = offset
            cursor.execute(sql + " LIMIT ?", (destination, now_ms, now_ms, PEEK_SCAN_LIMIT))
            while len(out) < limit:
                batch = cursor.fetchmany(SCAN_BATCH)
                if not batch:
                    break
                for row in batch:
                    message = message_from_row(row)
                    if not selector(message.headers):
                        continue
                    if skip:
                        skip -= 1
                        continue
                    if files.load_if_present([message]):
                        out.append(message)
                    if len(out) == limit:
                        break
            return out

        return await self._store.read(run)

    async def destinations(self) -> list[str]:
        m = self._store.messages

        def run(conn: sqlite3.Connection) -> list[str]:
            return [row[0] for row in conn.execute(f"SELECT DISTINCT destination FROM {m} ORDER BY destination")]

        return await self._store.read(run)

    async def purge(self, destination: str) -> int:
        m = self._store.messages

        def run(conn: sqlite3.Connection) -> int:
            return conn.execute(f"DELETE FROM {m} WHERE destination = ?", (destination,)).rowcount

        return await self._store.write(run)

    def close(self) -> None:
        self._signals.notify_all()
