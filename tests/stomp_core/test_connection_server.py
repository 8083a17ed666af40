import pytest

from stomp_core import (
    Abort,
    Ack,
    Begin,
    Commit,
    ConnectRequested,
    Disconnect,
    Frame,
    HeartbeatPlan,
    Limits,
    Nack,
    ProtocolViolation,
    Send,
    ServerConnection,
    State,
    Subscribe,
    Unsubscribe,
    UsageError,
)
from stomp_core.parser import FrameParser


def parse(data: bytes, version: str = "1.2") -> list[Frame]:
    out = FrameParser(version=version).feed(data)
    assert all(isinstance(f, Frame) for f in out)
    return out  # type: ignore[return-value]


def connected(version: str = "1.2", limits: Limits = Limits()) -> ServerConnection:
    conn = ServerConnection(limits=limits)
    accept = b"" if version == "1.0" else b"accept-version:" + version.encode() + b"\n"
    events = conn.receive_data(b"CONNECT\n" + accept + b"host:/\n\n\x00")
    assert isinstance(events[0], ConnectRequested) and events[0].version == version
    conn.accept(session="s-1")
    conn.data_to_send()
    return conn


def violation(conn: ServerConnection, data: bytes) -> tuple[ProtocolViolation, Frame]:
    events = conn.receive_data(data)
    assert isinstance(events[-1], ProtocolViolation), events
    assert conn.state is State.FAILING and not conn.closed and conn.data_to_send() == b""
    assert conn.receive_data(b"SEND\ndestination:/q\n\n\x00") == []  # nothing more is parsed
    conn.send_violation(events[-1])
    assert conn.closed and conn.state is State.CLOSED
    (error,) = parse(conn.data_to_send(), conn.version)
    assert error.command == "ERROR"
    assert error.headers["message"] == events[-1].message
    assert error.headers["content-type"] == "text/plain"
    assert error.body == events[-1].detail.encode()
    assert conn.receive_data(b"SEND\ndestination:/q\n\n\x00") == []
    return events[-1], error


def test_connect_and_accept() -> None:
    conn = ServerConnection(server="test/1")
    assert conn.state is State.AWAITING_CONNECT and conn.version == "1.0" and not conn.closed
    assert conn.receive_data(b"") == []
    events = conn.receive_data(
        b"STOMP\naccept-version:1.1,1.2\nhost:vh\nlogin:u\npasscode:p:\\w\nheart-beat:1000,0\n\n\x00"
    )
    assert events == [
        ConnectRequested(
            "1.2",
            "vh",
            "u",
            "p:\\w",
            (1000, 0),
            {
                "accept-version": "1.1,1.2",
                "host": "vh",
                "login": "u",
                "passcode": "p:\\w",
                "heart-beat": "1000,0",
            },
        )
    ]
    assert conn.state is State.CONNECTING
    plan = conn.accept(session="abc", heartbeat=(5000, 500), headers={"x-extra": "1"})
    assert plan == HeartbeatPlan(send_every_ms=0, expect_every_ms=1000)
    assert conn.heartbeat == plan
    assert conn.state is State.OPEN
    (frame,) = parse(conn.data_to_send())
    # the server does not advertise beats it will not send
    assert frame == Frame(
        "CONNECTED", {"version": "1.2", "server": "test/1", "session": "abc", "heart-beat": "0,500", "x-extra": "1"}
    )
    assert conn.data_to_send() == b""
    with pytest.raises(UsageError):
        conn.accept(session="again")


def test_10_connect_has_no_heartbeat_but_connected_says_0_0() -> None:
    conn = ServerConnection()
    (event,) = conn.receive_data(b"CONNECT\nheart-beat:1000,1000\n\n\x00")
    assert isinstance(event, ConnectRequested) and event.version == "1.0" and event.heartbeat == (0, 0)
    assert conn.accept(session="s", heartbeat=(1000, 1000)) == HeartbeatPlan(0, 0)
    assert parse(conn.data_to_send())[0].headers["heart-beat"] == "0,0"


def test_frames_pipelined_behind_connect_use_the_new_version() -> None:
    conn = ServerConnection()
    events = conn.receive_data(
        b"CONNECT\naccept-version:1.2\n\n\x00SEND\ndestination:/q\\cx\n\nhi\x00SUBSCRIBE\ndestination:/q\nid:0\n\n\x00"
    )
    assert isinstance(events[0], ConnectRequested)
    assert events[1] == Send("/q:x", {"destination": "/q:x"}, b"hi", None, None)
    assert isinstance(events[2], Subscribe)
    conn.accept(session="s")
    assert conn.state is State.OPEN


