"""Hostile or unusual input from one client must not cost another client a message: raw sockets, a real gateway."""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.gateway_process import Gateway, run_gateway
from tests.raw_stomp import RawClient, RawFrame

Raw = Callable[[], RawClient]


def q(kind: str = "queue") -> str:
    return f"/{kind}/hard{uuid.uuid4().hex[:10]}"


def send_frame(destination: str, body: bytes = b"", **headers: str) -> bytes:
    lines = ["SEND", f"destination:{destination}"] + [f"{k}:{v}" for k, v in headers.items()]
    return ("\n".join(lines) + "\n\n").encode() + body + b"\x00"


def read_until_error(c: RawClient) -> list[RawFrame]:
    frames = []
    while True:
        frame = c.read(timeout=10)
        frames.append(frame)
        if frame.command == "ERROR":
            return frames


def drain(c: RawClient, count: int, timeout: float = 10) -> list[RawFrame]:
    return [c.read(timeout=timeout) for _ in range(count)]


def errors_counted(gateway: Gateway, kind: str) -> float:
    text = httpx.get(f"{gateway.http_url}/metrics").text
    match = re.search(r'^stompgate_errors_total\{kind="' + re.escape(kind) + r'"\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


# ---- item 3: the valid frames before a bad one are processed and receipted, then the ERROR ----


def test_a_send_before_a_bad_frame_in_the_same_read_is_stored_and_receipted(raw: Raw, gateway: Gateway) -> None:
    dest = q()
    before = errors_counted(gateway, "Invalid header")
    c = raw()
    c.connect()
    c.send(send_frame(dest, b"a1", receipt="r1") + b"SEND\ndestination:" + dest.encode() + b"\nno colon here\n\n\x00")
    frames = read_until_error(c)
    assert [f.command for f in frames] == ["RECEIPT", "ERROR"]
    assert frames[0].headers["receipt-id"] == "r1"
    assert frames[1].headers["message"] == "Invalid header"
    assert c.closed_by_peer()
    consumer = raw()
    consumer.connect()
    consumer.frame("SUBSCRIBE", {"id": "1", "destination": dest})
    assert consumer.read().body == b"a1"
    # protocol errors are counted (and logged) like every other ERROR
    assert errors_counted(gateway, "Invalid header") == before + 1


def test_thousands_of_sends_around_a_bad_one_are_all_answered_in_order(raw: Raw, gateway: Gateway) -> None:
    dest = q()
    c = raw()
    c.connect()
    good = b"".join(send_frame(dest, b"m%d" % i, receipt=f"r{i}") for i in range(5000))
    bad = send_frame(dest, b"x", receipt="bad", priority="eleven")
    after = b"".join(send_frame(dest, b"n%d" % i, receipt=f"s{i}") for i in range(4999))
    c.send(good + bad + after)
    frames = read_until_error(c)
    assert [f.headers.get("receipt-id") for f in frames[:-1]] == [f"r{i}" for i in range(5000)]
    assert frames[-1].headers["message"] == "Invalid header" and frames[-1].headers["receipt-id"] == "bad"
    assert c.closed_by_peer()
    depth = httpx.get(f"{gateway.http_url}/destinations/queue/{dest.removeprefix('/queue/')}").json()["depth"]
    assert depth == 5000


# ---- item 5: a NUL inside a header is refused, never relayed ----


def test_a_nul_in_a_header_is_refused_and_never_reaches_a_consumer(raw: Raw) -> None:
    dest = q()
    consumer = raw()
    consumer.connect()
    consumer.frame("SUBSCRIBE", {"id": "1", "destination": dest, "receipt": "sub"})
    assert consumer.read().headers["receipt-id"] == "sub"
    attacker = raw()
    attacker.connect()
    forged = b"x-evil:a\x00MESSAGE\ndestination:" + dest.encode() + b"\nmessage-id:forged\nsubscription:1\n\nforged body"
    attacker.send(b"SEND\ndestination:" + dest.encode() + b"\n" + forged + b"\n\nreal\x00")
    (error,) = read_until_error(attacker)
    assert error.headers["message"] == "Invalid header"
    attacker2 = raw()
    attacker2.connect()
    attacker2.send(b"SEND\ndestination:" + dest.encode() + b"\nreceipt:r\x00ERROR\n\n\x00")
    assert read_until_error(attacker2)[-1].headers["message"] == "Invalid header"
    producer = raw()
    producer.connect()
    producer.send(send_frame(dest, b"after", receipt="ok"))
    assert producer.read().headers["receipt-id"] == "ok"
    message = consumer.read()
    assert message.command == "MESSAGE" and message.body == b"after"


# ---- item 1: a header one consumer's version cannot carry never strands a message ----


def test_a_line_break_header_reaches_a_10_queue_consumer_without_that_header(raw: Raw) -> None:
    dest = q()
    consumer = raw()
    consumer.connect("1.0")
    consumer.frame("SUBSCRIBE", {"destination": dest, "ack": "client", "receipt": "sub"})
    assert consumer.read().headers["receipt-id"] == "sub"
    producer = raw()
    producer.connect("1.2")
    producer.send(
        b"SEND\ndestination:" + dest.encode() + b"\nx-multi:line1\\nline2\nx-cr:a\\rb\nx\\cname:v\nx-plain:1\n"
        b"receipt:r1\n\nfirst\x00" + send_frame(dest, b"second", receipt="r2")
    )
    assert [f.headers["receipt-id"] for f in drain(producer, 2)] == ["r1", "r2"]
    first, second = drain(consumer, 2)
    assert (first.body, second.body) == (b"first", b"second")
    assert first.headers["x-plain"] == "1"
    assert "x-multi" not in first.headers and "x-cr" not in first.headers and "x" not in first.headers
    consumer.frame("ACK", {"message-id": second.headers["message-id"], "receipt": "acked"})
    assert consumer.read().headers["receipt-id"] == "acked"


def test_a_header_a_10_subscriber_cannot_carry_costs_no_topic_subscriber_its_message(raw: Raw) -> None:
    dest = q("topic")
    old = raw()
    old.connect("1.0")
    old.frame("SUBSCRIBE", {"destination": dest, "receipt": "sub"})
    assert old.read().headers["receipt-id"] == "sub"
    eleven = raw()
    eleven.connect("1.1")
    eleven.frame("SUBSCRIBE", {"destination": dest, "id": "1", "receipt": "sub"})
    assert eleven.read().headers["receipt-id"] == "sub"
    modern = []
    for _ in range(20):
        c = raw()
        c.connect("1.2")
        c.frame("SUBSCRIBE", {"destination": dest, "id": "1", "receipt": "sub"})
        assert c.read().headers["receipt-id"] == "sub"
        modern.append(c)
    producer = raw()
    producer.connect("1.2")
    producer.send(b"SEND\ndestination:" + dest.encode() + b"\nx-multi:a\\nb\nx-cr:c\\rd\nreceipt:r\n\nnews\x00")
    assert producer.read().headers["receipt-id"] == "r"
    got = old.read()
    assert got.body == b"news" and "x-multi" not in got.headers
    got = eleven.read()
    assert got.body == b"news" and got.headers["x-multi"] == "a\\nb" and "x-cr" not in got.headers
    for c in modern:
        got = c.read()
        assert got.body == b"news" and got.headers["x-multi"] == "a\\nb" and got.headers["x-cr"] == "c\\rd"
    # the shared topic follower kept going: the next message reaches everyone too
    producer.send(send_frame(dest, b"more", receipt="r2"))
    assert producer.read().headers["receipt-id"] == "r2"
    assert old.read().body == b"more" and all(c.read().body == b"more" for c in modern)


# ---- item 4: auto-ack deletes only what the connection took ----


def test_auto_ack_with_a_reader_that_stops_loses_at_most_the_socket_buffers(raw: Raw, gateway: Gateway) -> None:
    dest = q()
    body = b"x" * (256 * 1024)
    producer = raw()
    producer.connect()
    for i in range(100):
        producer.send(send_frame(dest, body, receipt=f"r{i}", n=str(i)))
    assert [f.headers["receipt-id"] for f in drain(producer, 100)] == [f"r{i}" for i in range(100)]
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # a reader that keeps little on its side
    slow.settimeout(10)
    slow.connect(("127.0.0.1", gateway.stomp_port))
    reader = RawClient.__new__(RawClient)
    reader.sock, reader.buffer = slow, b""
    reader.connect()
    reader.frame("SUBSCRIBE", {"id": "1", "destination": dest, "ack": "auto"})
    seen = {f.headers["n"] for f in drain(reader, 5)}
    reader.close()
    consumer = raw()
    consumer.connect()
    consumer.frame("SUBSCRIBE", {"id": "1", "destination": dest, "ack": "client-individual"})
    rest: set[str] = set()
    try:
        while True:
            frame = consumer.read(timeout=3)
            rest.add(frame.headers["n"])
            consumer.frame("ACK", {"id": frame.headers["ack"]})
    except EOFError:
        pass
    lost = 100 - len(seen | rest)
    # What sits in the kernel's socket buffers when a reader goes away is gone with auto-ack (as with any broker);
    # the gateway itself holds back all but about its 1 MiB write budget. Before the fix 91-94 of 100 were lost.
    assert lost <= 24, (lost, sorted(seen), len(rest))


# ---- item 2: every header the gateway interprets is range-checked, at SEND and over REST ----


def test_an_absurd_expiration_is_refused_at_send_and_costs_others_nothing(raw: Raw, gateway: Gateway) -> None:
    dest = q()
    innocent = [raw() for _ in range(3)]
    for c in innocent:
        c.connect()
    bad = raw()
    bad.connect()
    for i, c in enumerate(innocent):  # in flight together with the bad SEND, so they would share a group commit
        c.send(send_frame(dest, b"ok%d" % i, receipt=f"ok{i}"))
    bad.send(send_frame(dest, b"x", receipt="bad", expiration="99999999999999999999"))
    error = bad.read()
    assert error.command == "ERROR" and error.headers["message"] == "Invalid header"
    assert "expiration" in error.body.decode() and error.headers["receipt-id"] == "bad"
    for i, c in enumerate(innocent):
        assert c.read().headers["receipt-id"] == f"ok{i}"
    name = dest.removeprefix("/queue/")
    for header, value in (("expiration", "99999999999999999999"), ("expires", "-1"), ("priority", "10")):
        reply = httpx.post(f"{gateway.http_url}/destinations/queue/{name}", content=b"x", headers={f"X-Stomp-{header}": value})
        assert reply.status_code == 400, reply.text
        assert reply.headers["content-type"].startswith("application/problem+json") and header in reply.text
    assert httpx.get(f"{gateway.http_url}/destinations/queue/{name}").json()["depth"] == 3


# ---- item 10: open transactions are bounded in bytes, per connection and in total ----


def test_transactions_are_bounded_in_bytes_per_connection_and_in_total(tmp_path: Path) -> None:
    limits = ["--max-transaction-bytes", "100000", "--max-transaction-bytes-total", "150000"]
    clients: list[RawClient] = []
    with run_gateway(tmp_path, extra=limits) as gw:
        dest = q()
        chunk = b"x" * 60_000

        def in_transaction(sends: int) -> RawClient:
            c = RawClient(gw.stomp_port)
            clients.append(c)
            c.connect()
            c.frame("BEGIN", {"transaction": "t", "receipt": "b"})
            assert c.read().headers["receipt-id"] == "b"
            for i in range(sends):
                c.send(send_frame(dest, chunk, transaction="t", receipt=f"s{i}"))
                assert c.read().headers["receipt-id"] == f"s{i}"
            return c

        try:
            first = in_transaction(1)
            first.send(send_frame(dest, chunk, transaction="t", receipt="over"))
            error = first.read()
            assert error.headers["message"] == "Transaction too large"
            assert "max_transaction_bytes=100000" in error.body.decode()
            assert error.headers["receipt-id"] == "over" and first.closed_by_peer()
            second = in_transaction(1)
            third = in_transaction(1)  # the first's bytes were given back when it closed: 120,000 held now
            second.send(send_frame(dest, b"y" * 35_000, transaction="t", receipt="over"))  # under its own limit
            error = second.read()
            assert "max_transaction_bytes_total=150000" in error.body.decode()
            third.frame("COMMIT", {"transaction": "t", "receipt": "c"})
            assert third.read().headers["receipt-id"] == "c"
            fourth = in_transaction(1)  # committed and failed transactions gave their bytes back
            fourth.frame("ABORT", {"transaction": "t", "receipt": "a"})
            assert fourth.read().headers["receipt-id"] == "a"
            assert httpx.get(f"{gw.http_url}/destinations/queue/{dest.removeprefix('/queue/')}").json()["depth"] == 1
        finally:
            for c in clients:
                c.close()


# ---- found by review: large topic messages queued but not yet flushed ----


def test_a_large_topic_message_pipelined_with_a_queue_send_neither_stalls_nor_spins(raw: Raw, gateway: Gateway) -> None:
    """A queue subscription woken while a >1 MiB topic MESSAGE sat unflushed on its connection used to spin on the
    event loop forever (no RECEIPT, no /health)."""
    topic, queue = q("topic"), q()
    consumer = raw()
    consumer.connect()
    consumer.send(
        f"SUBSCRIBE\nid:t\ndestination:{topic}\n\n\x00SUBSCRIBE\nid:q\ndestination:{queue}\nreceipt:r\n\n\x00".encode()
    )
    assert consumer.read().headers["receipt-id"] == "r"
    producer = raw()
    producer.connect()
    producer.send(send_frame(topic, b"x" * (2 * 1024 * 1024)) + send_frame(queue, b"hello", receipt="p"))
    assert producer.read(timeout=10).headers["receipt-id"] == "p"
    got = drain(consumer, 2)
    assert sorted(f.headers["destination"] for f in got) == sorted([topic, queue])
    assert httpx.get(f"{gateway.http_url}/health", timeout=5).status_code == 200


def test_a_reading_consumer_takes_a_burst_of_large_topic_messages_without_a_slow_consumer_error(raw: Raw) -> None:
    topic = q("topic")
    consumer = raw()
    consumer.connect()
    consumer.frame("SUBSCRIBE", {"id": "t", "destination": topic, "receipt": "r"})
    assert consumer.read().headers["receipt-id"] == "r"
    producer = raw()
    producer.connect()
    big = b"x" * 3_900_000
    burst = b"BEGIN\ntransaction:tx\n\n\x00" + b"".join(send_frame(topic, big, transaction="tx") for _ in range(5))
    producer.send(burst + b"COMMIT\ntransaction:tx\nreceipt:c\n\n\x00")
    assert producer.read(timeout=20).headers["receipt-id"] == "c"
    got = drain(consumer, 5, timeout=20)
    assert [(f.command, len(f.body)) for f in got] == [("MESSAGE", len(big))] * 5


def test_a_durable_subscriber_catching_up_a_backlog_is_paced_not_disconnected(raw: Raw) -> None:
    topic = q("topic")
    durable = {"id": "d", "destination": topic, "durable": "true", "ack": "auto"}
    client_id = "catchup-" + uuid.uuid4().hex[:6]
    subscriber = raw()
    subscriber.connect(**{"client-id": client_id})
    subscriber.frame("SUBSCRIBE", {**durable, "receipt": "s"})
    assert subscriber.read().headers["receipt-id"] == "s"
    subscriber.frame("DISCONNECT", {"receipt": "bye"})
    assert subscriber.read().headers["receipt-id"] == "bye"
    producer = raw()
    producer.connect()
    body = b"y" * 100_000
    producer.send(b"".join(send_frame(topic, body) for _ in range(200)) + send_frame(topic, b"last", receipt="l"))
    assert producer.read(timeout=20).headers["receipt-id"] == "l"
    again = raw()
    again.connect(**{"client-id": client_id})
    again.frame("SUBSCRIBE", durable)
    got = drain(again, 201, timeout=20)
    assert all(f.command == "MESSAGE" for f in got) and got[-1].body == b"last"


def _established_server_sockets(port: int) -> int:
    """Server-side ESTABLISHED sockets on ``port``, from /proc (state 01); the gateway's own view of the peers."""
    count = 0
    with open("/proc/net/tcp") as table:
        lines = table.read().splitlines()[1:]
    for line in lines:
        fields = line.split()
        if fields[3] == "01" and int(fields[1].split(":")[1], 16) == port:
            count += 1
    return count


def test_a_slow_consumer_that_never_reads_is_cut_off_after_the_linger(raw: Raw, gateway: Gateway) -> None:
    """After its ERROR a connection whose client neither reads nor closes used to keep its socket and write buffer
    forever (close() waits for the buffer): it is aborted after the linger."""
    topic = q("topic")
    before = _established_server_sockets(gateway.stomp_port)
    zombie = raw()
    zombie.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    zombie.connect()
    zombie.frame("SUBSCRIBE", {"id": "t", "destination": topic, "receipt": "r"})
    assert zombie.read().headers["receipt-id"] == "r"
    producer = raw()
    producer.connect()
    body = b"z" * 1_000_000
    for i in range(30):  # 30 MB for a reader that takes none of it: past max_session_buffer
        producer.send(send_frame(topic, body, receipt=f"p{i}"))
        assert producer.read(timeout=20).headers["receipt-id"] == f"p{i}"
    deadline = time.monotonic() + 15
    while _established_server_sockets(gateway.stomp_port) > before + 1:  # only the producer's remains
        assert time.monotonic() < deadline, "the zombie's socket was never closed"
        time.sleep(0.05)  # polling the event (the socket table), not sleeping in its place


def test_one_address_cannot_take_the_whole_transaction_memory(tmp_path: Path) -> None:
    limits = ["--max-transaction-bytes", "100000", "--max-transaction-bytes-per-address", "130000"]
    clients: list[RawClient] = []
    with run_gateway(tmp_path, extra=limits) as gw:
        dest = q()

        def in_transaction(source: str) -> RawClient:
            c = RawClient.__new__(RawClient)
            c.sock = socket.create_connection(("127.0.0.1", gw.stomp_port), timeout=10, source_address=(source, 0))
            c.buffer = b""
            clients.append(c)
            c.connect()
            c.send(b"BEGIN\ntransaction:t\n\n\x00" + send_frame(dest, b"x" * 60_000, transaction="t", receipt="s"))
            assert c.read().headers["receipt-id"] == "s"
            return c

        try:
            first = in_transaction("127.0.0.1")
            in_transaction("127.0.0.1")  # 120,000 held from 127.0.0.1
            first.send(send_frame(dest, b"y" * 20_000, transaction="t", receipt="over"))
            error = first.read()
            assert error.headers["message"] == "Transaction too large"
            assert "max_transaction_bytes_per_address=130000" in error.body.decode()
            in_transaction("127.0.0.2")  # another address still has room
        finally:
            for c in clients:
                c.close()
