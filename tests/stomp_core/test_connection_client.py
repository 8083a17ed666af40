import pytest

from stomp_core import (
    ClientConnection,
    Connected,
    ErrorReceived,
    Frame,
    HeartbeatPlan,
    Limits,
    MessageReceived,
    ProtocolViolation,
    ReceiptReceived,
    State,
    UsageError,
)
from stomp_core.parser import FrameParser


def parse(data: bytes, version: str = "1.2") -> list[Frame]:
    return FrameParser(version=version).feed(data)  # type: ignore[return-value]


def open_client(version: str = "1.2") -> ClientConnection:
    client = ClientConnection()
    client.connect(heartbeat=(100, 200))
    client.data_to_send()
    events = client.receive_data(f"CONNECTED\nversion:{version}\nheart-beat:300,50\n\n\x00".encode())
    assert isinstance(events[0], Connected)
    return client


def test_connect_frame() -> None:
    client = ClientConnection()
    assert client.state is State.AWAITING_CONNECT and client.version == "1.0" and not client.closed
    client.connect(login="me", passcode="a:b\\c", heartbeat=(1000, 2000), headers={"x": "y"})
    (frame,) = parse(client.data_to_send())
    assert frame == Frame(
        "CONNECT",
        {
            "accept-version": "1.0,1.1,1.2",
            "host": "/",
            "login": "me",
            "passcode": "a:b\\c",
            "heart-beat": "1000,2000",
            "x": "y",
        },
    )
    assert client.state is State.CONNECTING
    with pytest.raises(UsageError):
        client.connect()


def test_10_connect_frame() -> None:
    client = ClientConnection()
    client.connect(accept_version=None, command="STOMP")
    assert client.data_to_send() == b"STOMP\nhost:/\n\n\x00"
    client = ClientConnection()
    client.connect(accept_version=None, heartbeat=(1, 1))
    assert b"heart-beat:1,1" in client.data_to_send()
    with pytest.raises(UsageError):
        ClientConnection().connect(command="SEND")


def test_connected() -> None:
    client = ClientConnection()
    client.connect(heartbeat=(100, 200))
    (event,) = client.receive_data(b"CONNECTED\nversion:1.1\nheart-beat:300,50\nsession:s\nserver:x\n\n\x00")
    assert event == Connected(
        "1.1", (300, 50), "s", "x", {"version": "1.1", "heart-beat": "300,50", "session": "s", "server": "x"}
    )
    assert client.version == "1.1" and client.state is State.OPEN
    assert client.heartbeat == HeartbeatPlan(send_every_ms=100, expect_every_ms=300)


def test_connected_without_version_is_10() -> None:
    client = ClientConnection()
    client.connect(accept_version=None)
    (event,) = client.receive_data(b"CONNECTED\nsession:1\n\n\x00")
    assert isinstance(event, Connected) and event.version == "1.0" and event.heartbeat == (0, 0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"CONNECTED\nversion:9.9\n\n\x00", "Version mismatch"),
        (b"CONNECTED\nversion:1.2\nheart-beat:x\n\n\x00", "Invalid header"),
        (b"MESSAGE\ndestination:/q\nmessage-id:1\n\n\x00", "Invalid frame order"),
        (b"SEND\n\n\x00", "Bad command"),
    ],
)
def test_bad_frames_from_the_server(data: bytes, message: str) -> None:
    client = ClientConnection()
    client.connect()
    events = client.receive_data(data + b"RECEIPT\nreceipt-id:1\n\n\x00")
    assert events == [ProtocolViolation(message, events[0].detail)]  # type: ignore[union-attr]
    assert client.closed and client.data_to_send().startswith(b"CONNECT")
    assert client.receive_data(b"\n") == []


def test_limit_violation_from_the_server() -> None:
    client = ClientConnection(limits=Limits(max_frame_bytes=10))
    client.connect()
    (event,) = client.receive_data(b"CONNECTED\nversion:1.2\n\n" + b"x" * 11 + b"\x00")
    assert isinstance(event, ProtocolViolation) and event.limit
    assert event.message == "Frame too large: limit max_frame_bytes=10"


