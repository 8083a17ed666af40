"""A STOMP COMMIT is all or nothing: its queue SENDs, topic SENDs and ACKs are stored together or not at all.

The fault is real: a trigger in the gateway's own SQLite database refuses one topic message, so the database fails
the COMMIT in its middle (after the queue insert, before the ACK's delete), and what the test checks is what any
client can see afterwards.
"""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import httpx

from tests.gateway_process import Gateway, run_gateway
from tests.raw_stomp import RawClient, RawFrame


def read_until_error(c: RawClient) -> list[RawFrame]:
    frames = []
    while True:
        frame = c.read(timeout=10)
        frames.append(frame)
        if frame.command == "ERROR":
            return frames


def depth(gateway: Gateway, queue: str) -> int:
    reply = httpx.get(f"{gateway.http_url}/destinations/queue/{queue.removeprefix('/queue/')}")
    assert reply.status_code == 200, reply.text
    depth: int = reply.json()["depth"]
    return depth


def test_a_commit_that_fails_in_its_middle_leaves_nothing_of_it_visible(tmp_path: Path) -> None:
    db = tmp_path / "gw.db"
    with run_gateway(tmp_path, f"sqlite:///{db}", ["--lease-ms", "60000"]) as gateway:
        poison = f"/topic/poison-{uuid.uuid4().hex[:6]}"
        with sqlite3.connect(db) as conn:  # the gateway made its tables at start-up; it sees the trigger at once
            conn.execute(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON stompgate_topic_log "
                f"WHEN NEW.destination = '{poison}' BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
            )
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
        with sqlite3.connect(db) as conn:
            conn.execute(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON stompgate_topic_log "
                f"WHEN NEW.destination = '{poison}' BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
            )

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
