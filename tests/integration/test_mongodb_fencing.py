"""Fenced leases across gateways: a gateway that stalls past its lease and then ACKs late must not delete the
message another gateway has redelivered meanwhile (FerretDB here, MONGODB_URL elsewhere)."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import pytest

from tests.gateway_process import Gateway, start_gateway
from tests.raw_stomp import RawClient

pytestmark = [pytest.mark.mongodb, pytest.mark.timeout(180)]


def test_a_stalled_gateways_late_ack_deletes_nothing_the_other_gateway_redelivered(
    mongodb_url: str, tmp_path: Path
) -> None:
    base, _, query = mongodb_url.partition("?")
    store = f"{base.rstrip('/')}/fence{uuid.uuid4().hex[:10]}" + (f"?{query}" if query else "")
    gateways: list[Gateway] = []
    clients: list[RawClient] = []

    def client(gateway: Gateway) -> RawClient:
        c = RawClient(gateway.stomp_port, timeout=30)
        clients.append(c)
        c.connect()
        return c

    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            gateways.append(start_gateway(tmp_path / name, store, extra=["--lease-ms", "1000"]))
        a, b = gateways
        producer = client(a)
        producer.frame("SEND", {"destination": "/queue/fence", "receipt": "sent"}, b"the message")
        assert producer.read().headers["receipt-id"] == "sent"
        slow = client(a)
        slow.frame("SUBSCRIBE", {"id": "1", "destination": "/queue/fence", "ack": "client-individual"})
        first = slow.read()
        assert first.body == b"the message"

        a.process.send_signal(signal.SIGSTOP)  # a stalls: it no longer renews its lease
        try:
            other = client(b)
            other.frame("SUBSCRIBE", {"id": "1", "destination": "/queue/fence", "ack": "client-individual"})
            again = other.read(timeout=30)  # the lease lapsed: b redelivers it
            assert again.body == b"the message" and again.headers.get("redelivered") == "true"
        finally:
            a.process.send_signal(signal.SIGCONT)

        slow.frame("ACK", {"id": first.headers["ack"], "receipt": "late"})  # a's consumer acks, too late
        assert slow.read().headers["receipt-id"] == "late"
        other.close()  # b's consumer goes away without an ACK: b gives the message back
        last = client(b)
        last.frame("SUBSCRIBE", {"id": "1", "destination": "/queue/fence", "ack": "client-individual"})
        still = last.read(timeout=30)  # a's late ACK deleted nothing
        assert still.body == b"the message"
        last.frame("ACK", {"id": still.headers["ack"], "receipt": "done"})
        assert last.read().headers["receipt-id"] == "done"
    finally:
        for c in clients:
            c.close()
        for gateway in gateways:
            gateway.process.send_signal(signal.SIGCONT)
            gateway.stop()
