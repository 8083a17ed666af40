"""Long-lived background loops that survive any exception: lease renewal, the heart-beat tick, the topic follower.

A loop that dies silently is worse than a crash: lease renewal that stopped after an unexpected error let every
in-flight message be redelivered a lease later, and nobody was told. :func:`supervise` runs one step of a loop
forever; an exception is logged, counted, backed off and retried, and :class:`BackgroundHealth` remembers which loops
are failing right now, so ``/ready`` turns red and a metric shows it while one keeps failing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

__all__ = ["BackgroundHealth", "supervise", "FAILING_AFTER"]

log = logging.getLogger("stompgate.background")

# Consecutive failures after which a loop counts as failing (``/ready`` answers 503): one failure is a hiccup the
# retry absorbs, three in a row (several seconds with the back-off) is a problem an operator must see.
FAILING_AFTER = 3
FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
RECOVERED_AFTER_S = 5.0  # a long-running step that stays up this long has recovered


class BackgroundHealth:
    """Consecutive failures per background loop, and the last error of each."""

    def __init__(self, on_change: Callable[[str, bool], None] | None = None) -> None:
        self._failures: dict[str, int] = {}
        self._last_error: dict[str, str] = {}
        self._on_change = on_change  # (loop name, failing now) for a metric

    def succeeded(self, name: str) -> None:
        if self._failures.pop(name, 0) >= FAILING_AFTER and self._on_change is not None:
            self._on_change(name, False)
        self._last_error.pop(name, None)

    def failed(self, name: str, exc: BaseException) -> int:
        count = self._failures[name] = self._failures.get(name, 0) + 1
        self._last_error[name] = f"{type(exc).__name__}: {exc}"
        if count == FAILING_AFTER and self._on_change is not None:
            self._on_change(name, True)
        return count

    def failing(self) -> dict[str, str]:
        """The loops failing right now, each with its last error."""
        return {name: self._last_error.get(name, "") for name, n in self._failures.items() if n >= FAILING_AFTER}


async def supervise(
    name: str,
    step: Callable[[], Awaitable[None]],
    health: BackgroundHealth,
    *,
    every: float = 0.0,
) -> None:
    """Run ``step`` forever, ``every`` seconds apart after a success; after an exception, log it, back off (doubling
    from 0.1 s to at most 5 s, and never longer than ``every`` when that is set) and run it again. With ``every`` 0 the
    step is meant to run for good: if it returns, it is started again after the same back-off. Only cancellation
    ends it."""
    backoff = FIRST_BACKOFF_S
    loop = asyncio.get_running_loop()
    while True:
        started = time.monotonic()
        # A step that runs for good (a follower) recovers by staying up, not by returning: alive this long, it counts
        # as a success, so /ready turns green again without waiting for traffic.
        recovered = loop.call_later(RECOVERED_AFTER_S, health.succeeded, name)
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            count = health.failed(name, exc)
            level = logging.ERROR if count >= FAILING_AFTER else logging.WARNING
            log.log(level, "%s failed (%d in a row), retrying in %.1fs: %r", name, count, backoff, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S, every or MAX_BACKOFF_S)
            continue
        finally:
            recovered.cancel()
        health.succeeded(name)
        if every:
            backoff = FIRST_BACKOFF_S
            await asyncio.sleep(max(0.0, every - (time.monotonic() - started)))
        else:
            # A step meant to run for good returned (its source closed): never spin on it, wait and start it again.
            log.warning("%s ended; starting it again in %.1fs", name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
