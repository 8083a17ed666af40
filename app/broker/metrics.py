"""Prometheus counters the broker keeps, in a registry of its own (no process-wide globals).

Destination labels are bounded, because clients invent destination names and every label value is a series held for
good, here and in Prometheus. The first ``max_destinations`` destinations seen get series of their own; the traffic of
any further one is counted under ``destination="_other"`` (``OTHER``), so totals still add up. ``forget`` drops a
destination's series and frees its slot for the next new destination (the broker calls it for destinations that look
gone: see ``Broker.forget_idle_destinations``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["BrokerMetrics", "OTHER"]

OTHER = "_other"  # the label value shared by destinations past max_destinations (not a valid destination name)


class _Slot:
    """One destination's label children (made on first use: no zero series) and when it last had traffic."""

    __slots__ = ("label", "published", "delivered", "last_used")

    def __init__(self, label: str, now: float) -> None:
        self.label = label
        self.published: Any = None
        self.delivered: Any = None
        self.last_used = now


class BrokerMetrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_destinations: int = 1_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.max_destinations = max_destinations
        self.clock = clock  # seconds, for idleness only (a test sets its own)
        r = self.registry
        self.connections = Gauge("stompgate_connections", "Open STOMP connections", ["transport"], registry=r)
        self.frames_in = Counter("stompgate_frames_received_total", "STOMP frames received", ["transport"], registry=r)
        self.bytes_received = Counter("stompgate_bytes_received_total", "Bytes received", ["transport"], registry=r)
        self.bytes_sent = Counter("stompgate_bytes_sent_total", "Bytes sent", ["transport"], registry=r)
        self.messages_published = Counter(
            "stompgate_messages_published_total", "Messages stored by SEND or REST", ["kind"], registry=r
        )
        self.destination_published = Counter(
            "stompgate_destination_messages_published_total", "Messages stored per destination", ["destination"], registry=r
        )
        self.messages_delivered = Counter(
            "stompgate_messages_delivered_total", "MESSAGE frames sent", ["destination"], registry=r
        )
        self.redeliveries = Counter("stompgate_redeliveries_total", "Messages requeued for redelivery", registry=r)
        self.dead_letters = Counter("stompgate_dead_letters_total", "Messages moved to a dead-letter queue", registry=r)
        self.errors = Counter("stompgate_errors_total", "ERROR frames and failures by kind", ["kind"], registry=r)
        self.background_failing = Gauge(
            "stompgate_background_failing", "1 while a background loop keeps failing (see /ready)", ["loop"], registry=r
        )

        # Label children cached by value: ``labels()`` costs a lock and a dict build, and these run per message.
        self._children: dict[tuple[int, str], Any] = {}
        # Destinations with series of their own (never more than max_destinations), and the slot all others share:
        # per message, one dict lookup and no growth past the cap.
        self._slots: dict[str, _Slot] = {}
        self._other = _Slot(OTHER, 0.0)

    def _child(self, metric: Counter, value: str) -> Any:
        key = (id(metric), value)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(value)
        return child

    def bytes_out(self, transport: str, count: int) -> None:
        self._child(self.bytes_sent, transport).inc(count)

    def bytes_in(self, transport: str, count: int) -> None:
        self._child(self.bytes_received, transport).inc(count)

    def _slot(self, destination: str, now: float) -> _Slot:
        slot = self._slots.get(destination)
        if slot is None:
            if len(self._slots) >= self.max_destinations:
                return self._other
            slot = self._slots[destination] = _Slot(destination, now)
        slot.last_used = now
        return slot

    def published(self, kind: str, destinations: list[str]) -> None:
        """Count a group of stored messages: one increment per destination in the group (each takes a lock), not
        one per message. Destinations get their slots in the order first seen, as one message at a time would."""
        self._child(self.messages_published, kind).inc(len(destinations))
        counts: dict[str, int] = {}
        for destination in destinations:
            counts[destination] = counts.get(destination, 0) + 1
        now = self.clock()
        for destination, count in counts.items():
            slot = self._slot(destination, now)
            if slot.published is None:
                slot.published = self.destination_published.labels(slot.label)
            slot.published.inc(count)

    def delivered(self, destination: str, count: int) -> None:
        if count:
            slot = self._slot(destination, self.clock())
            if slot.delivered is None:
                slot.delivered = self.messages_delivered.labels(slot.label)
            slot.delivered.inc(count)

    # ---- destination slots ----

    def slots_full(self) -> bool:
        """True when every destination slot is taken (new destinations are counted under OTHER)."""
        return len(self._slots) >= self.max_destinations

    def tracks(self, destination: str) -> bool:
        """Whether ``destination`` has series of its own (else its traffic is under OTHER)."""
        return destination in self._slots

    def idle_destinations(self, idle_for: float) -> list[str]:
        """Destinations with series of their own and no publish or delivery for ``idle_for`` seconds."""
        cutoff = self.clock() - idle_for
        return [destination for destination, slot in self._slots.items() if slot.last_used <= cutoff]

    def forget(self, destination: str, *, idle_for: float | None = None) -> bool:
        """Remove a destination's series and free its slot; with ``idle_for``, only if it is still idle that long (it
        may have had traffic since it was found idle). True when it was forgotten. Should it come back, its series
        start again from zero, which Prometheus reads as a counter reset."""
        slot = self._slots.get(destination)
        if slot is None or (idle_for is not None and self.clock() - slot.last_used < idle_for):
            return False
        del self._slots[destination]
        if slot.published is not None:
            self.destination_published.remove(destination)
        if slot.delivered is not None:
            self.messages_delivered.remove(destination)
        return True

    def gauge_labels(self, destinations: Iterable[str]) -> dict[str, str]:
        """The label of each destination in a per-destination gauge computed at scrape time (queue depth), bounded
        like the counters: a destination they track keeps its name, so do others while fewer than max_destinations
        are named, and the rest get OTHER (the caller sums their values)."""
        names = list(dict.fromkeys(destinations))
        room = self.max_destinations - sum(1 for name in names if name in self._slots)
        labels: dict[str, str] = {}
        for name in names:
            if name in self._slots:
                labels[name] = name
            elif room > 0:
                labels[name] = name
                room -= 1
            else:
                labels[name] = OTHER
        return labels

    def redelivered(self, count: int) -> None:
        self.redeliveries.inc(count)

    def dead_lettered(self, count: int) -> None:
        self.dead_letters.inc(count)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()
