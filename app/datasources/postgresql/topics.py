"""Topics on PostgreSQL: an append-only log table (``<ns>_topic_log``) with a retained window, and durable cursors.

How positions are made safe. Positions from a sequence become visible in commit order, not number order: a publisher
that took 11 may commit before one that took 10, and a follower that read 11 and moved on would never see 10. Here a
publisher takes its positions by updating the one row of ``<ns>_topic_head`` (``position = position + n``). The row
lock that UPDATE takes is held until the publisher's transaction ends, so the next publisher waits for it and then
reads the committed value: positions are handed out, and committed, strictly in number order, and a rolled-back
publish hands its positions back with its row update. A follower reading ``position > after`` therefore never passes
a position that is still to come; only trimming removes positions, and a follower it passed gets a ``Gap``. The cost
is that topic publishes of all gateways on one database are serialized at the commit, which group commit amortizes.

Trimming: each gateway deletes positions older than the newest ``topic_retention`` in the background, at most every
``max(1, min(1000, topic_retention // 10))`` publishes of its own, or when ``trim()`` is awaited.

Followers read the log in batches after their position; when they reach the end they wait for a notification
(``pg_notify`` in the publishing transaction, so delivered at its commit) or, while the listener is down, poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import asyncpg

from app.datasources import rules
from app.datasources.interface import DatasourceUnavailable, NewMessage, Published, TailEvent, TailQueue
from app.datasources.postgresql.rows import NEW_COLUMNS, message_from_row, new_arrays, unnest_new
from app.datasources.postgresql.store import Store, WriteAttempt
from app.datasources.wakeups import Signals

__all__ = ["PgTailQueue", "TOPIC_PAYLOAD"]

log = logging.getLogger("stompgate.datasource.postgresql")

READ_BATCH = 256
TOPIC_PAYLOAD = "t"  # a publish's notification: "t<newest position>" (queue payloads carry a destination after a colon)
IDLE_RECHECK_S = 5.0  # while notifications flow, a follower at the end looks again this often all the same


class PgTailQueue(TailQueue):
    def __init__(self, store: Store) -> None:
        self._store = store
        self._retention = store.options.topic_retention
        self._trim_every = rules.topic_trim_every(self._retention)
        self._published_since_trim = 0
        self._trimming: asyncio.Task[None] | None = None
        self._signals = Signals()
        self._last = 0  # the newest position this gateway knows of
        self._closed = False
        t = store.topic_log
        # One statement, so one round trip: take the positions (the head row's lock is held to the commit), append
        # the messages at them, and notify the followers of every gateway (delivered at the commit).
        self._sql_publish = (
            f"WITH head AS (UPDATE {store.topic_head} SET position = position + $1 RETURNING position), "
            f"stored AS (INSERT INTO {t} (position, {NEW_COLUMNS}) "
            f"SELECT head.position - $1 + m.n, {', '.join('m.' + c for c in NEW_COLUMNS.split(', '))} "
            f"FROM head, {unnest_new(2)} WITH ORDINALITY AS m({NEW_COLUMNS}, n)) "
            "SELECT head.position FROM head, LATERAL pg_notify($9, $10 || head.position::text) AS woken"
        )
        # with a write mark (Store.write_once) in the same statement
        self._sql_publish_marked = self._sql_publish.replace(
            "SELECT head.position FROM head,",
            f", marked AS (INSERT INTO {store.writes} (id, at) VALUES ($11, $12)) SELECT head.position FROM head,",
        )
        self._sql_after = (
            f"SELECT message_id, destination, headers, body, priority, expires_at, published_at, position, 0, NULL, 0 "
            f"FROM {t} WHERE position > $1 ORDER BY position LIMIT $2"
        )
        self._sql_oldest = f"SELECT min(position) FROM {t}"
        self._sql_published = f"SELECT max(position) FROM {t} WHERE message_id = ANY($1::text[])"
        self._sql_newest = f"SELECT position FROM {store.topic_head}"
        self._sql_trim = f"DELETE FROM {t} WHERE position <= (SELECT position FROM {store.topic_head}) - $1"
        store.on_notification(self._notified)
        store.on_listener_lost(lambda: self._signals.notify("log"))

    async def start(self) -> None:
        self._last = await self.last_position()

    def _notified(self, payload: str) -> None:
        if payload.startswith(TOPIC_PAYLOAD) and payload[len(TOPIC_PAYLOAD) :].isdigit():
            # another gateway's publish: the end of the log moved (follow(after=None) starts there)
            self._last = max(self._last, int(payload[len(TOPIC_PAYLOAD) :]))
            self._signals.notify("log")
        elif payload == "*":
            self._signals.notify("log")

    # -- writes --------------------------------------------------------------------------------------------------

    async def publish_in(
        self,
        conn: asyncpg.Connection,
        messages: Sequence[NewMessage],
        retry: bool = False,
        mark: WriteAttempt | None = None,
    ) -> int:
        """Append ``messages`` in the caller's transaction; return the newest position (taken under the head's row
        lock, which the transaction holds until it ends). With ``retry`` (an earlier attempt may have committed before
        its answer was lost) messages already in the log are that attempt's: their newest position is returned."""
        if retry:
            found = await conn.fetchval(self._sql_published, [m.message_id for m in messages])
            if found is not None:
                return int(found)
        marks = mark.mark_args() if mark is not None else ()
        newest = await conn.fetchval(
            self._sql_publish if mark is None else self._sql_publish_marked,
            len(messages),
            *new_arrays(messages),
            self._store.channel,
            TOPIC_PAYLOAD,
            *marks,
        )
        return int(newest)

    def after_publish(self, newest: int, count: int) -> None:
        self._last = max(self._last, newest)
        self._signals.notify("log")
        self._published_since_trim += count
        if self._published_since_trim >= self._trim_every and (self._trimming is None or self._trimming.done()):
            self._published_since_trim = 0
            self._trimming = asyncio.get_running_loop().create_task(self._trim_in_background(), name="topic trim")

    async def publish(self, messages: Sequence[NewMessage]) -> list[int]:
        if not messages:
            return []
        attempt = WriteAttempt()
        written = await self._store.write_once(
            attempt, lambda conn, again: self.publish_in(conn, messages, again, None if again else attempt), len(messages)
        )
        newest = written if written is not None else await self.committed_position(messages)
        self.after_publish(newest, len(messages))
        return list(range(newest - len(messages) + 1, newest + 1))

    async def committed_position(self, messages: Sequence[NewMessage]) -> int:
        """The newest position of ``messages``, published by a write whose answer was lost (the end of the log if
        trimming took them since)."""
        ids = [m.message_id for m in messages]
        found = await self._store.run(lambda conn: conn.fetchval(self._sql_published, ids), transaction=False)
        return int(found) if found is not None else await self.last_position()

    async def trim(self) -> None:
        """Trim the log to ``topic_retention`` messages now."""
        await self._store.run(lambda conn: conn.execute(self._sql_trim, self._retention), transaction=False)

    async def _trim_in_background(self) -> None:
        try:
            await self.trim()
        except DatasourceUnavailable as exc:  # the next publishes try again
            log.warning("topic log trim failed: %s", exc)

    # -- reads ---------------------------------------------------------------------------------------------------

    async def _read_after(self, position: int) -> tuple[int | None, list[Published]]:
        async def work(conn: asyncpg.Connection) -> tuple[int | None, list[Published]]:
            rows = await conn.fetch(self._sql_after, position, READ_BATCH)
            oldest = await conn.fetchval(self._sql_oldest)
            return oldest, [Published(position=r[7], message=message_from_row(r)) for r in rows]

        return await self._store.run(work, transaction=False)

    def follow(self, *, after: int | None) -> AsyncIterator[TailEvent]:
        # "The current end" is the end when follow() is called, not when the iterator first runs: the newest
        # position this gateway knows, from its own publishes and reads and from other gateways' notifications
        # (which carry their newest position; one still on its way makes the follower start a little earlier).
        return self._follow(self._last if after is None else after)

    async def _follow(self, position: int) -> AsyncIterator[TailEvent]:
        backoff = 0.05
        while not self._closed:
            wake = self._signals.event("log")  # before the read: a publish committed meanwhile still wakes us
            try:
                oldest, batch = await self._read_after(position)
            except DatasourceUnavailable as exc:  # resume from the last position yielded once it is back
                log.warning("topic follower: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            if not batch:
                if oldest is not None:
                    gap = rules.gap_before(oldest, position)
                    if gap is not None:
                        yield gap
                        position = gap.oldest - 1
                        continue
                timeout = IDLE_RECHECK_S if self._store.listening else self._store.options.poll_interval
                await self._signals.wait("log", timeout, wake)
                continue
            gap = rules.gap_before(batch[0].position, position)
            if gap is not None:
                yield gap
                position = gap.oldest - 1
            for entry in batch:
                if entry.position <= position:
                    continue
                position = entry.position
                self._last = max(self._last, position)
                yield entry

    async def last_position(self) -> int:
        newest = await self._store.run(lambda conn: conn.fetchval(self._sql_newest), transaction=False)
        self._last = max(self._last, int(newest))
        return int(newest)

    async def save_cursor(self, name: str, position: int) -> None:
        sql = (
            f"INSERT INTO {self._store.cursors} (name, position) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET position = excluded.position"
        )
        await self._store.run(lambda conn: conn.execute(sql, name, position), transaction=False)

    async def load_cursor(self, name: str) -> int | None:
        sql = f"SELECT position FROM {self._store.cursors} WHERE name = $1"
        value = await self._store.run(lambda conn: conn.fetchval(sql, name), transaction=False)
        return None if value is None else int(value)

    async def delete_cursor(self, name: str) -> None:
        sql = f"DELETE FROM {self._store.cursors} WHERE name = $1"
        await self._store.run(lambda conn: conn.execute(sql, name), transaction=False)

    async def close(self) -> None:
        self._closed = True
        self._signals.notify_all()
        if self._trimming is not None:
            self._trimming.cancel()
            with contextlib.suppress(asyncio.CancelledError, DatasourceUnavailable):
                await self._trimming
