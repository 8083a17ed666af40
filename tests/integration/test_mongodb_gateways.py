"""Scale-out on MongoDB: several stateless gateways on one database (FerretDB here, MONGODB_URL elsewhere)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.gateway_process import start_gateway
from tests.raw_stomp import RawClient

pytestmark = [pytest.mark.mongodb, pytest.mark.slow, pytest.mark.timeout(400)]


def database_url(mongodb_url: str) -> str:
    base, _, query = mongodb_url.partition("?")
    return f"{base.rstrip('/')}/sg{uuid.uuid4().hex[:10]}" + (f"?{query}" if query else "")


def consume(port: int, destination: str, received: list[str], stop: threading.Event) -> None:
    client = RawClient(port)
    try:
        client.connect()
        client.frame("SUBSCRIBE", {"id": "s", "destination": destination, "ack": "client-individual", "prefetch-count": "50"})
        while not stop.is_set():
            try:
                frame = client.read(timeout=0.5)
            except EOFError:
                continue
            if frame.command == "MESSAGE":
                received.append(frame.body.decode())
                client.frame("ACK", {"id": frame.headers["ack"]})
            elif frame.command == "ERROR":  # the test fails on it below, naming the gateway's reason
                received.append(f"ERROR {frame.headers.get('message')}: {frame.body.decode(errors='replace')}")
                return
    finally:
        client.close()


def test_two_gateways_four_consumers_each_message_exactly_once(tmp_path: Path, mongodb_url: str) -> None:
    store = database_url(mongodb_url)
    gateways = [start_gateway(tmp_path, store, ["--poll-interval", "0.1"]) for _ in range(2)]
    try:
        destination = "/queue/scale"
        received: list[str] = []
        stop = threading.Event()
        consumers = [
            threading.Thread(target=consume, args=(gw.stomp_port, destination, received, stop), daemon=True)
            for gw in gateways
            for _ in range(2)
        ]
        for thread in consumers:
            thread.start()
        total = 5000
        producers = []
        for index, gw in enumerate(gateways):
            producer = RawClient(gw.stomp_port)
            producer.connect()
            half = range(index * total // 2, (index + 1) * total // 2)
            producer.send(b"".join(f"SEND\ndestination:{destination}\n\nm{i}\x00".encode() for i in half))
            producer.frame("SEND", {"destination": "/queue/scale-done", "receipt": "last"}, b"x")
            producers.append(producer)
        for producer in producers:
            while producer.read(timeout=60).command != "RECEIPT":
                pass
        deadline = time.monotonic() + 120
        while len(received) < total and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # anything delivered twice would show up now
        stop.set()
        for thread in consumers:
            thread.join(timeout=10)
        for producer in producers:
            producer.close()
        counts = Counter(received)
        if any(n > 1 for n in counts.values()) or len(counts) < total:
            print("\n".join(gw.log()[-3000:] for gw in gateways))
        errors = [body for body in counts if body.startswith("ERROR")]
        assert not errors, errors
        duplicates = {body: n for body, n in counts.items() if n > 1}
        missing = {f"m{i}" for i in range(total)} - set(counts)
        assert not duplicates, f"{len(duplicates)} messages delivered more than once, e.g. {list(duplicates)[:5]}"
        assert not missing, f"{len(missing)} messages never delivered, e.g. {sorted(missing)[:5]}"
    finally:
        for gw in gateways:
            gw.stop()


def test_topic_reaches_subscribers_on_every_gateway(tmp_path: Path, mongodb_url: str) -> None:
    store = database_url(mongodb_url)
    gateways = [start_gateway(tmp_path, store) for _ in range(2)]
    clients: list[RawClient] = []
    try:
        for gw in gateways:
            sub = RawClient(gw.stomp_port)
            clients.append(sub)
            sub.connect()
            sub.frame("SUBSCRIBE", {"id": "t", "destination": "/topic/news", "receipt": "sub"})
            assert sub.read().command == "RECEIPT"
        time.sleep(0.5)  # each gateway's tailing cursor is open
        producer = RawClient(gateways[0].stomp_port)
        clients.append(producer)
        producer.connect()
        for i in range(20):
            producer.frame("SEND", {"destination": "/topic/news"}, f"n{i}".encode())
        for sub in clients[:2]:
            bodies = [sub.read(timeout=15).body.decode() for _ in range(20)]
            assert bodies == [f"n{i}" for i in range(20)]
    finally:
        for client in clients:
            client.close()
        for gw in gateways:
            gw.stop()
