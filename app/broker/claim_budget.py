"""One connection's claim budget: the bytes its queue subscriptions are claiming, or have claimed and not yet handed to
the connection. Each subscription claims only into what is left of ``CLAIM_BUDGET`` after the connection's write
backlog and the other subscriptions' reservations, so a connection with many queue subscriptions that reads nothing
holds about one budget of claimed messages in the gateway, not one claim per subscription.

A reservation lasts only while it can come back by itself: a claim's round trip (not its wait for work, nor a retry's
pause), then the claimed messages until they are handed over. And whoever gives bytes back lets the subscriptions
waiting for them go first (``handoff``), so one busy subscription cannot keep taking the whole budget back."""

from __future__ import annotations

import asyncio

__all__ = ["ClaimBudget"]


class ClaimBudget:
    def __init__(self) -> None:
        self.reserved = 0  # bytes: claims in flight at their size estimate, then the claimed messages not handed over
        self.handoff = False  # bytes were given back to waiting subscriptions that have not run yet
        self._freed: asyncio.Event | None = None

    def change(self, delta: int) -> None:
        self.reserved += delta
        if delta < 0 and self._freed is not None:
            self._freed.set()  # wakes every subscription waiting now; later ones wait for the next release
            self._freed = None
            self.handoff = True

    async def freed(self) -> None:
        """Return once some subscription gave back part of what it reserved."""
        if self._freed is None:
            self._freed = asyncio.Event()
        await self._freed.wait()

    async def let_waiters_go_first(self) -> bool:
        """After a release that woke waiting subscriptions: yield once, so that they claim before the caller claims
        again. True if it yielded (the caller then looks at the room again)."""
        if not self.handoff:
            return False
        self.handoff = False
        await asyncio.sleep(0)  # the woken waiters were scheduled when the event was set: they run now
        return True
