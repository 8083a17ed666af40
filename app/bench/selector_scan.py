"""``python -m app.bench.selector_scan PORT [DEPTH] [SECONDS]``: the cost of selectors that match nothing, to others.

Fills ``/queue/bench.deep`` with DEPTH messages (``color:blue``), subscribes four consumers with the selector
``color = 'red'`` (which matches none of them), then for SECONDS keeps waking those consumers with one more put
and measures the SEND-to-RECEIPT time of a single producer on an unrelated queue. Before selector scans were bounded
per claim, every wake-up rescanned the deep backlog inside the database writer, and the unrelated RECEIPTs waited.
"""

from __future__ import annotations

import socket
import statistics
import sys
import time

__all__ = ["main"]


class _Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buffer = b""
        self.send(b"CONNECT\naccept-version:1.2\nhost:/\n\n\x00")
        self.expect(b"CONNECTED")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def expect(self, command: bytes) -> None:
        """Read up to the next frame's NUL (the bench's frames carry no body NULs) and check its command."""
        while b"\x00" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the gateway closed the connection")
            self.buffer += chunk
        frame, _, self.buffer = self.buffer.partition(b"\x00")
        got = frame.lstrip(b"\r\n").split(b"\n", 1)[0]
        if got != command:
            raise RuntimeError(f"expected {command!r}, got {frame[:200]!r}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    port = int(args[0])
    depth = int(args[1]) if len(args) > 1 else 100_000
    seconds = float(args[2]) if len(args) > 2 else 10.0
    producer = _Client(port)
    frame = b"SEND\ndestination:/queue/bench.deep\ncolor:blue\n\nx\x00"
    for _ in range(depth // 1000):
        producer.send(frame * 999 + b"SEND\ndestination:/queue/bench.deep\ncolor:blue\nreceipt:r\n\nx\x00")
        producer.expect(b"RECEIPT")
    consumers = []
    for _ in range(4):
        consumer = _Client(port)
        consumer.send(b"SUBSCRIBE\nid:1\ndestination:/queue/bench.deep\nselector:color = 'red'\nreceipt:s\n\n\x00")
        consumer.expect(b"RECEIPT")
        consumers.append(consumer)
    other = _Client(port)
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        producer.send(frame)  # wakes the four selector subscriptions
        started = time.perf_counter()
        other.send(b"SEND\ndestination:/queue/bench.other\nreceipt:o\n\ny\x00")
        other.expect(b"RECEIPT")
        latencies.append((time.perf_counter() - started) * 1000)
        time.sleep(0.01)  # a paced producer, not a saturating one
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"depth {depth}, 4 non-matching selector subscriptions: {len(latencies)} unrelated SENDs, "
        f"RECEIPT p50 {statistics.median(latencies):.2f} ms, p99 {p99:.2f} ms, max {latencies[-1]:.2f} ms"
    )
    for client in (producer, other, *consumers):
        client.sock.close()


if __name__ == "__main__":
    main()
