"""Completions: a connection's RECEIPTs and ERRORs, sent in the order of the frames they answer, each once the work
it confirms is done. ``Session.receive`` never awaits; this queue is how its results come back in order."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ["Completions"]


class Completions:
    """Runs completion callbacks in the order their frames arrived, each once its future (if any) is done."""

    def __init__(self, on_drain: Callable[[], None]) -> None:
        self._queue: deque[tuple[asyncio.Future[None] | None, Callable[[BaseException | None], None]]] = deque()
        self._on_drain = on_drain
        self._last_future: asyncio.Future[None] | None = None  # frames of one read share a future: one callback
        self._idle: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, future: asyncio.Future[None] | None, done: Callable[[BaseException | None], None]) -> None:
        if not self._queue and (future is None or future.done()):
            done(_exception_of(future))
            return
        if future is not None and future is not self._last_future:
            future.add_done_callback(self._pump)
            self._last_future = future
        self._queue.append((future, done))

    def _pump(self, _: object = None) -> None:
        queue = self._queue
        while queue and (queue[0][0] is None or queue[0][0].done()):
            future, done = queue.popleft()
            done(_exception_of(future))
        self._on_drain()
        if not queue and self._idle is not None:
            self._idle.set()

    async def idle(self) -> None:
        """Return once every pushed completion has run (used by graceful shutdown)."""
        if self._queue:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def cancel_all(self) -> None:
        self._queue.clear()


def _exception_of(future: asyncio.Future[None] | None) -> BaseException | None:
    if future is None:
        return None
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception()
