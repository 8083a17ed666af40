"""A connection's writes reach the database in the order sent, even a SEND read in the very loop turn in which the
COMMIT before it is stored (the moment a "is the COMMIT done?" check would let it overtake the SENDs queued behind
that COMMIT). The turn is hit deterministically by reading the SEND from a done-callback of the COMMIT's future."""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.broker.broker import Broker
from app.datasources.interface import Changes, DatasourceOptions
from app.datasources.registry import open_datasource


def frame(command: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    return ("\n".join([command] + [f"{k}:{v}" for k, v in headers.items()]) + "\n\n").encode() + body + b"\x00"


class Transport:
    def __init__(self) -> None:
        self.out = b""
        self.receipted = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.out += data
        if b"receipt-id:end" in self.out:
            self.receipted.set()

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def write_backlog(self) -> int:
        return 0

    async def drained(self) -> None: ...


async def test_a_send_read_as_a_commit_is_stored_does_not_overtake_the_sends_before_it(tmp_path: Path) -> None:
    ds = await open_datasource(f"sqlite:///{tmp_path}/order.db", DatasourceOptions())
    broker = Broker(ds)
    await broker.start()
    try:
        transport = Transport()
        session = broker.open_session(transport, peer="127.0.0.1:1", kind="tcp")
        assert session is not None
        session.receive(frame("CONNECT", {"accept-version": "1.2", "host": "/"}))
        q = "/queue/order"
        loop = asyncio.get_running_loop()
        late_read = asyncio.Event()
        commit = broker.commit_nowait

        def commit_then_read_b(changes: Changes) -> asyncio.Future[None]:
            stored = commit(changes)

            def read_b(_: object) -> None:
                session.receive(frame("SEND", {"destination": q}, b"B"))
                late_read.set()

            stored.add_done_callback(lambda _: loop.call_soon(read_b, None))  # the turn the COMMIT completes in
            return stored

        broker.commit_nowait = commit_then_read_b  # type: ignore[method-assign]
        session.receive(
            frame("BEGIN", {"transaction": "t"})
            + frame("SEND", {"destination": q, "transaction": "t"}, b"TX")
            + frame("COMMIT", {"transaction": "t"})
            + frame("SEND", {"destination": q}, b"A")  # waits for the COMMIT
        )
        await asyncio.wait_for(late_read.wait(), 10)
        session.receive(frame("SEND", {"destination": q, "receipt": "end"}, b"end"))
        await asyncio.wait_for(transport.receipted.wait(), 10)
        stored = [m.body for m in await ds.queues.peek(q, limit=10, now_ms=broker.now_ms())]
        assert stored == [b"TX", b"A", b"B", b"end"]
    finally:
        await broker.stop()
        await ds.close()
