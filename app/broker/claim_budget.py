"""One connection's claim budget: the bytes its queue subscriptions have claimed, or are claiming, and not yet handed
to the connection. Each subscription claims only into what is left of ``CLAIM_BUDGET`` after the connection's write
backlog and the other subscriptions' reservations, so a connection with many queue subscriptions that reads nothing
holds about one budget of claimed messages in the gateway, not one claim per subscription."""

from __future__ import annotations

import asyncio

__all__ = ["ClaimBudget"]


class ClaimBudget:
    def __init__(self) -> None:
        self.reserved = 0  # bytes: claims in flight at their size estimate, then the claimed messages not handed over
        self._freed: asyncio.Event | None = None

    def change(self, delta: int) -> None:
        self.reserved += delta
        if delta < 0 and self._freed is not None:
            self._freed.set()  # wakes every subscription waiting now; later ones wait for the next release
            self._freed = None

    async def freed(self) -> None:
        """Return once some subscription gave back part of what it reserved."""
        if self._freed is None:
            self._freed = asyncio.Event()
        await self._freed.wait()