def test_connect_then_disconnect_pipelined() -> None:
    conn = ServerConnection()
    events = conn.receive_data(b"CONNECT\n\n\x00DISCONNECT\nreceipt:bye\n\n\x00SEND\n\n\x00")
    assert events[1] == Disconnect("bye") and len(events) == 2
    assert conn.state is State.CLOSING
    conn.accept(session="s")
    with pytest.raises(UsageError):
        conn.accept(session="s")
    conn.send_receipt("bye")
    frames = parse(conn.data_to_send())
    assert [f.command for f in frames] == ["CONNECTED", "RECEIPT"]
    assert conn.receive_data(b"SEND\n\n\x00") == []
    conn.close()
    assert conn.closed


def test_frames_before_a_pipelined_violation_are_still_answered_then_the_error() -> None:
    conn = ServerConnection()
    events = conn.receive_data(b"CONNECT\n\n\x00SEND\ndestination:/q\nreceipt:r1\n\na\x00BOGUS\n\n\x00")
    assert isinstance(events[0], ConnectRequested) and isinstance(events[1], Send)
    violation = events[2]
    assert isinstance(violation, ProtocolViolation)
    assert conn.state is State.FAILING
    assert conn.accept(session="s") == HeartbeatPlan()
    conn.send_receipt("r1")
    conn.send_message(destination="/q", subscription="1", message_id="m", ack=None, headers={}, body=b"x")  # dropped
    conn.send_violation(violation)
    conn.send_receipt("late")  # after the ERROR: nothing
    assert [f.command for f in parse(conn.data_to_send(), "1.0")] == ["CONNECTED", "RECEIPT", "ERROR"]


def test_headers_behind_a_connect_get_the_full_frame_limit() -> None:
    conn = ServerConnection(limits=Limits(max_frame_bytes_before_connect=1024))
    big = b"SEND\ndestination:/q\n\n" + b"x" * 4096 + b"\x00"
    events = conn.receive_data(b"CONNECT\naccept-version:1.2\nhost:/\n\n\x00" + big)
    assert [type(e) for e in events] == [ConnectRequested, Send]
    assert ServerConnection(limits=Limits(max_frame_bytes_before_connect=1024)).receive_data(big)[-1] == (
        ProtocolViolation(
            "Frame too large: limit max_frame_bytes_before_connect=1024",
            "A frame may hold at most 1024 bytes",
            True,
        )
    )


def test_a_nul_inside_headers_is_refused_with_the_receipt_id() -> None:
    conn = connected("1.2")
    event, error = violation(conn, b"SEND\ndestination:/q\nreceipt:r\nx-evil:a\x00MESSAGE\n\nbody\x00")
    assert event.message == "Invalid header" and "NUL" in event.detail
    assert "receipt-id" not in error.headers  # the headers of a frame with a NUL are not trusted, the receipt too


def test_absurd_numbers_are_refused_not_raised() -> None:
    conn = connected("1.2")
    event, _ = violation(conn, b"SEND\ndestination:/q\ncontent-length:" + b"9" * 5000 + b"\n\n\x00")
    assert event.limit
    conn = ServerConnection()
    event, _ = violation(conn, b"CONNECT\naccept-version:1.2\nheart-beat:" + b"9" * 5000 + b",0\n\n\x00")
    assert event.message == "Invalid header" and "heart-beat" in event.detail


