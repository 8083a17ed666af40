"""Group many callers' small writes into few large ones, keeping order (group commit at the broker level)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from app.datasources.interface import DatasourceUnavailable

__all__ = ["Batcher"]

T = TypeVar("T")


class Batcher(Generic[T]):
    """Hands items to ``sink`` one batch at a time, in submission order.

    While a batch is being written, new submissions accumulate; the next batch takes all of them. A group submitted
    together is never split across batches, so a transaction's messages land in one ``sink`` call (one database
    transaction on backends that have them). Each submitter gets a future that completes when its group is written.
    When a batch of several groups fails (other than the database being unavailable), each group is written again
    alone, so one submitter's bad item costs no other submitter its write.
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
                except Exception as exc:
                    if len(taken) > 1 and not isinstance(exc, DatasourceUnavailable):
                        # One submitter's bad item must not fail the others': write each group alone, so only the
                        # group that fails again learns it. (A database that is down fails them all, at once.)
                        await self._write_alone(taken)
                    else:
                        _settle(taken, exc)
                else:
                    _settle(taken, None)
        finally:
            self._task = None
            if self._groups:  # submitted while we were cancelled or finishing
                self._task = asyncio.get_running_loop().create_task(self._run())

    async def _write_alone(self, taken: list[tuple[list[T], asyncio.Future[None]]]) -> None:
        for items, future in taken:
            try:
                await self._sink(items)
            except Exception as exc:
                _settle([(items, future)], exc)
            else:
                _settle([(items, future)], None)

    async def close(self) -> None:
        while self._task is not None:
            await asyncio.shield(self._task)


def _settle(taken: list[tuple[list[T], asyncio.Future[None]]], exc: BaseException | None) -> None:
    """Complete each submitter's future: written (``exc`` None) or not, with the reason."""
    for _, future in taken:
        if not future.done():
            if exc is None:
                future.set_result(None)
            else:
                future.set_exception(exc)
