"""One connection's writes reach the database in the order the client sent them.

SENDs, ACKs, NACKs and COMMITs travel through different group writers (``Broker.publish_nowait``, ``ack_nowait``,
``release``, ``commit_nowait``), each of which keeps its own submission order but not the order between them. A
COMMIT is the one write that must wait: it is handed over only once every write the connection sent before it is
stored, and every write sent after it waits until the COMMIT is stored. Plain writes between COMMITs go out at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from app.broker.futures import chain

__all__ = ["WriteOrder"]


class WriteOrder:
    def __init__(self) -> None:
        self._unstored: set[asyncio.Future[None]] = set()  # handed over (or parked), not yet stored
        self._blocked_by: asyncio.Future[None] | None = None  # the COMMIT in flight
        # what waits for it, in the order it was sent; cleared only by the COMMIT's own done-callback, so a write
        # that arrives in the loop turn between the COMMIT's completion and that callback still queues behind
        self._parked: deque[Callable[[], None]] = deque()

    def write(self, submit: Callable[[], asyncio.Future[None]], placeholder: asyncio.Future[None]) -> None:
        """Hand a write over now (``submit`` returns its future), or once the COMMIT in flight is stored;
        ``placeholder`` completes like the write."""
        self._track(placeholder)
        self._in_turn(lambda: chain(submit(), placeholder))

    def commit(self, submit: Callable[[], asyncio.Future[None]], stored: asyncio.Future[None]) -> None:
        """Hand a COMMIT over once the writes sent before it are stored; ``stored`` completes like it. When one of
        those writes failed, the COMMIT fails with the same error and is never handed over."""
        earlier = [f for f in self._unstored if not f.done()]
        self._track(stored)

        def start() -> None:
            self._blocked_by = stored
            stored.add_done_callback(self._unblock)
            if not earlier:
                chain(submit(), stored)
                return

            def go(gathered: asyncio.Future[list[None]]) -> None:
                if stored.done():
                    return
                if gathered.cancelled():
                    stored.cancel()
                elif (exc := gathered.exception()) is not None:
                    stored.set_exception(exc)
                else:
                    chain(submit(), stored)

            asyncio.gather(*earlier).add_done_callback(go)

        self._in_turn(start)

    def _track(self, future: asyncio.Future[None]) -> None:
        self._unstored.add(future)
        future.add_done_callback(self._unstored.discard)

    def _in_turn(self, action: Callable[[], None]) -> None:
        if self._blocked_by is None and not self._parked:
            action()
        else:
            self._parked.append(action)

    def _unblock(self, _: object) -> None:
        self._blocked_by = None
        while self._parked and self._blocked_by is None:  # a parked COMMIT blocks again
            self._parked.popleft()()