def test_work_frames_per_version() -> None:
    conn = connected("1.2")
    data = (
        b"SEND\ndestination:/q\ntransaction:t\nreceipt:r\ncontent-type:text/plain\n\nbody\x00"
        b"SUBSCRIBE\ndestination:/q\nid:7\nack:client-individual\nreceipt:r2\n\n\x00"
        b"SUBSCRIBE\ndestination:/t\nid:8\n\n\x00"
        b"UNSUBSCRIBE\nid:7\n\n\x00"
        b"ACK\nid:a1\ntransaction:t\n\n\x00"
        b"ACK\nid:a2\nsubscription:7\n\n\x00"
        b"NACK\nid:a3\nrequeue:false\n\n\x00"
        b"NACK\nid:a4\n\n\x00"
        b"NACK\nid:a5\nrequeue:False\n\n\x00"
        b"NACK\nid:a6\nrequeue:FALSE\n\n\x00"
        b"NACK\nid:a7\nrequeue:true\n\n\x00"
        b"NACK\nid:a8\nrequeue:no\n\n\x00"
        b"BEGIN\ntransaction:t\n\n\x00COMMIT\ntransaction:t\nreceipt:c\n\n\x00ABORT\ntransaction:u\n\n\x00"
        b"\n\n"
        b"DISCONNECT\nreceipt:bye\n\n\x00"
    )
    events = conn.receive_data(data)
    assert events == [
        Send(
            "/q",
            {"destination": "/q", "transaction": "t", "receipt": "r", "content-type": "text/plain"},
            b"body",
            "t",
            "r",
        ),
        Subscribe("/q", "7", "client-individual", {"destination": "/q", "id": "7", "ack": "client-individual", "receipt": "r2"}, "r2"),
        Subscribe("/t", "8", "auto", {"destination": "/t", "id": "8"}, None),
        Unsubscribe("7", None, {"id": "7"}),
        Ack("a1", None, "t", None),
        Ack("a2", "7", None, None),
        Nack("a3", None, None, None, False),
        Nack("a4", None, None, None, True),
        Nack("a5", None, None, None, False),  # Python clients write the boolean as "False"
        Nack("a6", None, None, None, False),
        Nack("a7", None, None, None, True),
        Nack("a8", None, None, None, True),  # only "false", in any case, turns requeueing off
        Begin("t", None),
        Commit("t", "c"),
        Abort("u", None),
        Disconnect("bye"),
    ]
    assert conn.state is State.CLOSING and not conn.closed
    conn.send_receipt("bye")
    conn.close()
    assert parse(conn.data_to_send()) == [Frame("RECEIPT", {"receipt-id": "bye"})]


def test_10_defaults() -> None:
    conn = connected("1.0")
    events = conn.receive_data(
        b"SUBSCRIBE\ndestination:/q\n\n\x00UNSUBSCRIBE\ndestination:/q\n\n\x00UNSUBSCRIBE\nid:x\ndestination:/q\n\n\x00"
        b"ACK\nmessage-id:m1\n\n\x00SUBSCRIBE\ndestination:/q\nid:given\n\n\x00"
        b"NACK\nmessage-id:m2\nreceipt:r\n\n\x00NACK\nmessage-id:m3\nrequeue:false\n\n\x00"
    )
    assert events == [
        Subscribe("/q", "/q", "auto", {"destination": "/q"}, None),
        Unsubscribe("/q", None, {"destination": "/q"}),  # by destination: no id in the headers
        Unsubscribe("x", None, {"id": "x", "destination": "/q"}),
        Ack("m1", None, None, None),
        Subscribe("/q", "given", "auto", {"destination": "/q", "id": "given"}, None),
        # not in the 1.0 spec, but 1.0 clients send it: by message-id, as a 1.0 ACK
        Nack("m2", None, None, "r", True),
        Nack("m3", None, None, None, False),
    ]


def test_11_ack() -> None:
    conn = connected("1.1")
    events = conn.receive_data(b"ACK\nmessage-id:m1\nsubscription:s\n\n\x00NACK\nmessage-id:m2\nsubscription:s\n\n\x00")
    assert events == [Ack("m1", "s", None, None), Nack("m2", "s", None, None, True)]


@pytest.mark.parametrize(
    ("version", "data", "message"),
    [
        ("1.2", b"SEND\nreceipt:r\n\n\x00", "Missing header"),
        ("1.2", b"SUBSCRIBE\nid:1\nreceipt:r\n\n\x00", "Missing header"),
        ("1.1", b"SUBSCRIBE\ndestination:/q\nreceipt:r\n\n\x00", "Missing header"),
        ("1.2", b"SUBSCRIBE\ndestination:/q\nid:1\nack:sometimes\nreceipt:r\n\n\x00", "Invalid header"),
        ("1.2", b"UNSUBSCRIBE\ndestination:/q\nreceipt:r\n\n\x00", "Missing header"),
        ("1.0", b"UNSUBSCRIBE\nreceipt:r\n\n\x00", "Missing header"),
        ("1.2", b"ACK\nmessage-id:m\nsubscription:s\nreceipt:r\n\n\x00", "Missing header"),
        ("1.1", b"ACK\nmessage-id:m\nreceipt:r\n\n\x00", "Missing header"),
        ("1.1", b"ACK\nsubscription:s\nreceipt:r\n\n\x00", "Missing header"),
        ("1.0", b"ACK\nid:m\nreceipt:r\n\n\x00", "Missing header"),
        ("1.0", b"NACK\nid:m\nreceipt:r\n\n\x00", "Missing header"),
        ("1.2", b"NACK\nreceipt:r\n\n\x00", "Missing header"),
        ("1.2", b"BEGIN\nreceipt:r\n\n\x00", "Missing header"),
        ("1.2", b"COMMIT\nreceipt:r\n\n\x00", "Missing header"),
        ("1.2", b"ABORT\nreceipt:r\n\n\x00", "Missing header"),
        ("1.2", b"CONNECT\nreceipt:r\n\n\x00", "Invalid frame order"),
        ("1.2", b"STOMP\nreceipt:r\n\n\x00", "Invalid frame order"),
        ("1.2", b"MESSAGE\nreceipt:r\n\n\x00", "Bad command"),
    ],
)
def test_violations_carry_receipt_id(version: str, data: bytes, message: str) -> None:
    conn = connected(version)
    event, error = violation(conn, data)
    assert event.message == message and not event.limit
    if message != "Bad command" or data.startswith(b"NACK"):
        assert error.headers["receipt-id"] == "r"


