"""Topics on SQLite: an append-only log table (``<ns>_topic_log``) with a retained window, and durable cursors.

The log holds at least ``topic_retention`` messages; the writer trims it every ``max(1, min(1000, topic_retention //
10))`` publishes, or when ``trim()`` is awaited. Positions are assigned in the single writer, so they become visible in
number order. Followers read a backlog from the database in batches, then follow an in-memory tail of recently
committed messages; a follower the trimming passed gets a ``Gap`` (``rules.gap_before``).
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Sequence

from app.datasources import rules
from app.datasources.interface import NewMessage, Published, StoredMessage, TailEvent, TailQueue
from app.datasources.sqlite.rows import SCAN_BATCH, headers_text, message_from_row
from app.datasources.sqlite.store import Store, Write
from app.datasources.wakeups import Signals

__all__ = ["SqliteTailQueue"]

TAIL_SIZE = 4_096  # recently committed topic messages kept in memory for followers


class SqliteTailQueue(TailQueue):
    def __init__(self, store: Store) -> None:
        self._store = store
        self._retention = store.options.topic_retention
        self._trim_every = rules.topic_trim_every(self._retention)
        # never longer than the retained window, so the tail cannot hide a Gap the database would report
        self._tail: deque[Published] = deque(maxlen=min(TAIL_SIZE, self._retention))
        self._last = 0  # newest committed position (event-loop state)
        self._written = 0  # newest position assigned by the writer (writer-thread state)
        self._trimmed_at = 0  # writer-thread state
        self._signals = Signals()
        self._closed = False
        t = store.topic_log
        self._sql_insert = (
            f"INSERT INTO {t} (position, message_id, destination, headers, body, priority, expires_at, published_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._sql_trim = f"DELETE FROM {t} WHERE position <= ?"
        self._sql_after = (
            f"SELECT message_id, destination, headers, body, priority, expires_at, published_at, position, 0, NULL, 0 "
            f"FROM {t} WHERE position > ? ORDER BY position LIMIT ?"
        )
        self._sql_oldest = f"SELECT min(position) FROM {t}"

    async def start(self) -> None:
        t = self._store.topic_log

        def run(conn: sqlite3.Connection) -> int:
            (newest,) = conn.execute(f"SELECT coalesce(max(position), 0) FROM {t}").fetchone()
            return int(newest)

        self._last = await self._store.read(run)
        self._written = self._trimmed_at = self._last

    async def publish(self, messages: Sequence[NewMessage]) -> list[int]:
        if not messages:
            return []
        start = await self._store.write(*self.publish_write(messages))
        return list(range(start + 1, start + len(messages) + 1))

    def publish_write(self, messages: Sequence[NewMessage]) -> Write[int]:
        """The writer-thread step of a publish (returns the position before the first message) and its follow-up."""
        rows = [
            (
                m.message_id,
                m.destination,
                headers_text(m.headers),
                m.body,
                m.priority,
                m.expires_at,
                m.published_at,
            )
            for m in messages
        ]

        def run(conn: sqlite3.Connection) -> int:
            start = self._newest(conn)
            conn.executemany(self._sql_insert, [(start + i, *row) for i, row in enumerate(rows, 1)])
            newest = start + len(rows)
            if newest - self._trimmed_at >= self._trim_every:
                conn.execute(self._sql_trim, (newest - self._retention,))
                self._trimmed_at = newest
            self._written = newest
            return start

        def after(start: int) -> None:
            for i, message in enumerate(messages, 1):
                position = start + i
                self._tail.append(
                    Published(
                        position=position,
                        message=StoredMessage(
                            message_id=message.message_id,
                            destination=message.destination,
                            headers=message.headers,
                            body=message.body,
                            priority=message.priority,
                            expires_at=message.expires_at,
                            published_at=message.published_at,
                            seq=position,
                        ),
                    )
                )
            self._last = max(self._last, start + len(messages))
            self._signals.notify("log")

        return run, after

    def _newest(self, conn: sqlite3.Connection) -> int:
        # Read in the transaction rather than trusting ``_written``: a rolled-back batch may have advanced it.
        (newest,) = conn.execute(f"SELECT coalesce(max(position), 0) FROM {self._store.topic_log}").fetchone()
        return int(newest)

    async def trim(self) -> None:
        """Trim the log to ``topic_retention`` messages now (the writer otherwise trims every few publishes)."""

        def run(conn: sqlite3.Connection) -> None:
            newest = self._newest(conn)
            conn.execute(self._sql_trim, (newest - self._retention,))
            self._trimmed_at = newest

        await self._store.write(run)

    async def _read_after(self, position: int) -> tuple[int | None, list[Published]]:
        def run(conn: sqlite3.Connection) -> tuple[int | None, list[Published]]:
            rows = conn.execute(self._sql_after, (position, SCAN_BATCH)).fetchall()
            (oldest,) = conn.execute(self._sql_oldest).fetchone()
            return oldest, [Published(position=row[7], message=message_from_row(row)) for row in rows]

        return await self._store.read(run)

    def follow(self, *, after: int | None) -> AsyncIterator[TailEvent]:
        # "the current end" is the end when follow() is called, not when the iterator first runs
        return self._follow(self._last if after is None else after)

    async def _follow(self, position: int) -> AsyncIterator[TailEvent]:
        while not self._closed:
            if position >= self._last:
                await self._signals.event("log").wait()
                continue
            tail = self._tail
            if tail and tail[0].position <= position + 1:
                index = position + 1 - tail[0].position
                entry = tail[index]
                position = entry.position
                yield entry
                continue
            oldest, batch = await self._read_after(position)
            first = batch[0].position if batch else (oldest if oldest is not None else self._last + 1)
            gap = rules.gap_before(first, position)
            if gap is not None:
                yield gap
                position = gap.oldest - 1
            for entry in batch:
                if entry.position <= position:
                    continue
                position = entry.position
                yield entry

    async def last_position(self) -> int:
        return self._last

    async def save_cursor(self, name: str, position: int) -> None:
        c = self._store.cursors

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO {c} (name, position) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET position = excluded.position",
                (name, position),
            )

        await self._store.write(run)

    async def load_cursor(self, name: str) -> int | None:
        c = self._store.cursors

        def run(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(f"SELECT position FROM {c} WHERE name = ?", (name,)).fetchone()
            return None if row is None else int(row[0])

        return await self._store.read(run)

    async def delete_cursor(self, name: str) -> None:
        c = self._store.cursors

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(f"DELETE FROM {c} WHERE name = ?", (name,))

        await self._store.write(run)

    def close(self) -> None:
        self._closed = True
        self._signals.notify_all()
