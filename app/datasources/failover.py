"""The failover buffer, shared by the backends of a database server: writes (``put``/``publish``/a COMMIT) that meet
an unreachable server wait here and are replayed in order when it returns. The caller's ``await`` simply completes
later (a RECEIPT waits with it); a full buffer is refused at once."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from app.datasources.interface import DatasourceUnavailable

__all__ = ["FailoverWriter", "WriteOp"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# A write to run: called with ``retry=True`` when an earlier attempt may have reached the server, so the operation
# must treat "already there" (duplicate key on its own ids) as success.
WriteOp = Callable[[bool], Awaitable[T]]

FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0


@dataclass(slots=True)
class _Pending:
    count: int
    op: Callable[[bool], Awaitable[Any]]
    future: asyncio.Future[Any]
    retry: bool


class FailoverWriter:
    """Runs writes directly while the server answers. Once a write fails with one of ``unavailable`` (the driver's
    "cannot reach the server" errors) the writer is in outage: that write and every later one queue up (bounded by
    ``capacity`` messages) and a single flusher task replays them in arrival order, retrying with backoff, until the
    queue is empty again. Other errors reach the caller unchanged. ``database`` names the server in messages."""

    def __init__(self, capacity: int, *, unavailable: tuple[type[BaseException], ...], database: str) -> None:
        self._capacity = capacity
        self._unavailable = unavailable
        self._database = database
        self._queue: deque[_Pending] = deque()
        self._waiting = 0
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def waiting(self) -> int:
        """Messages buffered now."""
        return self._waiting

    async def run(self, count: int, op: WriteOp[T]) -> T:
        retry = False
        if not self._queue:
            try:
                return await op(False)
            except self._unavailable as exc:
                log.warning("%s unreachable (%s); buffering writes until it returns", self._database, exc)
                retry = True
        if self._closed:
            raise DatasourceUnavailable(f"the {self._database} datasource is closed")
        if self._waiting + count > self._capacity:
            raise DatasourceUnavailable(f"failover buffer full: {self._waiting} messages waiting for the database")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(count, op, future, retry))
        self._waiting += count
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"stompgate {self._database} failover flush")
        return cast(T, await future)

    async def _flush(self) -> None:
        backoff = FIRST_BACKOFF_S
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():  # the caller gave up (cancelled): do not write behind its back
                self._pop()
                continue
            if self._closed:
                self._pop()
                pending.future.set_exception(DatasourceUnavailable(f"the {self._database} datasource was closed"))
                continue
            try:
                result = await pending.op(pending.retry)
            except self._unavailable:
                pending.retry = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            except Exception as exc:  # noqa: BLE001 - handed to the caller, whose write it was
                self._pop()
                if not pending.future.done():
                    pending.future.set_exception(exc)
                continue
            backoff = FIRST_BACKOFF_S
            self._pop()
            if not pending.future.done():
                pending.future.set_result(result)

    def _pop(self) -> None:
        pending = self._queue.popleft()
        self._waiting -= pending.count

    async def close(self) -> None:
        """Fail what is still buffered (the caller never got a success, so nothing acknowledged is lost)."""
        self._closed = True
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            flusher.cancel()
            try:
                await flusher
            except asyncio.CancelledError:
                pass
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(DatasourceUnavailable(f"the {self._database} datasource was closed"))
        self._waiting = 0
