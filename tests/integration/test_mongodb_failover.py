"""Failover at the gateway: the database process dies mid-stream and comes back. Every message that got a RECEIPT
arrives, and nothing is delivered again after its ACK."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.gateway_process import start_gateway
from tests.mongodb_server import FerretDBServer, require_ferretdb
from tests.raw_stomp import RawClient

pytestmark = [pytest.mark.mongodb, pytest.mark.slow]


def test_receipted_sends_survive_a_database_restart(tmp_path: Path) -> None:
    server = FerretDBServer(require_ferretdb())
    server.start()
    gateway = None
    try:
        store = server.url.rstrip("/") + "/failover"
        gateway = start_gateway(
            tmp_path, store, ["--server-selection-timeout-ms", "1000", "--failover-buffer", "5000", "--poll-interval", "0.1"]
        )
        producer = RawClient(gateway.stomp_port, timeout=30)
        producer.connect()
        receipted: list[str] = []
        errors: list[str] = []
        done = threading.Event()

        def read_receipts() -> None:
            while not done.is_set():
                try:
                    frame = producer.read(timeout=1)
                except EOFError:
                    continue
                if frame.command == "RECEIPT":
                    receipted.append(frame.headers["receipt-id"])
                elif frame.command == "ERROR":
                    errors.append(frame.headers.get("message", ""))
                    return

        reader = threading.Thread(target=read_receipts, daemon=True)
        reader.start()
        total = 600
        for i in range(total):
            producer.frame("SEND", {"destination": "/queue/fo", "receipt": str(i)}, f"m{i}".encode())
            if i == 200:
                deadline = time.monotonic() + 20
                while len(receipted) < 100 and time.monotonic() < deadline:
                    time.sleep(0.05)
                server.kill()  # the database dies with SENDs in flight
            if i == 300:
                time.sleep(1.5)  # SENDs wait in the failover buffer meanwhile
                server.start()  # same port, same data
            time.sleep(0.002)
        deadline = time.monotonic() + 60
        while len(receipted) < total and time.monotonic() < deadline and not errors:
            time.sleep(0.1)
        done.set()
        reader.join(timeout=5)
        assert not errors, errors
        assert len(receipted) == total, f"only {len(receipted)} of {total} SENDs got a RECEIPT"

        consumer = RawClient(gateway.stomp_port, timeout=30)
        consumer.connect()
        consumer.frame("SUBSCRIBE", {"id": "s", "destination": "/queue/fo", "ack": "client-individual"})
        delivered: Counter[str] = Counter()
        acked: set[str] = set()
        redelivered_after_ack: list[str] = []
        idle_deadline = time.monotonic() + 30
        while time.monotonic() < idle_deadline:
            try:
                frame = consumer.read(timeout=3)
            except EOFError:
                break
            if frame.command != "MESSAGE":
                continue
            body = frame.body.decode()
            if body in acked:
                redelivered_after_ack.append(body)
            delivered[body] += 1
            consumer.frame("ACK", {"id": frame.headers["ack"]})
            acked.add(body)
        missing = {f"m{i}" for i in map(int, receipted)} - set(delivered)
        assert not missing, f"{len(missing)} receipted messages never arrived, e.g. {sorted(missing)[:5]}"
        assert not redelivered_after_ack, f"delivered again after ACK: {redelivered_after_ack[:5]}"
        producer.close()
        consumer.close()
    finally:
        if gateway is not None:
            gateway.stop()
        server.cleanup()
