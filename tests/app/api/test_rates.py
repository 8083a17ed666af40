"""Rates over a sliding window of counter samples."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from app.api.rates import DELIVERED_COUNTER, PUBLISHED_COUNTER, RateTracker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rates_over_the_window() -> None:
    registry = CollectorRegistry()
    delivered = Counter(DELIVERED_COUNTER + "_total", "d", ["destination"], registry=registry)
    published = Counter(PUBLISHED_COUNTER + "_total", "p", ["destination"], registry=registry)
    clock = Clock()
    tracker = RateTracker(window=10, clock=clock)
    assert tracker.rates(registry) == {}
    tracker.sample(registry)
    for second in range(1, 21):
        clock.now = second
        delivered.labels("/queue/a").inc(5)
        published.labels("/queue/a").inc(2 if second > 10 else 0)
        tracker.sample(registry)
    rates = tracker.rates(registry)
    assert rates[(DELIVERED_COUNTER, "/queue/a")] == 5.0  # the last 10 seconds only
    assert rates[(PUBLISHED_COUNTER, "/queue/a")] == 2.0


def test_a_counter_reset_restarts_the_window() -> None:
    clock = Clock()
    tracker = RateTracker(window=60, clock=clock)
    tracker.record({(DELIVERED_COUNTER, "/queue/a"): 100.0})
    clock.now = 1
    tracker.record({(DELIVERED_COUNTER, "/queue/a"): 3.0})
    clock.now = 2
    registry = CollectorRegistry()
    Counter(DELIVERED_COUNTER + "_total", "d", ["destination"], registry=registry).labels("/queue/a").inc(4)
    assert tracker.rates(registry) == {(DELIVERED_COUNTER, "/queue/a"): 1.0}
