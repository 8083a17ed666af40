"""A RECEIPT means durably stored: SEND with receipts, kill -9 the gateway mid-stream, restart, drain, compare."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tests.gateway_process import start_gateway
from tests.raw_stomp import RawClient


def drain(port: int, destination: str) -> set[str]:
    """Consume until the queue stays quiet; return the sequence numbers of the bodies ("msg-N") received."""
    consumer = RawClient(port)
    consumer.connect()
    consumer.frame("SUBSCRIBE", {"id": "s", "destination": destination, "prefetch-count": "1000"})
    received: set[str] = set()
    try:
        while True:
            frame = consumer.read(timeout=3)
            if frame.command == "MESSAGE":
                received.add(frame.body.decode().removeprefix("msg-"))
    except EOFError:
        pass
    finally:
        consumer.close()
    return received


def test_no_receipted_message_is_lost_on_sigkill(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/crash.db"
    gw = start_gateway(tmp_path, store)
    producer = RawClient(gw.stomp_port)
    producer.connect()
    receipted: list[str] = []
    stop = threading.Event()

    def read_receipts() -> None:
        try:
            while not stop.is_set():
                frame = producer.read(timeout=10)
                if frame.command == "RECEIPT":
                    receipted.append(frame.headers["receipt-id"])
        except (EOFError, OSError):
            pass

    reader = threading.Thread(target=read_receipts, daemon=True)
    reader.start()
    sent = 0
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            batch = b"".join(
                f"SEND\ndestination:/queue/crash\nreceipt:{i}\n\nmsg-{i}\x00".encode() for i in range(sent, sent + 200)
            )
            producer.send(batch)
            sent += 200
            if len(receipted) > 3000:
                break
            time.sleep(0.002)
    except OSError:
        pass
    gw.kill()  # SIGKILL while SENDs are in flight
    stop.set()
    reader.join(timeout=5)
    assert len(receipted) > 1000, "the test must kill the gateway after many receipts"

    again = start_gateway(tmp_path, store)
    try:
        received = drain(again.stomp_port, "/queue/crash")
        missing = set(receipted) - received
        assert not missing, f"{len(missing)} receipted messages lost, e.g. {sorted(missing, key=int)[:5]}"
        assert len(received) <= sent
    finally:
        producer.close()
        again.stop()


def test_sigterm_finishes_receipts_in_flight_and_tells_clients(tmp_path: Path) -> None:
    """Graceful shutdown: stop reading, finish the RECEIPTs of what was sent, then an ERROR, then close."""
    store = f"sqlite:///{tmp_path}/graceful.db"
    gw = start_gateway(tmp_path, store)
    producer = RawClient(gw.stomp_port)
    producer.connect()
    producer.send(b"".join(f"SEND\ndestination:/queue/graceful\nreceipt:{i}\n\nmsg-{i}\x00".encode() for i in range(2000)))
    gw.stop()  # SIGTERM right behind the burst
    receipted: set[str] = set()
    error = None
    try:
        while error is None:
            frame = producer.read(timeout=10)
            if frame.command == "RECEIPT":
                receipted.add(frame.headers["receipt-id"])
            elif frame.command == "ERROR":
                error = frame
    except (EOFError, OSError):
        pass
    producer.close()
    assert error is not None and error.headers["message"] == "Server shutting down"
    assert receipted, "the SENDs already read should have been finished and receipted"
    again = start_gateway(tmp_path, store)
    try:
        assert receipted <= drain(again.stomp_port, "/queue/graceful")
    finally:
        again.stop()
