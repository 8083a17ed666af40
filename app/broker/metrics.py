"""Prometheus counters the broker keeps, in a registry of its own (no process-wide globals)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["BrokerMetrics"]


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
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

        # Label children cached by value: ``labels()`` costs a lock and a dict build, and these run per message.
        self._children: dict[tuple[int, str], Any] = {}

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

    def published(self, kind: str, destinations: list[str]) -> None:
        self._child(self.messages_published, kind).inc(len(destinations))
        for destination in destinations:
            self._child(self.destination_published, destination).inc()

    def delivered(self, destination: str, count: int) -> None:
        if count:
            self._child(self.messages_delivered, destination).inc(count)

    def redelivered(self, count: int) -> None:
        self.redeliveries.inc(count)

    def dead_lettered(self, count: int) -> None:
        self.dead_letters.inc(count)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()
