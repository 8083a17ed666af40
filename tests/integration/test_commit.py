"""A STOMP COMMIT is all or nothing: its queue SENDs, topic SENDs and ACKs are stored together or not at all.

The fault is real: a trigger in the gateway's own SQLite database refuses one topic message, so the database fails
the COMMIT in its middle (after the queue insert, before the ACK's delete), and what the test checks is what any
client can see afterwards.
"""

from __future__ import annotations

import socket
import sqlite3
import time
import uuid
from pathlib import Path

import httpx

from tests.gateway_process import Gateway, run_gateway
from tests.integration.test_hardening import read_until_error
from tests.raw_stomp import RawClient


def refuse_topic_messages_to(db: Path, destination: str) -> None:
    """The injected fault: a trigger in the gateway's own database refuses every topic message to ``destination``
    (the gateway made its tables at start-up; it sees the trigger at once)."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON stompgate_topic_log "
            f"WHEN NEW.destination = '{destination}' BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
        )


def depth(gateway: Gateway, queue: str) -> int:
    reply = httpx.get(f"{gateway.http_url}/destinations/queue/{queue.removeprefix('/queue/')}")
    assert reply.status_code == 200, reply.text
    depth: int = reply.json()["depth"]
    return depth


def open_connections(gateway: Gateway) -> float:
    for line in httpx.get(f"{gateway.http_url}/metrics").text.splitlines():
        if line.startswith('stompgate_connections{transport="tcp"}'):
            return float(line.rpartition(" ")[2])
    return 0.0


def test_a_commit_that_fails_in_its_middle_leaves_nothing_of_it_visible(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    with run_gateway(tmp_path, f"sqlite:///{db}", ["--lease-ms", "60000"]) as gateway:
        poison = f"/topic/poison-{uuid.uuid4().hex[:6]}"
        refuse_topic_messages_to(db, poison)
        inbox, outbox, notes = (f"/queue/{n}-{uuid.uuid4().hex[:6]}" for n in ("in", "out", "notes"))
        c = RawClient(gateway.stomp_port)
        try:
            c.connect()
            c.frame("SEND", {"destination": inbox, "receipt": "r0"}, b"work")
            assert c.read().headers["receipt-id"] == "r0"
            c.frame("SUBSCRIBE", {"id": "s", "destination": inbox, "ack": "client-individual"})
            work = c.read()
            assert work.command == "MESSAGE" and work.body == b"work"
            c.frame("BEGIN", {"transaction": "t"})
            c.frame("SEND", {"destination": outbox, "transaction": "t"}, b"result")  # written first
            c.frame("SEND", {"destination": poison, "transaction": "t"}, b"refused")  # the database fails here
            c.frame("SEND", {"destination": notes, "transaction": "t"}, b"note")
            c.frame("ACK", {"id": work.headers["ack"], "transaction": "t"})  # would be written last
            c.frame("COMMIT", {"transaction": "t", "receipt": "commit"})
            frames = read_until_error(c)
            assert [f.command for f in frames] == ["ERROR"], frames
            assert frames[0].headers["message"] == "Not stored"
            assert frames[0].headers.get("receipt-id") == "commit"
        finally:
            c.close()
        # Nothing of the COMMIT happened: no SEND stored, and the ACKed message is back for the next consumer.
        assert depth(gateway, outbox) == 0
        assert depth(gateway, notes) == 0
        again = RawClient(gateway.stomp_port)
        try:
            again.connect()
            again.frame("SUBSCRIBE", {"id": "s", "destination": inbox, "ack": "client-individual"})
            redelivered = again.read(timeout=10)
            assert redelivered.body == b"work"
            assert redelivered.headers["redelivered"] == "true"
            # The same transaction without the poison commits whole.
            again.frame("BEGIN", {"transaction": "t2"})
            again.frame("SEND", {"destination": outbox, "transaction": "t2"}, b"result")
            again.frame("ACK", {"id": redelivered.headers["ack"], "transaction": "t2"})
            again.frame("COMMIT", {"transaction": "t2", "receipt": "commit2"})
            assert again.read().headers["receipt-id"] == "commit2"
        finally:
            again.close()
        assert depth(gateway, outbox) == 1
        assert depth(gateway, inbox) == 0


def test_a_failed_commit_does_not_move_a_durable_subscription(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    with run_gateway(tmp_path, f"sqlite:///{db}") as gateway:
        topic, poison = (f"/topic/{n}-{uuid.uuid4().hex[:6]}" for n in ("news", "poison"))
        refuse_topic_messages_to(db, poison)

        def subscribe() -> RawClient:
            """The durable subscription, once its previous connection has let go of it (the gateway releases it
            after that connection's close, which the client cannot observe: ask again until it is free)."""
            for _ in range(100):
                c = RawClient(gateway.stomp_port)
                c.connect(**{"client-id": "reader"})
                c.frame(
                    "SUBSCRIBE",
                    {"id": "d", "destination": topic, "ack": "client-individual", "durable": "true", "receipt": "sub"},
                )
                answer = c.read()
                if answer.command == "RECEIPT":
                    return c
                assert answer.headers["message"] == "Durable subscription in use", answer
                assert c.closed_by_peer()
                c.close()
            raise AssertionError("the durable subscription stayed in use")

        c = subscribe()
        try:
            c.frame("SEND", {"destination": topic, "receipt": "p"}, b"news")
            frames = [c.read(), c.read()]
            news = next(f for f in frames if f.command == "MESSAGE")
            c.frame("BEGIN", {"transaction": "t"})
            c.frame("ACK", {"id": news.headers["ack"], "transaction": "t"})
            c.frame("SEND", {"destination": poison, "transaction": "t"}, b"refused")
            c.frame("COMMIT", {"transaction": "t", "receipt": "commit"})
            assert read_until_error(c)[-1].headers["message"] == "Not stored"
        finally:
            c.close()
        again = subscribe()
        try:
            got = again.read(timeout=10)
            assert got.body == b"news", got  # its ACK was part of the failed COMMIT: it comes again
        finally:
            again.close()


def test_messages_whose_release_failed_are_given_back_once_the_database_recovers(tmp_path: Path) -> None:
    """A COMMIT fails, and so does giving its ACKed message back when the connection closes (one outage). The lease
    renewal, which renews every lease this gateway holds, must not keep that message held for nobody for good."""
    db = tmp_path / "gw.db"
    with run_gateway(tmp_path, f"sqlite:///{db}", ["--lease-ms", "1500"]) as gateway:
        poison = f"/topic/poison-{uuid.uuid4().hex[:6]}"
        inbox = f"/queue/in-{uuid.uuid4().hex[:6]}"
        refuse_topic_messages_to(db, poison)
        with sqlite3.connect(db) as conn:
            conn.execute(  # the give-back fails too, until the trigger is dropped below
                "CREATE TRIGGER refuse_requeue BEFORE UPDATE OF state ON stompgate_messages "
                f"WHEN NEW.state = 0 AND OLD.state = 1 AND OLD.destination = '{inbox}' "
                "BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
            )
        c = RawClient(gateway.stomp_port)
        try:
            c.connect()
            c.frame("SEND", {"destination": inbox, "receipt": "r0"}, b"work")
            assert c.read().headers["receipt-id"] == "r0"
            c.frame("SUBSCRIBE", {"id": "s", "destination": inbox, "ack": "client-individual"})
            work = c.read()
            c.frame("BEGIN", {"transaction": "t"})
            c.frame("ACK", {"id": work.headers["ack"], "transaction": "t"})
            c.frame("SEND", {"destination": poison, "transaction": "t"}, b"x")
            c.frame("COMMIT", {"transaction": "t", "receipt": "commit"})
            assert read_until_error(c)[-1].headers["message"] == "Not stored"
            assert c.closed_by_peer()
        finally:
            c.close()
        deadline = time.monotonic() + 10
        while open_connections(gateway) != 0:  # the session has ended: its give-back was tried (and failed)
            assert time.monotonic() < deadline, gateway.log()
            time.sleep(0.02)
        with sqlite3.connect(db) as conn:
            conn.execute("DROP TRIGGER refuse_requeue")  # the database is healthy again
        again = RawClient(gateway.stomp_port)
        try:
            again.connect()
            again.frame("SUBSCRIBE", {"id": "s", "destination": inbox, "ack": "client-individual"})
            assert again.read(timeout=10).body == b"work"
        finally:
            again.close()


def frame(command: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    return ("\n".join([command] + [f"{k}:{v}" for k, v in headers.items()]) + "\n\n").encode() + body + b"\x00"


def test_sends_around_commits_are_stored_in_the_order_they_were_sent(tmp_path: Path) -> None:
    """A SEND that arrives just as a COMMIT is stored must not overtake the SENDs sent before it (they wait for the
    COMMIT). The gap between the two writes of each round sweeps 0-1.5 ms to hit that moment."""
    with run_gateway(tmp_path, f"sqlite:///{tmp_path}/gw.db") as gateway:
        q = f"/queue/order-{uuid.uuid4().hex[:6]}"
        p = RawClient(gateway.stomp_port)
        p.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        expected: list[str] = []
        try:
            p.connect()
            for k in range(1000):
                p.send(
                    frame("BEGIN", {"transaction": f"t{k}"})
                    + frame("SEND", {"destination": q, "transaction": f"t{k}"}, f"{k}-tx".encode())
                    + frame("COMMIT", {"transaction": f"t{k}"})
                    + frame("SEND", {"destination": q}, f"{k}-a".encode())
                )
                gap_until = time.perf_counter() + (k * 7919 % 300) * 0.000005
                while time.perf_counter() < gap_until:  # a busy wait: the gap is the point, not a synchronisation
                    pass
                p.send(frame("SEND", {"destination": q, "receipt": f"r{k}"}, f"{k}-b".encode()))
                expected += [f"{k}-tx", f"{k}-a", f"{k}-b"]
                assert p.read(timeout=10).headers.get("receipt-id") == f"r{k}"
        finally:
            p.close()
        c = RawClient(gateway.stomp_port)
        try:
            c.connect()
            c.frame("SUBSCRIBE", {"id": "s", "destination": q, "ack": "auto"})
            got = [c.read(timeout=10).body.decode() for _ in expected]
        finally:
            c.close()
        assert got == expected, next((i, g, e) for i, (g, e) in enumerate(zip(got, expected)) if g != e)
