"""Two gateways on one shared database, whatever the database: producers on one, four consumers over both, each
message delivered exactly once (or at least once when a gateway is killed mid-run); topics reach every subscriber of
both gateways in order."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from tests.gateway_process import Gateway
from tests.raw_stomp import RawClient

__all__ = ["TOTAL", "DESTINATION", "LEASE_MS", "Consumer", "produce", "run_queue", "check_topic_on_both_gateways"]

TOTAL = 20_000
DESTINATION = "/queue/scale"
LEASE_MS = 2_000


class Consumer(threading.Thread):
    """A client-individual subscriber that ACKs each message; ``finish()`` ends it with a DISCONNECT receipt, so every
    MESSAGE the gateway sent before is counted."""

    def __init__(self, gateway: Gateway, destination: str, received: list[str]) -> None:
        super().__init__(daemon=True)
        self.gateway = gateway
        self.client = RawClient(gateway.stomp_port)
        self.client.connect()
        self.client.frame("SUBSCRIBE", {"id": "s", "destination": destination, "ack": "client-individual",
                                        "prefetch-count": "50", "receipt": "sub"})  # fmt: skip
        assert self.client.read(timeout=10).command == "RECEIPT"
        self.received = received
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.dead = False  # its gateway was killed: the socket is gone

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    frame = self.client.read(timeout=0.5)
                except EOFError:
                    continue
                self._take(frame)
        except OSError:
            self.dead = True

    def _take(self, frame: object) -> None:
        command, headers, body = frame.command, frame.headers, frame.body  # type: ignore[attr-defined]
        if command == "MESSAGE":
            self.received.append(body.decode())
            self.client.frame("ACK", {"id": headers["ack"]})
        elif command == "ERROR":
            self.errors.append(f"{headers.get('message')}: {body.decode(errors='replace')}")

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=10)
        if not self.dead:
            self.client.frame("DISCONNECT", {"receipt": "bye"})
            while (frame := self.client.read(timeout=10)).command != "RECEIPT":
                self._take(frame)
        self.client.close()


def produce(gateway: Gateway, destination: str, numbers: range) -> RawClient:
    producer = RawClient(gateway.stomp_port)
    producer.connect()
    producer.send(b"".join(f"SEND\ndestination:{destination}\n\nm{i}\x00".encode() for i in numbers))
    producer.frame("SEND", {"destination": destination + ".done", "receipt": "last"}, b"x")  # receipts come in order
    return producer


def run_queue(gateways: list[Gateway], stored: Callable[[], int], kill_second_at: int | None) -> Counter[str]:
    """Producers on the first gateway, two consumers on each; with ``kill_second_at``, the second gateway is killed
    once that many messages were received. ``stored`` counts the messages still in the database."""
    destination = DESTINATION
    received: list[str] = []
    consumers = [Consumer(gw, destination, received) for gw in gateways for _ in range(2)]
    for consumer in consumers:
        consumer.start()
    # producers on the first gateway only: the second sees the work through the database
    producers = [produce(gateways[0], destination, range(half, TOTAL, 2)) for half in (0, 1)]
    for producer in producers:
        while producer.read(timeout=120).command != "RECEIPT":
            pass
        producer.close()
    if kill_second_at is not None:
        deadline = time.monotonic() + 120
        while len(received) < kill_second_at and time.monotonic() < deadline:
            time.sleep(0.01)
        gateways[1].kill()
        for consumer in consumers:
            consumer.dead = consumer.dead or consumer.gateway is gateways[1]
    # Done when every message is acknowledged (deleted): then none can be delivered again.
    deadline = time.monotonic() + 180
    while stored() and time.monotonic() < deadline:
        time.sleep(0.1)
    for consumer in consumers:
        consumer.finish()
    errors = [e for c in consumers for e in c.errors]
    assert not errors, errors
    assert stored() == 0, "messages left unacknowledged"
    counts = Counter(received)
    missing = {f"m{i}" for i in range(TOTAL)} - set(counts)
    assert not missing, f"{len(missing)} messages never delivered, e.g. {sorted(missing)[:5]}"
    return counts


def check_topic_on_both_gateways(gateways: list[Gateway]) -> None:
    subscribers = []
    try:
        for gw in gateways:
            for n in range(2):
                sub = RawClient(gw.stomp_port)
                subscribers.append(sub)
                sub.connect()
                sub.frame("SUBSCRIBE", {"id": f"t{n}", "destination": "/topic/news", "receipt": "sub"})
                assert sub.read(timeout=10).command == "RECEIPT"
        producer = RawClient(gateways[0].stomp_port)
        subscribers.append(producer)
        producer.connect()
        producer.send(b"".join(f"SEND\ndestination:/topic/news\n\nn{i}\x00".encode() for i in range(500)))
        for sub in subscribers[:4]:
            bodies = [sub.read(timeout=30).body.decode() for _ in range(500)]
            assert bodies == [f"n{i}" for i in range(500)]
    finally:
        for client in subscribers:
            client.close()
