"""One selector, one meaning: on MongoDB a selector document gives the same answer as on every other store."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.gateway_process import start_gateway
from tests.raw_stomp import RawClient

pytestmark = [pytest.mark.mongodb]


def test_numeric_and_negated_selector_documents_match_on_mongodb_as_everywhere(
    mongodb_url: str, tmp_path: Path
) -> None:
    """Headers are stored as strings, so MongoDB evaluating {"amount": {"$gt": 10}} itself matched nothing, and
    {"region": {"$ne": "eu"}} missed messages without a region; the gateway now evaluates those itself."""
    base, _, query = mongodb_url.partition("?")
    store = f"{base.rstrip('/')}/sel{uuid.uuid4().hex[:10]}" + (f"?{query}" if query else "")
    gateway = start_gateway(tmp_path, store)
    clients: list[RawClient] = []
    try:
        producer = RawClient(gateway.stomp_port)
        clients.append(producer)
        producer.connect()
        sends = [("5", {"amount": "5"}), ("20", {"amount": "20"}), ("eu", {"region": "eu"}), ("none", {})]
        for body, headers in sends:
            producer.frame("SEND", {"destination": "/queue/sel", "receipt": body, **headers}, body.encode())
            assert producer.read().headers["receipt-id"] == body
        cases = (('{"amount": {"$gt": 10}}', {b"20"}), ('{"region": {"$ne": "eu"}}', {b"5", b"20", b"none"}))
        for selector, expected in cases:
            consumer = RawClient(gateway.stomp_port)
            clients.append(consumer)
            consumer.connect()
            consumer.frame("SUBSCRIBE", {"id": "1", "destination": "/queue/sel", "ack": "client-individual",
                                         "selector": selector})  # fmt: skip
            got = set()
            for _ in expected:
                frame = consumer.read(timeout=10)
                got.add(frame.body)
            assert got == expected, selector
            consumer.close()  # unacked: back to the queue for the next selector
    finally:
        for client in clients:
            client.close()
        gateway.stop()
