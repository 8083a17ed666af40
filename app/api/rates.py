"""Per-destination publish and delivery rates, from the broker's Prometheus counters over a sliding window.

A sampler (started by the API's lifespan, one per app) reads the counters every ``interval`` seconds and keeps the
samples of the last ``window`` seconds in memory. A rate is (value now - value at the oldest sample in the window) /
elapsed time. A counter that went down (a new broker in the same app) restarts the window.

The counters are bounded (``BrokerMetrics.max_destinations``): a destination past the cap has no series of its own,
its traffic is under ``destination="_other"`` (``OTHER``, which names no destination), so its own rates read 0. A
series the broker forgets (a destination gone idle) just leaves the samples instead of restarting everyone's window;
should it come back, its rate counts from its new zero.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry

__all__ = ["RateTracker", "PUBLISHED_COUNTER", "DELIVERED_COUNTER", "read_counters"]

# Counter families (names without ``_total``) that carry a ``destination`` label.
PUBLISHED_COUNTER = "stompgate_destination_messages_published"
DELIVERED_COUNTER = "stompgate_messages_delivered"

Values = dict[tuple[str, str], float]  # (family, destination) -> counter value


def read_counters(registry: CollectorRegistry, families: tuple[str, ...] = (PUBLISHED_COUNTER, DELIVERED_COUNTER)) -> Values:
    values: Values = {}
    for metric in registry.collect():
        if metric.name not in families:
            continue
        for sample in metric.samples:
            destination = sample.labels.get("destination")
            if sample.name.endswith("_total") and destination is not None:
                values[(metric.name, destination)] = sample.value
    return values


class RateTracker:
    def __init__(self, window: float = 60.0, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.interval = interval
        self._clock = clock
        self._samples: deque[tuple[float, Values]] = deque()

    def sample(self, registry: CollectorRegistry) -> None:
        self.record(read_counters(registry))

    def record(self, values: Values) -> None:
        now = self._clock()
        last = self._samples[-1][1] if self._samples else {}
        if any(key in values and values[key] < old for key, old in last.items()):
            self._samples.clear()  # counters were reset
        self._samples.append((now, values))
        while len(self._samples) > 1 and now - self._samples[0][0] > self.window:
            self._samples.popleft()

    def rates(self, registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        """Per (family, destination): events per second over the window, up to now."""
        current = read_counters(registry)
        now = self._clock()
        while len(self._samples) > 1 and now - self._samples[0][0] > self.window:
            self._samples.popleft()
        if not self._samples:
            return {}
        start, old = self._samples[0]
        elapsed = now - start
        if elapsed <= 0:
            return {}
        return {key: _increase(old.get(key, 0.0), value) / elapsed for key, value in current.items()}

    async def run(self, registry: CollectorRegistry) -> None:
        while True:
            self.sample(registry)
            await asyncio.sleep(self.interval)


def _increase(old: float, value: float) -> float:
    """A counter below its old value was forgotten and started again within the window: all it holds is new."""
    return value - old if value >= old else value
