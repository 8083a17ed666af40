"""Wake-ups for ``PollQueue.wait``, shared by every backend: an eventcount per destination."""

from __future__ import annotations

import asyncio

__all__ = ["Signals"]


class Signals:
    """One asyncio.Event per key (a destination), replaced after it fires, so a waiter only sees notifications made
    after it began. Each backend keeps one and notifies a destination when a put or a requeue made something
    claimable there."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def event(self, key: str) -> asyncio.Event:
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = asyncio.Event()
        return event

    def notify(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    def notify_all(self) -> None:
        for key in list(self._events):
            self.notify(key)

    async def wait(self, key: str, timeout: float, token: asyncio.Event | None = None) -> None:
        """Return once ``key`` is notified or after ``timeout`` seconds. With ``token`` (an ``event(key)`` taken
        before the caller looked for work) a notification made since then returns at once: no wake-up is lost
        between an empty claim and the wait (an eventcount)."""
        event = token if token is not None else self.event(key)
        if event.is_set():
            return
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass
