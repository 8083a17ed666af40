"""Topics on Redis: one stream per namespace (``{ns:t}:log``) with a retained length, and durable cursors in a hash.

Positions: the publishing script takes them from a counter (``{ns:t}:head``, ``INCRBY``) and appends each message
with the explicit entry id ``0-<position>``, in the same script, so positions are integers, strictly increasing and
visible in number order (scripts run one at a time). ``XADD ... MAXLEN ~ topic_retention`` trims as it appends
(whole stream nodes at a time, so a little more than the retention is kept); ``trim()`` trims exactly.

Followers read with blocking ``XREAD`` from their last position (on a connection of their own while blocked), so a
publish on any gateway reaches them without polling; when the first entry after their position is later than the
next one, trimming passed them and they yield a ``Gap`` first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from app.datasources import rules
from app.datasources.interface import DatasourceUnavailable, NewMessage, Published, StoredMessage, TailEvent, TailQueue
from app.datasources.redis.store import Store, _text
from app.datasources.sql_rows import decode_headers

__all__ = ["RedisTailQueue"]

log = logging.getLogger("stompgate.datasource.redis")

READ_BATCH = 256
BLOCK_MS = 5_000  # a blocked read returns empty this often (the client's socket timeout is longer)


def _position(entry_id: Any) -> int:
    return int(_text(entry_id).partition("-")[2])


def _published(entry_id: Any, fields: dict[bytes, bytes]) -> Published:
    position = _position(entry_id)
    expires = fields.get(b"x", b"")
    return Published(
        position=position,
        message=StoredMessage(
            message_id=_text(fields[b"i"]),
            destination=_text(fields[b"d"]),
            headers=decode_headers(_text(fields[b"h"])),
            body=bytes(fields[b"b"]),
            priority=int(fields[b"p"]),
            expires_at=int(expires) if expires else None,
            published_at=int(fields[b"t"]),
            seq=position,
        ),
    )


class RedisTailQueue(TailQueue):
    def __init__(self, store: Store) -> None:
        self._store = store
        self._retention = store.options.topic_retention
        rules.topic_trim_every(self._retention)  # refuses a retention below 1
        self._last = 0  # the newest position this gateway knows of
        self._closed = False
        store.on_notification(self._notified)

    async def start(self) -> None:
        self._last = await self.last_position()

    def _notified(self, payload: str) -> None:
        if payload.startswith("t") and payload[1:].isdigit():  # another gateway's publish: the end moved
            self._last = max(self._last, int(payload[1:]))

    async def publish(self, messages: Sequence[NewMessage]) -> list[int]:
        if not messages:
            return []
        newest = (await self._store.write(topic=messages)).newest
        self.after_publish(newest)
        return list(range(newest - len(messages) + 1, newest + 1))

    def after_publish(self, newest: int) -> None:
        self._last = max(self._last, newest)

    async def trim(self) -> None:
        """Trim the log to exactly ``topic_retention`` messages now."""
        client = self._store.client
        await self._store.call(lambda: client.xtrim(self._store.topic_log, maxlen=self._retention, approximate=False))

    def follow(self, *, after: int | None) -> AsyncIterator[TailEvent]:
        # "The current end" is the end when follow() is called: the newest position this gateway knows, from its own
        # publishes and reads and from other gateways' notifications.
        return self._follow(self._last if after is None else after)

    async def _follow(self, position: int) -> AsyncIterator[TailEvent]:
        backoff = 0.05
        client = self._store.client
        while not self._closed:
            try:
                reply = await self._store.call(
                    lambda: client.xread({self._store.topic_log: f"0-{position}"}, count=READ_BATCH, block=BLOCK_MS)
                )
            except DatasourceUnavailable as exc:  # resume from the last position yielded once it is back
                if self._closed:
                    return
                log.warning("topic follower: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            _stop_if_cancelled()
            backoff = 0.05
            entries = _entries(reply)
            if not entries:
                continue
            first = _position(entries[0][0])
            gap = rules.gap_before(first, position)
            if gap is not None:
                yield gap
                position = gap.oldest - 1
            for entry_id, fields in entries:
                event = _published(entry_id, fields)
                if event.position <= position:
                    continue
                position = event.position
                self._last = max(self._last, position)
                yield event

    async def last_position(self) -> int:
        head = await self._store.call(lambda: self._store.client.get(self._store.topic_head))
        newest = int(head) if head is not None else 0
        self._last = max(self._last, newest)
        return newest

    async def save_cursor(self, name: str, position: int) -> None:
        await self._store.call(lambda: self._store.client.hset(self._store.cursors, name, position))

    async def load_cursor(self, name: str) -> int | None:
        value = await self._store.call(lambda: self._store.client.hget(self._store.cursors, name))
        return None if value is None else int(value)

    async def delete_cursor(self, name: str) -> None:
        await self._store.call(lambda: self._store.client.hdel(self._store.cursors, name))

    def close(self) -> None:
        self._closed = True


def _stop_if_cancelled() -> None:
    """A cancel of the follower may be lost inside redis-py: it sends each command under ``asyncio.wait_for``, which
    on Python 3.11 returns normally when the cancel lands just as the send completes. The task still counts the
    cancel (``cancelling()``), so the follower stops here instead of reading on forever (and holding up shutdown)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _entries(reply: Any) -> list[tuple[Any, dict[bytes, bytes]]]:
    """XREAD's reply (RESP2: a list of [stream, entries]; RESP3: a dict) as one stream's entries."""
    if not reply:
        return []
    if isinstance(reply, dict):
        streams = list(reply.values())
        return list(streams[0][0]) if streams and streams[0] and isinstance(streams[0][0], list) else list(streams[0])
    return list(reply[0][1])
