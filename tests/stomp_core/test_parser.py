import pytest

from stomp_core.errors import LimitExceeded, ProtocolError
from stomp_core.frame import CLIENT_COMMANDS, Frame
from stomp_core.limits import Limits
from stomp_core.parser import FrameParser

SEND = b"SEND\ndestination:/queue/a\n\nhello\x00"


def frames(data: bytes, *, version: str = "1.2", limits: Limits = Limits()) -> list[Frame | ProtocolError]:
    """Parse whole and byte-at-a-time; both must agree (errors compared by message)."""
    whole = FrameParser(limits, version=version).feed(data)
    parser = FrameParser(limits, version=version)
    split: list[Frame | ProtocolError] = []
    for i in range(len(data)):
        split.extend(parser.feed(data[i : i + 1]))
    key = [x.message if isinstance(x, ProtocolError) else x for x in whole]
    assert key == [x.message if isinstance(x, ProtocolError) else x for x in split]
    return whole


def error(data: bytes, **kwargs: object) -> ProtocolError:
    result = frames(data, **kwargs)  # type: ignore[arg-type]
    assert isinstance(result[-1], ProtocolError), result
    return result[-1]


def test_simple_frame() -> None:
    assert frames(SEND) == [Frame("SEND", {"destination": "/queue/a"}, b"hello")]


def test_several_frames_in_one_chunk_with_heartbeats() -> None:
    data = b"\n\r\n\x00" + SEND + b"\n" + SEND + b"\r\n\r\n\n" + SEND + b"\n"
    assert len(frames(data)) == 3


def test_crlf_lines_in_every_version() -> None:
    data = b"SEND\r\ndestination:/q\r\nx:y\r\n\r\nbody\x00"
    for version in ("1.0", "1.1", "1.2"):
        assert frames(data, version=version) == [Frame("SEND", {"destination": "/q", "x": "y"}, b"body")]


def test_mixed_line_endings() -> None:
    data = b"SEND\r\ndestination:/q\n\r\n\x00SEND\ndestination:/r\r\n\n\x00"
    assert [f.headers["destination"] for f in frames(data)] == ["/q", "/r"]  # type: ignore[union-attr]


def test_frame_without_headers() -> None:
    assert frames(b"DISCONNECT\n\n\x00") == [Frame("DISCONNECT", {}, b"")]


def test_colon_in_value_and_first_header_wins() -> None:
    data = b"SEND\ndestination:/q:a:b\nx:1\nx:2\n\n\x00"
    assert frames(data, version="1.0")[0] == Frame("SEND", {"destination": "/q:a:b", "x": "1"}, b"")


def test_content_length_body_may_hold_nuls() -> None:
    data = b"SEND\ndestination:/q\ncontent-length:5\n\na\x00b\x00c\x00" + SEND
    result = frames(data)
    assert result[0] == Frame("SEND", {"destination": "/q", "content-length": "5"}, b"a\x00b\x00c")
    assert len(result) == 2


def test_content_length_zero() -> None:
    assert frames(b"SEND\ncontent-length:0\n\n\x00")[0] == Frame("SEND", {"content-length": "0"}, b"")


def test_content_length_not_followed_by_nul() -> None:
    exc = error(b"SEND\ncontent-length:2\nreceipt:r9\n\nabc\x00")
    assert exc.message == "Invalid frame"
    assert exc.receipt_id == "r9"


@pytest.mark.parametrize("value", [b"-1", b"abc", b"1.5", b" 3", b"", b"\xd9\xa1"])
def test_bad_content_length(value: bytes) -> None:
    exc = error(b"SEND\ncontent-length:" + value + b"\nreceipt:r\n\n\x00")
    assert exc.message == "Invalid header"
    assert exc.receipt_id == "r"


def test_1_0_trims_values_but_not_connect() -> None:
    data = b"SEND\ndestination: /q \t\n\n\x00CONNECT\nlogin: me \n\n\x00"
    result = frames(data, version="1.0")
    assert result[0].headers == {"destination": "/q"}  # type: ignore[union-attr]
    assert result[1].headers == {"login": " me "}  # type: ignore[union-attr]
    assert frames(b"SEND\ndestination: /q \n\n\x00", version="1.1")[0].headers == {"destination": " /q "}  # type: ignore[union-attr]


