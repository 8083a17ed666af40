"""Hypothesis properties: any input is parsed or rejected with a documented error; serialize-then-parse is the
identity; chunking never changes the result."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stomp_core import Frame, FrameParser, ProtocolError, ProtocolViolation, ServerConnection, serialize
from stomp_core.parser import GATHER_MIN
from stomp_core.escaping import RAW_COMMANDS
from stomp_core.frame import CLIENT_COMMANDS, SERVER_COMMANDS

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DOCUMENTED = {
    "Invalid frame",
    "Invalid header",
    "Bad command",
    "Bad CONNECT",
    "Missing header",
    "Version mismatch",
    "Invalid frame order",
}
LIMIT_PREFIXES = ("Frame too large: limit ", "Body too large: limit ", "Too many headers: limit ", "Header too long: limit ")

TOKENS = [
    b"CONNECT\n", b"STOMP\n", b"SEND\n", b"SUBSCRIBE\n", b"ACK\n", b"NACK\n", b"BEGIN\n", b"DISCONNECT\n",
    b"accept-version:1.0,1.1,1.2\n", b"accept-version:1.1\n", b"heart-beat:10,10\n", b"destination:/q\n", b"id:1\n",
    b"message-id:1\n", b"subscription:1\n", b"transaction:t\n", b"receipt:r\n", b"content-length:", b"3", b"-1",
    b"\n", b"\r\n", b"\r", b"\x00", b":", b"\\", b"\\c", b"\\r", b"ack:client\n", b"\xff",
]
noisy_bytes = st.lists(st.sampled_from(TOKENS) | st.binary(max_size=6), max_size=40).map(b"".join)


def documented(message: str) -> bool:
    return message in DOCUMENTED or message.startswith(LIMIT_PREFIXES)


@SETTINGS
@given(prefix=st.sampled_from([b"", b"CONNECT\n\n\x00", b"CONNECT\naccept-version:1.2\n\n\x00"]), data=noisy_bytes)
def test_server_never_raises(prefix: bytes, data: bytes) -> None:
    conn = ServerConnection()
    events = list(conn.receive_data(prefix))
    if prefix:
        conn.accept(session="s")
    events += conn.receive_data(data)
    for i, event in enumerate(events):
        if isinstance(event, ProtocolViolation):
            assert i == len(events) - 1
            assert documented(event.message), event
            assert not conn.closed and conn.receive_data(b"SEND\ndestination:/q\n\n\x00") == []
            conn.send_violation(event)
            assert conn.closed
            assert conn.data_to_send().endswith(b"\x00")


@SETTINGS
@given(data=st.binary(max_size=300))
def test_server_never_raises_on_random_bytes(data: bytes) -> None:
    conn = ServerConnection()
    events = conn.receive_data(data)
    assert all(not isinstance(e, ProtocolViolation) or documented(e.message) for e in events)


def _header_text(version: str, raw: bool, name: bool) -> st.SearchStrategy[str]:
    forbidden = "\x00"  # no version carries a NUL in a header
    if raw or version == "1.0":
        forbidden += "\r\n" + (":" if name else "")
    elif version == "1.1":
        forbidden += "\r"
    alphabet = st.characters(blacklist_categories=("Cs",), blacklist_characters=forbidden)
    text = st.text(alphabet, min_size=1 if name else 0, max_size=12)
    if version == "1.0" and not raw and not name:
        text = text.filter(lambda v: v == v.strip(" \t"))
    if name:
        text = text.filter(lambda v: v != "content-length")
    return text


@st.composite
def frames(draw: st.DrawFn, version: str) -> Frame:
    command = draw(st.sampled_from(sorted(CLIENT_COMMANDS | SERVER_COMMANDS)))
    raw = command in RAW_COMMANDS
    headers = draw(
        st.dictionaries(_header_text(version, raw, True), _header_text(version, raw, False), max_size=6)
    )
    body = draw(st.binary(max_size=40))
    return Frame(command, headers, body)


def expected(frame: Frame) -> Frame:
    headers = dict(frame.headers)
    if frame.body or frame.command in ("SEND", "MESSAGE", "ERROR"):
        headers["content-length"] = str(len(frame.body))
    return Frame(frame.command, headers, frame.body)


@SETTINGS
@given(data=st.data(), version=st.sampled_from(["1.0", "1.1", "1.2"]))
def test_serialize_then_parse_is_identity(data: st.DataObject, version: str) -> None:
    frame = data.draw(frames(version))
    (parsed,) = FrameParser(version=version).feed(serialize(frame, version))
    want = expected(frame)
    assert parsed == want
    assert isinstance(parsed, Frame) and list(parsed.headers) == list(want.headers)


@SETTINGS
@given(
    data=st.data(),
    version=st.sampled_from(["1.0", "1.1", "1.2"]),
    noise=st.lists(st.sampled_from([b"", b"\n", b"\r\n", b"\x00\n"]), min_size=1, max_size=6),
    tail=st.binary(max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
    gather_min=st.sampled_from([GATHER_MIN, 0, 1, 7]),
    mutable=st.booleans(),
)
def test_chunking_does_not_change_the_result(
    data: st.DataObject, version: str, noise: list[bytes], tail: bytes, cuts: list[int], gather_min: int, mutable: bool
) -> None:
    """Also with large bodies gathered (``gather_min`` lowered so that the drawn bodies are large), and with chunks
    given as bytearrays the caller then overwrites."""
    stream = b"".join(serialize(data.draw(frames(version)), version) + n for n in noise) + tail
    whole = FrameParser(version=version).feed(stream)
    parser = FrameParser(version=version)
    parser.gather_min = gather_min
    pieces: list[Frame | ProtocolError] = []
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, stop in zip(bounds, bounds[1:]):
        chunk = bytearray(stream[start:stop]) if mutable else stream[start:stop]
        pieces += parser.feed(chunk)  # type: ignore[arg-type]
        if mutable:
            chunk[:] = b"\xff" * len(chunk)
        assert parser.buffered <= len(stream)

    def key(items: list[Frame | ProtocolError]) -> list[object]:
        return [(x.message, x.detail) if isinstance(x, ProtocolError) else x for x in items]

    assert key(pieces) == key(whole)
    assert sum(isinstance(x, Frame) for x in whole) >= len(noise)
