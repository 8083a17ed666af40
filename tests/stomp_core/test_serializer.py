import pytest

from stomp_core.errors import UsageError
from stomp_core.escaping import can_carry, escape
from stomp_core.frame import Frame
from stomp_core.parser import FrameParser
from stomp_core.serializer import encode_frame, encode_message, encode_receipt, serialize


def test_send_always_has_content_length() -> None:
    assert serialize(Frame("SEND", {"destination": "/q"}, b"")) == b"SEND\ndestination:/q\ncontent-length:0\n\n\x00"
    assert serialize(Frame("ERROR", {"message": "x"}, b"ab")) == b"ERROR\nmessage:x\ncontent-length:2\n\nab\x00"


def test_other_frames_only_with_a_body() -> None:
    assert serialize(Frame("RECEIPT", {"receipt-id": "1"})) == b"RECEIPT\nreceipt-id:1\n\n\x00"
    assert serialize(Frame("BEGIN", {"transaction": "t"}, b"z")) == b"BEGIN\ntransaction:t\ncontent-length:1\n\nz\x00"


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_callers_content_length_is_replaced(version: str) -> None:
    frame = Frame("SEND", {"content-length": "99", "destination": "/q"}, b"abc")
    assert serialize(frame, version) == b"SEND\ndestination:/q\ncontent-length:3\n\nabc\x00"


@pytest.mark.parametrize(
    ("version", "wire"),
    [
        ("1.0", b"SEND\nx:a:b\\c\ncontent-length:0\n\n\x00"),
        ("1.1", b"SEND\nx:a\\cb\\\\c\ncontent-length:0\n\n\x00"),
        ("1.2", b"SEND\nx:a\\cb\\\\c\ncontent-length:0\n\n\x00"),
    ],
)
def test_escaping_per_version(version: str, wire: bytes) -> None:
    assert serialize(Frame("SEND", {"x": "a:b\\c"}), version) == wire


@pytest.mark.parametrize("command", ["CONNECT", "CONNECTED"])
def test_connect_and_connected_are_never_escaped(command: str) -> None:
    wire = serialize(Frame(command, {"passcode": "a:b\\c", "content-length": "5"}), "1.2")
    assert wire == command.encode() + b"\npasscode:a:b\\c\n\n\x00"


@pytest.mark.parametrize(
    ("frame", "version"),
    [
        (Frame("CONNECT", {"login": "a\nb"}), "1.2"),
        (Frame("CONNECT", {"a:b": "x"}), "1.2"),
        (Frame("SEND", {"a:b": "x"}), "1.0"),
        (Frame("SEND", {"x": "a\rb"}), "1.1"),
    ],
)
def test_unrepresentable_headers(frame: Frame, version: str) -> None:
    with pytest.raises(UsageError):
        serialize(frame, version)


def test_encode_message() -> None:
    wire = encode_message("/queue/a", "s1", "m:1", "ack-1", {"content-type": "text/plain", "ack": "no"}, b"hi", "1.2")
    assert wire == (
        b"MESSAGE\ndestination:/queue/a\nmessage-id:m\\c1\nsubscription:s1\nack:ack-1\ncontent-type:text/plain\n"
        b"content-length:2\n\nhi\x00"
    )
    parsed = FrameParser(version="1.2").feed(wire)[0]
    assert isinstance(parsed, Frame) and parsed.headers["message-id"] == "m:1"


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_encode_message_without_ack_header_before_12(version: str) -> None:
    wire = encode_message("/q", "s", "m", "ack-1", {}, b"", version)
    assert wire == b"MESSAGE\ndestination:/q\nmessage-id:m\nsubscription:s\ncontent-length:0\n\n\x00"


def test_encode_message_leaves_out_headers_the_version_cannot_carry() -> None:
    headers = {"a:b": "1", "multi": "x\ny", "cr": "x\ry", "nul": "x\x00y", "ok": "1"}
    ten = encode_message("/q", "s", "m", None, headers, b"", "1.0")
    assert b"a:b" not in ten and b"multi" not in ten and b"cr:" not in ten and b"nul" not in ten and b"\nok:1\n" in ten
    eleven = encode_message("/q", "s", "m", None, headers, b"", "1.1")
    assert b"a\\cb:1\n" in eleven and b"multi:x\\ny\n" in eleven and b"cr:" not in eleven and b"nul" not in eleven
    twelve = encode_message("/q", "s", "m", None, headers, b"", "1.2")
    assert b"cr:x\\ry\n" in twelve and b"nul" not in twelve and twelve.count(b"\x00") == 1
    assert b"\na:b:1\n" in encode_message("/q", "s", "m", None, {"x": "1", "a": "b:1"}, b"", "1.0")


def test_escape_refuses_a_nul_in_every_version() -> None:
    for version in ("1.0", "1.1", "1.2"):
        with pytest.raises(UsageError):
            encode_frame("RECEIPT", [("receipt-id", "a\x00b")], b"", version)


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
@pytest.mark.parametrize("receipt_id", ["r-1", "", "a:b", "back\\slash", "é", "line\nbreak", "cr\rhere", "nul\0"])
def test_encode_receipt_is_encode_frame(version: str, receipt_id: str) -> None:
    """The RECEIPT fast path writes the same bytes as the general one, and refuses what it refuses."""
    try:
        expected = encode_frame("RECEIPT", (("receipt-id", receipt_id),), b"", version)
    except UsageError as exc:
        with pytest.raises(UsageError) as raised:
            encode_receipt(receipt_id, version)
        assert str(raised.value) == str(exc)
    else:
        assert encode_receipt(receipt_id, version) == expected


_TRICKY = ["", "a", "a:b", "x\ny", "x\ry", "x\x00y", "back\\slash", "é", ":", "\n", "ok"]


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_encode_message_headers_match_the_header_by_header_rules(version: str) -> None:
    """Whether the headers take the quick path (nothing to escape or leave out) or not, each is written as
    ``escape(name):escape(value)`` when the version can carry it, in order, and left out otherwise."""
    for name in _TRICKY:
        for value in _TRICKY:
            headers = {"first": "1", name: value, "last": "2"}
            expected = "".join(
                f"{escape(n, version)}:{escape(v, version)}\n"
                for n, v in headers.items()
                if n not in ("destination", "subscription", "message-id", "ack", "content-length")
                and can_carry(n, v, version)
            )
            wire = encode_message("/q", "s", "m", None, headers, b"", version)
            assert wire == f"MESSAGE\ndestination:/q\nmessage-id:m\nsubscription:s\n{expected}content-length:0\n\n".encode() + b"\0"