@pytest.mark.parametrize("data", [b"SEND\ndestination:/q\nreceipt:r\n\n\x00", b"DISCONNECT\nreceipt:r\n\n\x00"])
def test_frames_before_connect(data: bytes) -> None:
    event, error = violation(ServerConnection(), data)
    assert event.message == "Invalid frame order"
    assert error.headers["receipt-id"] == "r"


def test_version_mismatch() -> None:
    event, error = violation(ServerConnection(), b"CONNECT\naccept-version:2.0\n\n\x00")
    assert event.message == "Version mismatch"
    assert error.headers["version"] == "1.0,1.1,1.2"
    assert error.body == b"Supported protocol versions are 1.0,1.1,1.2"


def test_server_with_fewer_versions() -> None:
    conn = ServerConnection(versions=("1.1", "1.2"))
    event, error = violation(conn, b"CONNECT\n\n\x00")
    assert event.message == "Version mismatch" and error.headers["version"] == "1.1,1.2"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"STOMP\naccept-version:1.2\nheart-beat:x\n\n\x00", "Invalid header"),
        (b"STOMP\nz:1\n\nx\x00", "Bad CONNECT"),
        (b"CONNECT\n\n\n x\x00", "Bad CONNECT"),
        (b"CONNECT\n\n\r\x00", "Bad CONNECT"),  # a bare CR is not an EOL
        (b"CONNECT\n\n\r\r\n\x00", "Bad CONNECT"),
        (b"CONNECT\nhost:/\n" + b"x" * 64, "Frame too large: limit max_frame_bytes_before_connect=64"),
    ],
)
def test_bad_connect(data: bytes, message: str) -> None:
    conn = ServerConnection(limits=Limits(max_frame_bytes_before_connect=64))
    event, _ = violation(conn, data)
    assert event.message == message
    assert event.limit == message.startswith("Frame")


@pytest.mark.parametrize("body", [b"\n", b"\r\n", b"\n\r\n\n"])
def test_a_connect_body_made_only_of_eols_is_accepted(body: bytes) -> None:
    conn = ServerConnection()
    events = conn.receive_data(b"CONNECT\naccept-version:1.2\nhost:/\n\n" + body + b"\x00SEND\ndestination:/q\n\nx\x00")
    assert [type(e) for e in events] == [ConnectRequested, Send]


def test_limit_is_lifted_after_accept() -> None:
    limits = Limits(max_frame_bytes_before_connect=64, max_frame_bytes=1000)
    conn = connected("1.2", limits)
    big = b"SEND\ndestination:/q\n\n" + b"x" * 500 + b"\x00"
    (event,) = conn.receive_data(big)
    assert isinstance(event, Send) and len(event.body) == 500
    (event,) = conn.receive_data(b"SEND\ndestination:/q\n\n" + b"x" * 1000 + b"\x00")  # the limit is the body's
    assert isinstance(event, Send) and len(event.body) == 1000
    event, error = violation(conn, b"SEND\ndestination:/q\nreceipt:big\n\n" + b"x" * 1001)
    assert event.limit and event.message == "Frame too large: limit max_frame_bytes=1000"
    assert event.detail == "A frame body may hold at most 1000 bytes"
    assert error.headers["receipt-id"] == "big"


def test_escaped_error_message_in_11() -> None:
    conn = connected("1.1", Limits(max_frame_bytes=100))
    (event,) = conn.receive_data(b"SEND\n\n" + b"x" * 200)
    assert isinstance(event, ProtocolViolation)
    conn.send_violation(event)
    wire = conn.data_to_send()
    assert b"message:Frame too large\\c limit max_frame_bytes=100\n" in wire


def test_send_message_per_version() -> None:
    for version, has_ack in (("1.0", False), ("1.1", False), ("1.2", True)):
        conn = connected(version)
        conn.send_message(
            destination="/q", subscription="s", message_id="m", ack="a", headers={"content-type": "x"}, body=b"b"
        )
        (frame,) = parse(conn.data_to_send(), version)
        assert frame.command == "MESSAGE" and frame.body == b"b"
        assert ("ack" in frame.headers) is has_ack


