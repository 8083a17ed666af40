"""A new durable topic subscription starts where its SUBSCRIBE's RECEIPT says: whatever is published after the
RECEIPT reaches it (before, the RECEIPT went out while the starting position was still being read, and a message
published in between was skipped)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from tests.raw_stomp import RawClient

Raw = Callable[[], RawClient]


def test_every_message_sent_after_a_durable_subscribe_receipt_is_delivered(raw: Raw) -> None:
    topic = f"/topic/start-{uuid.uuid4().hex[:8]}"
    consumer, producer = raw(), raw()
    consumer.connect(**{"client-id": f"c-{uuid.uuid4().hex[:8]}"})
    producer.connect()
    for i in range(100):
        consumer.frame(
            "SUBSCRIBE", {"id": f"d{i}", "destination": topic, "durable": "true", "ack": "auto", "receipt": f"s{i}"}
        )
        answer = consumer.read()
        assert answer.command == "RECEIPT" and answer.headers["receipt-id"] == f"s{i}", answer
        producer.frame("SEND", {"destination": topic, "receipt": f"p{i}"}, f"m{i}".encode())
        assert producer.read().headers["receipt-id"] == f"p{i}"
        # every durable subscription made so far gets it: this one too, however soon after its RECEIPT it was sent
        got = sorted(consumer.read().headers["subscription"] for _ in range(i + 1))
        assert got == sorted(f"d{n}" for n in range(i + 1)), (i, got)
