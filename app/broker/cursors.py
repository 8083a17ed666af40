"""Saving durable topic subscriptions' positions: batched, one flush at a time, retried, and awaitable per name."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from app.broker.futures import chain
from app.broker.supervision import BackgroundHealth

__all__ = ["CursorSaver"]

log = logging.getLogger("stompgate.cursors")

BATCH_DELAY_S = 0.05  # positions moved within this long are saved together
RETRY_S = 1.0  # a failed save is tried again this long after
# Failed tries of one position before whoever waits for it is told (a durable ACK's RECEIPT becomes an ERROR "Not
# stored"); the position is still retried after that, as long as the gateway runs.
MAX_ATTEMPTS = 5


class CursorSaver:
    """Positions to save, newest per name; :meth:`save_soon` returns a future that completes once that position (or
    a later one) is stored. One flush runs at a time, so a retried older position can never overwrite a newer one,
    and one name failing does not hold up the others."""

    def __init__(
        self,
        save: Callable[[str, int], Awaitable[None]],
        delete: Callable[[str], Awaitable[None]],
        health: BackgroundHealth,
    ) -> None:
        self._save = save
        self._delete = delete
        self._health = health
        self._pending: dict[str, int] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._attempts: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def save_soon(self, name: str, position: int) -> asyncio.Future[None]:
        self._pending[name] = position
        waiter = self._waiters.get(name)
        if waiter is None:
            waiter = self._waiters[name] = asyncio.get_running_loop().create_future()
        self._schedule(BATCH_DELAY_S)
        return waiter

    def _schedule(self, delay: float) -> None:
        if self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(delay, self._start)

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self.flush(), name="cursor saves")

    async def flush(self) -> None:
        """Save what is pending; failures are counted, kept for a retry and reported to waiters after MAX_ATTEMPTS."""
        async with self._lock:
            saves, self._pending = self._pending, {}
            waiters = {name: self._waiters.pop(name) for name in saves if name in self._waiters}
            failed = False
            for name, position in saves.items():
                waiter = waiters.get(name)
                try:
                    await self._save(name, position)
                except Exception as exc:
                    failed = True
                    attempts = self._attempts[name] = self._attempts.get(name, 0) + 1
                    self._health.failed("cursor saves", exc)
                    log.warning("saving the position of %r failed (%d tries): %r", name, attempts, exc)
                    self._pending.setdefault(name, position)  # a newer position, if one came, wins
                    if waiter is not None:
                        if attempts >= MAX_ATTEMPTS:
                            if not waiter.done():
                                waiter.set_exception(exc)
                        elif name in self._waiters:  # a newer position is waited for: this one completes with it
                            chain(self._waiters[name], waiter)
                        else:
                            self._waiters[name] = waiter
                    continue
                self._attempts.pop(name, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            if not failed and saves:
                self._health.succeeded("cursor saves")
            if self._pending:
                self._schedule(RETRY_S if failed else BATCH_DELAY_S)

    async def delete(self, name: str) -> None:
        """Forget ``name`` (a deleted durable subscription): a position of it still waiting here is dropped, and the
        delete runs under the flush lock, so no save of an older position can land after it and bring it back.
        Whoever waited for a dropped position is told it is done: the subscription it belonged to is gone. When the
        delete fails, the dropped position is put back (saved with the next flush) and its waiter waits for that."""
        async with self._lock:
            position = self._pending.pop(name, None)
            waiter = self._waiters.pop(name, None)
            try:
                await self._delete(name)
            except BaseException:
                if position is not None:
                    self._pending.setdefault(name, position)
                    if waiter is not None:
                        self._waiters.setdefault(name, waiter)
                        waiter = None
                    self._schedule(RETRY_S)
                raise
            self._attempts.pop(name, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def close(self) -> None:
        """A last flush; whoever still waits is then told the position was not stored."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.flush()
        except Exception:
            log.exception("saving durable subscriptions' positions at shutdown failed")
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(RuntimeError("the gateway stopped before the position was stored"))
        self._waiters.clear()
