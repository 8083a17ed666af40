"""Group many callers' small writes into few large ones, keeping order (group commit at the broker level)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["Batcher"]

T = TypeVar("T")


class Batcher(Generic[T]):
    """Hands items to ``sink`` one batch at a time, in submission order.

    While a batch is being written, new submissions accumulate; the next batch takes all of them. A group submitted
    together is never split across batches, so a transaction's messages land in one ``sink`` call (one database
    transaction on backends that have them). Each submitter gets a future that completes when its group is written.
    """

    def __init__(self, sink: Callable[[list[T]], Awaitable[None]], *, max_batch: int = 2_000) -> None:
        self._sink = sink
        self._max_batch = max_batch
        self._groups: deque[tuple[list[T], asyncio.Future[None]]] = deque()
        self._task: asyncio.Task[None] | None = None

    def submit(self, items: list[T]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._groups.append((items, future))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return future

    async def _run(self) -> None:
        try:
            while self._groups:
                taken: list[tuple[list[T], asyncio.Future[None]]] = []
                batch: list[T] = []
                while self._groups and (not batch or len(batch) + len(self._groups[0][0]) <= self._max_batch):
                    items, future = self._groups.popleft()
                    taken.append((items, future))
                    batch.extend(items)
                try:
                    await self._sink(batch)
                except Exception as exc:  # every submitter of this batch learns it was not written
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in taken:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._task = None
            if self._groups:  # submitted while we were cancelled or finishing
                self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        while self._task is not None:
            await asyncio.shield(self._task)