def test_messages_receipts_errors() -> None:
    client = open_client("1.2")
    events = client.receive_data(
        b"MESSAGE\ndestination:/q\nmessage-id:m\\c1\nsubscription:s\nack:a1\ncontent-length:3\n\na\x00b\x00\n"
        b"MESSAGE\ndestination:/q\nmessage-id:m2\n\n\x00"
        b"RECEIPT\nreceipt-id:r1\n\n\x00"
        b"ERROR\nmessage:boom\n\ndetail\x00"
        b"RECEIPT\nreceipt-id:never\n\n\x00"
    )
    assert events == [
        MessageReceived(
            "/q",
            "s",
            "m:1",
            "a1",
            {"destination": "/q", "message-id": "m:1", "subscription": "s", "ack": "a1", "content-length": "3"},
            b"a\x00b",
        ),
        MessageReceived("/q", "", "m2", None, {"destination": "/q", "message-id": "m2"}, b""),
        ReceiptReceived("r1"),
        ErrorReceived("boom", {"message": "boom"}, b"detail"),
    ]
    assert client.closed


@pytest.mark.parametrize(
    "data",
    [b"MESSAGE\nmessage-id:1\n\n\x00", b"MESSAGE\ndestination:/q\n\n\x00", b"RECEIPT\n\n\x00"],
)
def test_missing_headers_from_the_server(data: bytes) -> None:
    client = open_client()
    (event,) = client.receive_data(data)
    assert isinstance(event, ProtocolViolation) and event.message == "Missing header"


def test_error_without_message() -> None:
    client = ClientConnection()
    client.connect()
    assert client.receive_data(b"ERROR\n\n\x00") == [ErrorReceived("", {}, b"")]


def test_work_frames_12() -> None:
    client = open_client("1.2")
    client.send("/q:1", b"body", headers={"k": "v\n"}, receipt="r", transaction="t")
    client.subscribe("/q", "0", ack="client", headers={"prefetch-count": "1"}, receipt="r2")
    client.unsubscribe("0", receipt="r3")
    client.ack("a1", subscription="0", transaction="t", receipt="r4")
    client.nack("a2", requeue=False)
    client.nack("a3")
    client.begin("t", receipt="b")
    client.commit("t")
    client.abort("t")
    client.send_heartbeat()
    client.disconnect(receipt="bye")
    assert client.state is State.CLOSING
    frames = parse(client.data_to_send())
    assert frames == [
        Frame(
            "SEND",
            {"destination": "/q:1", "transaction": "t", "receipt": "r", "k": "v\n", "content-length": "4"},
            b"body",
        ),
        Frame("SUBSCRIBE", {"destination": "/q", "id": "0", "ack": "client", "receipt": "r2", "prefetch-count": "1"}),
        Frame("UNSUBSCRIBE", {"id": "0", "receipt": "r3"}),
        Frame("ACK", {"id": "a1", "subscription": "0", "transaction": "t", "receipt": "r4"}),
        Frame("NACK", {"id": "a2", "requeue": "false"}),
        Frame("NACK", {"id": "a3"}),
        Frame("BEGIN", {"transaction": "t", "receipt": "b"}),
        Frame("COMMIT", {"transaction": "t"}),
        Frame("ABORT", {"transaction": "t"}),
        Frame("DISCONNECT", {"receipt": "bye"}),
    ]
    assert client.receive_data(b"MESSAGE\ndestination:/q\nmessage-id:1\n\n\x00RECEIPT\nreceipt-id:bye\n\n\x00") == [
        MessageReceived("/q", "", "1", None, {"destination": "/q", "message-id": "1"}, b""),
        ReceiptReceived("bye"),
    ]
    client.close()
    assert client.closed
    client.send_heartbeat()
    assert client.data_to_send() == b""
    with pytest.raises(UsageError):
        client.send("/q", b"")


def test_acks_11_and_10() -> None:
    client = open_client("1.1")
    client.ack("m1", subscription="s")
    client.nack("m2", subscription="s")
    with pytest.raises(UsageError):
        client.ack("m3")
    assert parse(client.data_to_send(), "1.1") == [
        Frame("ACK", {"message-id": "m1", "subscription": "s"}),
        Frame("NACK", {"message-id": "m2", "subscription": "s"}),
    ]
    client = open_client("1.0")
    client.ack("m1")
    with pytest.raises(UsageError):
        client.nack("m1")
    assert parse(client.data_to_send(), "1.0") == [Frame("ACK", {"message-id": "m1"})]


def test_calls_before_connect_are_usage_errors() -> None:
    client = ClientConnection()
    with pytest.raises(UsageError):
        client.send("/q", b"")
    assert client.receive_data(b"") == []