def test_unescaping_per_version_and_never_in_connect() -> None:
    data = b"SEND\nd\\cx:a\\nb\\\\\n\n\x00"
    assert frames(data, version="1.0")[0].headers == {"d\\cx": "a\\nb\\\\"}  # type: ignore[union-attr]
    assert frames(data, version="1.1")[0].headers == {"d:x": "a\nb\\"}  # type: ignore[union-attr]
    assert frames(b"SEND\nx:\\r\n\n\x00", version="1.2")[0].headers == {"x": "\r"}  # type: ignore[union-attr]
    assert error(b"SEND\nx:\\r\n\n\x00", version="1.1").message == "Invalid header"
    assert error(b"SEND\nx:\\t\n\n\x00", version="1.2").message == "Invalid header"
    connect = b"CONNECT\npasscode:a\\cb\\\n\n\x00"
    assert frames(connect, version="1.2")[0].headers == {"passcode": "a\\cb\\"}  # type: ignore[union-attr]
    connected = b"CONNECTED\nserver:x\\y\n\n\x00"
    assert frames(connected, version="1.2")[0].headers == {"server": "x\\y"}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\rSEND\n\n\x00", "Invalid frame"),  # stray CR between frames
        (b"SEND\rX\n\n\x00", "Invalid frame"),  # CR inside the command line
        (b"SEND\nx:a\rb\n\n\x00", "Invalid frame"),
        (b"FOO\n\n\x00", "Bad command"),
        (b"send\n\n\x00", "Bad command"),
        (b"SEND\nnocolon\n\n\x00", "Invalid header"),
        (b"SEND\n:value\n\n\x00", "Invalid header"),
        (b"SEND\nx:\xff\xfe\n\n\x00", "Invalid header"),
    ],
)
def test_syntax_errors(data: bytes, message: str) -> None:
    assert error(data).message == message


def test_errors_follow_good_frames_and_kill_the_parser() -> None:
    parser = FrameParser()
    result = parser.feed(SEND + b"FOO\n\n\x00" + SEND)
    assert result[0] == Frame("SEND", {"destination": "/queue/a"}, b"hello")
    assert isinstance(result[1], ProtocolError) and len(result) == 2
    assert parser.failed is result[1]
    assert parser.feed(SEND) == []
    assert parser.next_frame() is None


def test_command_set_is_configurable() -> None:
    parser = FrameParser(commands=CLIENT_COMMANDS)
    result = parser.feed(b"MESSAGE\n\n\x00")
    assert isinstance(result[0], ProtocolError) and result[0].message == "Bad command"


def test_buffered_and_partial_frames() -> None:
    parser = FrameParser()
    assert parser.feed(SEND[:10]) == []
    assert parser.buffered == 10
    assert parser.feed(b"") == []
    assert parser.feed(SEND[10:] + SEND[:3]) == [Frame("SEND", {"destination": "/queue/a"}, b"hello")]
    assert parser.buffered == 3
    assert parser.feed(SEND[3:-1]) == []
    assert len(parser.feed(SEND[-1:] + SEND)) == 2
    assert parser.buffered == 0


def test_content_length_body_in_pieces() -> None:
    body = bytes(range(256)) * 4
    data = b"SEND\ncontent-length:1024\n\n" + body + b"\x00"
    parser = FrameParser()
    out: list[Frame | ProtocolError] = []
    for i in range(0, len(data), 100):
        out.extend(parser.feed(data[i : i + 100]))
    assert out == [Frame("SEND", {"content-length": "1024"}, body)]


# ---- limits ----


def test_frame_limit_counts_the_body_only() -> None:
    limits = Limits(max_frame_bytes=20)
    head = b"SEND\ndestination:/queue/a\nreceipt:r1\n\n"  # longer than the limit itself
    ok = head + b"x" * 20 + b"\x00"
    assert frames(ok, limits=limits)[0] == Frame("SEND", {"destination": "/queue/a", "receipt": "r1"}, b"x" * 20)
    exc = error(head + b"x" * 21 + b"\x00", limits=limits)
    assert isinstance(exc, LimitExceeded) and exc.receipt_id == "r1"
    assert exc.message == "Frame too large: limit max_frame_bytes=20"
    assert exc.detail == "A frame body may hold at most 20 bytes"