def test_a_large_message_body_is_queued_as_it_is_not_copied_into_the_frame() -> None:
    """A body of at least SEPARATE_BODY_MIN bytes is its own chunk (the very object given), with the frames around it
    joined; data_to_send still gives the same bytes in one piece."""
    from stomp_core.connection import SEPARATE_BODY_MIN

    conn = connected()
    assert conn.chunks_to_send() == []
    conn.send_receipt("r1")
    assert conn.chunks_to_send() == [b"RECEIPT\nreceipt-id:r1\n\n\x00"]  # small frames only: one joined chunk
    large = bytes(range(256)) * (SEPARATE_BODY_MIN // 256)
    conn.send_receipt("before")
    conn.send_message(destination="/q", subscription="s", message_id="m1", ack="a1", headers={"k": "v"}, body=large)
    conn.send_message(destination="/q", subscription="s", message_id="m2", ack="a2", headers={}, body=large)
    conn.send_message(destination="/q", subscription="s", message_id="m3", ack="a3", headers={}, body=b"small")
    assert conn.bytes_to_send > 2 * len(large)
    chunks = conn.chunks_to_send()
    assert conn.bytes_to_send == 0 and conn.chunks_to_send() == []
    assert [c is large for c in chunks] == [False, True, False, True, False]
    assert chunks[0].startswith(b"RECEIPT\nreceipt-id:before\n\n\x00MESSAGE\n")
    frames = parse(b"".join(chunks))
    assert [(f.command, f.headers.get("message-id"), f.body) for f in frames] == [
        ("RECEIPT", None, b""),
        ("MESSAGE", "m1", large),
        ("MESSAGE", "m2", large),
        ("MESSAGE", "m3", b"small"),
    ]
    assert frames[1].headers["k"] == "v" and frames[1].headers["content-length"] == str(len(large))
    conn.send_message(destination="/q", subscription="s", message_id="m4", ack=None, headers={}, body=large)
    wire = conn.data_to_send()  # the same frame, joined
    (frame,) = parse(wire)
    assert frame.body == large
    conn.send_receipt("after")
    assert conn.chunks_to_send() == [b"RECEIPT\nreceipt-id:after\n\n\x00"]  # data_to_send forgot the large chunk


def test_sending_before_connected_is_a_usage_error() -> None:
    conn = ServerConnection()
    with pytest.raises(UsageError):
        conn.send_message(destination="/q", subscription="s", message_id="m", ack=None, headers={}, body=b"")
    with pytest.raises(UsageError):
        conn.send_receipt("r")
    with pytest.raises(UsageError):
        conn.accept(session="s")


def test_send_error_closes_and_later_sends_are_dropped() -> None:
    conn = connected()
    conn.send_heartbeat()
    conn.send_error("Access refused", body="bad login", receipt_id="r", headers={"x": "1"})
    assert conn.closed
    conn.send_message(destination="/q", subscription="s", message_id="m", ack=None, headers={}, body=b"")
    conn.send_receipt("r")
    conn.send_heartbeat()
    conn.send_error("again")
    data = conn.data_to_send()
    assert data.startswith(b"\n")
    (frame,) = parse(data[1:])
    assert frame == Frame(
        "ERROR",
        {"message": "Access refused", "content-type": "text/plain", "receipt-id": "r", "x": "1", "content-length": "9"},
        b"bad login",
    )


def test_send_error_with_bytes_body_before_connect() -> None:
    conn = ServerConnection()
    conn.send_error("Nope", body=b"\x00\x01")
    (frame,) = parse(conn.data_to_send())
    assert frame.body == b"\x00\x01"


def test_close_without_error() -> None:
    conn = connected()
    conn.close()
    assert conn.closed and conn.data_to_send() == b""
    assert conn.receive_data(b"SEND\ndestination:/q\n\n\x00") == []


def test_accept_after_the_error_is_a_no_op_and_bytes_to_send_counts_the_queue() -> None:
    conn = ServerConnection()
    events = conn.receive_data(b"CONNECT\n\n\x00BOGUS\n\n\x00")
    violation = events[-1]
    assert isinstance(violation, ProtocolViolation)
    conn.send_violation(violation)
    queued = conn.bytes_to_send
    assert conn.accept(session="s") == HeartbeatPlan()
    wire = conn.data_to_send()
    assert len(wire) == queued and [f.command for f in parse(wire, "1.0")] == ["ERROR"]
    assert conn.bytes_to_send == 0
