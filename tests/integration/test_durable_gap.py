"""A durable topic subscription that was away longer than the retained window says plainly what it missed."""

from __future__ import annotations

from pathlib import Path

from tests.gateway_process import run_gateway
from tests.raw_stomp import RawClient


def test_gap_is_reported_on_the_first_message_after_it(tmp_path: Path) -> None:
    with run_gateway(tmp_path, extra=["--topic-retention", "10"]) as gw:
        sub = RawClient(gw.stomp_port)
        sub.connect(**{"client-id": "gappy"})
        sub.frame("SUBSCRIBE", {"id": "d", "destination": "/topic/gap", "durable": "true", "receipt": "s"})
        assert sub.read().command == "RECEIPT"
        sub.frame("DISCONNECT", {"receipt": "bye"})
        assert sub.read().command == "RECEIPT"
        sub.close()
        producer = RawClient(gw.stomp_port)
        producer.connect()
        for i in range(40):
            producer.frame("SEND", {"destination": "/topic/gap", "receipt": str(i)}, f"n{i}".encode())
        for _ in range(40):
            assert producer.read().command == "RECEIPT"
        producer.close()
        again = RawClient(gw.stomp_port)
        again.connect(**{"client-id": "gappy"})
        again.frame("SUBSCRIBE", {"id": "d", "destination": "/topic/gap", "durable": "true"})
        first = again.read()
        assert first.command == "MESSAGE"
        assert "x-missed-from" in first.headers and "x-missed-to" in first.headers
        missed = int(first.headers["x-missed-to"]) - int(first.headers["x-missed-from"]) + 1
        received = [first.body.decode()] + [again.read().body.decode() for _ in range(39 - missed)]
        assert received == [f"n{i}" for i in range(missed, 40)]  # the rest arrives, in order, after the gap
        again.close()