def test_frame_limit_while_incomplete() -> None:
    parser = FrameParser(Limits(max_frame_bytes=20))
    assert parser.feed(b"SEND\nreceipt:r1\n\n" + b"x" * 20) == []  # could still end here
    result = parser.feed(b"x")
    assert isinstance(result[0], LimitExceeded) and result[0].receipt_id == "r1"
    assert result[0].message.startswith("Frame too large")


def test_frame_limit_by_content_length() -> None:
    limits = Limits(max_frame_bytes=30)
    ok = b"SEND\ncontent-length:30\n\n" + b"x" * 30 + b"\x00"
    assert frames(ok, limits=limits)[0].body == b"x" * 30  # type: ignore[union-attr]
    exc = error(b"SEND\ncontent-length:31\nreceipt:r\n\n" + b"x" * 31 + b"\x00", limits=limits)
    assert isinstance(exc, LimitExceeded) and exc.message == "Frame too large: limit max_frame_bytes=30"
    assert exc.receipt_id == "r"
    exc = error(b"SEND\ncontent-length:" + b"9" * 40 + b"\n\n", limits=limits)
    assert isinstance(exc, LimitExceeded) and exc.message == "Frame too large: limit max_frame_bytes=30"


def test_a_body_limit_below_the_frame_limit_names_itself() -> None:
    limits = Limits(max_frame_bytes=30, max_body_bytes=10)
    exc = error(b"SEND\n\n" + b"x" * 11 + b"\x00", limits=limits)
    assert isinstance(exc, LimitExceeded) and exc.message == "Body too large: limit max_body_bytes=10"


def test_headers_are_bounded_by_their_own_limits() -> None:
    limits = Limits(max_frame_bytes=20, max_headers=3, max_header_line_bytes=10)
    head_limit = (3 + 1) * (10 + 2) + 2  # the command and three header lines of 10 bytes, CRLF-ended, and the EOL
    widest = b"SEND\r\n" + b"a:12345678\r\n" * 3 + b"\r\n"
    assert len(widest) <= head_limit
    assert frames(widest + b"x" * 20 + b"\x00", limits=limits)[0].body == b"x" * 20  # type: ignore[union-attr]
    parser = FrameParser(limits)
    assert parser.feed(b"SEND\n" + b"y" * (head_limit - 5)) == []  # no end of headers yet, but there may be one
    result = parser.feed(b"y")
    assert isinstance(result[0], LimitExceeded)
    assert result[0].message == "Headers too large: limit max_headers=3, max_header_line_bytes=10"
    # before CONNECTED the whole frame is counted, and a larger frame limit still meets the headers' bound
    limits = Limits(max_frame_bytes_before_connect=1000, max_headers=3, max_header_line_bytes=10)
    parser = FrameParser(limits, frame_limit="max_frame_bytes_before_connect")
    result = parser.feed(b"CONNECT\n" + b"z" * head_limit)
    assert isinstance(result[0], LimitExceeded) and result[0].message.startswith("Headers too large")


def test_before_connect_the_whole_frame_is_counted() -> None:
    limits = Limits(max_frame_bytes_before_connect=30)
    head = b"SEND\n\n"
    parser = FrameParser(limits, frame_limit="max_frame_bytes_before_connect")
    ok = head + b"x" * (30 - len(head) - 1) + b"\x00"
    assert len(ok) == 30 and parser.feed(ok) == [Frame("SEND", {}, b"x" * 23)]
    for data in (head + b"x" * 24 + b"\x00", head + b"x" * 24, b"SEND\ncontent-length:24\n\n"):
        parser = FrameParser(limits, frame_limit="max_frame_bytes_before_connect")
        (exc,) = parser.feed(data)
        assert isinstance(exc, LimitExceeded)
        assert exc.message == "Frame too large: limit max_frame_bytes_before_connect=30"
        assert exc.detail == "A frame may hold at most 30 bytes"


def test_body_limit() -> None:
    limits = Limits(max_body_bytes=5)
    assert frames(b"SEND\n\n12345\x00", limits=limits)[0].body == b"12345"  # type: ignore[union-attr]
    exc = error(b"SEND\n\n123456\x00", limits=limits)
    assert isinstance(exc, LimitExceeded) and exc.message == "Body too large: limit max_body_bytes=5"
    exc = error(b"SEND\ncontent-length:6\n\n123456\x00", limits=limits)
    assert isinstance(exc, LimitExceeded) and exc.message == "Body too large: limit max_body_bytes=5"
    result = FrameParser(limits).feed(b"SEND\n\n" + b"x" * 6)  # incomplete and already too large
    assert isinstance(result[0], LimitExceeded) and result[0].message.startswith("Body too large")


