"""The flow every "the database crashes under load" test shares, whatever the database: receipted SENDs through a
crash and restart, then every receipted message consumed and acknowledged with a RECEIPT per ACK."""

from __future__ import annotations

from collections.abc import Callable

from tests.gateway_process import Gateway
from tests.raw_stomp import RawClient

__all__ = ["send_through_a_crash", "consume_every_message"]

DESTINATION = "/queue/crash"


def send_through_a_crash(gateway: Gateway, crash_and_restart: Callable[[], None], total: int, window: int) -> list[str]:
    """Send ``total`` messages, ``window`` at a time each with a RECEIPT, calling ``crash_and_restart`` with a window
    in flight after a quarter of them; answer the bodies of the receipted ones (all of them, or the test fails)."""
    producer = RawClient(gateway.stomp_port)
    producer.connect()
    receipted: list[str] = []
    crashed = False
    for start in range(0, total, window):
        batch = range(start, start + window)
        producer.send(b"".join(f"SEND\ndestination:{DESTINATION}\nreceipt:r{i}\n\nm{i}\x00".encode() for i in batch))
        if start == total // 4:  # some receipted, a window in flight: crash the database, then bring it back
            crash_and_restart()
            crashed = True
        for _ in batch:
            frame = producer.read(timeout=120)
            assert frame.command == "RECEIPT", (frame.command, frame.headers, frame.body[:300])
            receipted.append("m" + frame.headers["receipt-id"][1:])
    assert crashed and len(receipted) == total
    producer.close()
    return receipted


def consume_every_message(gateway: Gateway, total: int) -> list[str]:
    """Consume until ``total`` distinct messages came and every ACK's RECEIPT did (each ACK durably applied); answer
    the bodies delivered, in order."""
    consumer = RawClient(gateway.stomp_port)
    consumer.connect()
    consumer.frame("SUBSCRIBE", {"id": "s", "destination": DESTINATION, "ack": "client-individual"})
    delivered: list[str] = []
    acks = receipts = 0
    while len(set(delivered)) < total or receipts < acks:
        frame = consumer.read(timeout=60)
        if frame.command == "RECEIPT":
            receipts += 1
            continue
        assert frame.command == "MESSAGE", (frame.command, frame.headers, frame.body[:300])
        delivered.append(frame.body.decode())
        consumer.frame("ACK", {"id": frame.headers["ack"], "receipt": f"a{acks}"})
        acks += 1
    consumer.close()
    return delivered
