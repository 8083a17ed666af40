"""Small helpers over asyncio futures that the broker and the sessions share."""

from __future__ import annotations

import asyncio

__all__ = ["chain"]


def chain(source: asyncio.Future[None], target: asyncio.Future[None]) -> None:
    """Complete ``target`` like ``source`` (result, exception or cancellation) once ``source`` is done."""

    def copy(done: asyncio.Future[None]) -> None:
        if target.done():
            return
        if done.cancelled():
            target.cancel()
        elif (exc := done.exception()) is not None:
            target.set_exception(exc)
        else:
            target.set_result(None)

    source.add_done_callback(copy)