def test_header_count_limit() -> None:
    limits = Limits(max_headers=3)
    assert len(frames(b"SEND\na:1\nb:2\nc:3\n\n\x00", limits=limits)[0].headers) == 3  # type: ignore[union-attr]
    exc = error(b"SEND\na:1\nb:2\nc:3\nd:4\n\n\x00", limits=limits)
    assert isinstance(exc, LimitExceeded) and exc.message == "Too many headers: limit max_headers=3"


def test_header_line_limit() -> None:
    limits = Limits(max_header_line_bytes=12)
    assert frames(b"SEND\nabc:12345678\nd:e\n\n\x00", limits=limits)[0].headers["abc"] == "12345678"  # type: ignore[union-attr]
    exc = error(b"SEND\nabc:123456789\n\n\x00", limits=limits)
    assert isinstance(exc, LimitExceeded) and exc.message == "Header too long: limit max_header_line_bytes=12"
    # counted in bytes, not characters: 4 chars * 4 bytes = 16 > 12
    exc = error("SEND\nx:\U0001f600\U0001f600\U0001f600\n\n\x00".encode(), limits=limits)
    assert isinstance(exc, LimitExceeded)
    # 5 characters may be up to 20 bytes, but these are 7: allowed
    assert frames("SEND\nx:ééé\n\n\x00".encode(), limits=limits)[0].headers == {"x": "ééé"}  # type: ignore[union-attr]


def test_switching_the_frame_limit() -> None:
    limits = Limits(max_frame_bytes_before_connect=10)
    parser = FrameParser(limits, frame_limit="max_frame_bytes_before_connect")
    parser.use_frame_limit("max_frame_bytes")
    assert parser.feed(SEND)[0] == Frame("SEND", {"destination": "/queue/a"}, b"hello")
    parser = FrameParser(limits, frame_limit="max_frame_bytes_before_connect")
    exc = parser.feed(SEND)[0]
    assert isinstance(exc, LimitExceeded) and exc.message == "Frame too large: limit max_frame_bytes_before_connect=10"


def test_a_large_body_is_gathered_from_its_chunks_and_copied_once() -> None:
    """A body of gather_min bytes or more, with its content-length, is kept as the chunks that bring it and joined
    once; the bytes after its NUL (here the next frame) go on as usual. Same frames as one chunk gives."""
    from stomp_core.parser import GATHER_MIN

    body = bytes(range(256)) * (GATHER_MIN // 256) + b"\x00tail"
    wire = b"SEND\ndestination:/q\ncontent-length:%d\n\n" % len(body) + body + b"\x00\nSEND\ndestination:/r\n\nnext\x00"
    parser = FrameParser(version="1.2")
    third = len(wire) // 3
    assert parser.feed(wire[:third]) == []
    assert parser.buffered == third - wire.index(b"\n\n") - 2  # the head is parsed; the body's start is held
    assert parser.feed(bytearray(wire[third : 2 * third])) == []  # a mutable chunk is copied, not kept
    assert parser.buffered == 2 * third - wire.index(b"\n\n") - 2
    frames = parser.feed(wire[2 * third :])
    assert frames == [
        Frame("SEND", {"destination": "/q", "content-length": str(len(body))}, body),
        Frame("SEND", {"destination": "/r"}, b"next"),
    ]
    assert parser.buffered == 0
    assert FrameParser(version="1.2").feed(wire) == frames


def test_a_gathered_body_not_followed_by_a_nul_is_an_error() -> None:
    from stomp_core.parser import GATHER_MIN

    wire = b"SEND\ndestination:/q\nreceipt:r\ncontent-length:%d\n\n" % GATHER_MIN + b"x" * GATHER_MIN + b"y\x00"
    parser = FrameParser(version="1.2")
    assert parser.feed(wire[:100]) == []
    (error,) = parser.feed(wire[100:])
    assert isinstance(error, ProtocolError) and error.receipt_id == "r"
    assert error.detail == f"content-length {GATHER_MIN} is not followed by a NUL"
    assert parser.feed(b"\n") == [] and parser.failed is error
