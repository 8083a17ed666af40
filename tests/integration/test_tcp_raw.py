"""Raw-socket tests of the parsing edges and the error rules, against a real gateway process."""

from __future__ import annotations

import time
import uuid

import pytest

from collections.abc import Callable, Iterator

from tests.gateway_process import Gateway
from tests.integration.conftest import SQL_STORES, gateway_on
from tests.raw_stomp import RawClient

Raw = Callable[[], RawClient]

@pytest.fixture(scope="module", params=SQL_STORES)
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """This module's behaviour runs on each SQL store."""
    yield from gateway_on(request.param, request, tmp_path_factory)


def q() -> str:
    return f"/queue/raw{uuid.uuid4().hex[:10]}"


def test_byte_at_a_time(raw: Raw) -> None:
    c = raw()
    dest = q()
    data = (
        b"CONNECT\naccept-version:1.2\nhost:/\n\n\x00"
        + f"SUBSCRIBE\nid:1\ndestination:{dest}\n\n\x00".encode()
        + f"SEND\ndestination:{dest}\nreceipt:r1\n\nhello\x00".encode()
    )
    for b in data:
        c.send(bytes([b]))
    assert c.read().command == "CONNECTED"
    frames = [c.read(), c.read()]
    commands = sorted(f.command for f in frames)
    assert commands == ["MESSAGE", "RECEIPT"]
    message = next(f for f in frames if f.command == "MESSAGE")
    assert message.body == b"hello"
    c.close()


def test_several_frames_in_one_packet_with_crlf_and_heartbeats(raw: Raw) -> None:
    c = raw()
    dest = q()
    c.send(
        b"\r\n\n"
        b"CONNECT\r\naccept-version:1.2\r\nhost:/\r\n\r\n\x00\r\n\n"
        + f"SEND\r\ndestination:{dest}\r\n\r\none\x00\n\n".encode()
        + f"SEND\ndestination:{dest}\nreceipt:last\n\ntwo\x00".encode()
        + f"SUBSCRIBE\nid:s\ndestination:{dest}\n\n\x00".encode()
    )
    assert c.read().command == "CONNECTED"
    got = [c.read() for _ in range(3)]
    assert [f.body for f in got if f.command == "MESSAGE"] == [b"one", b"two"]
    assert [f.headers["receipt-id"] for f in got if f.command == "RECEIPT"] == ["last"]
    c.close()


def test_nul_bytes_in_a_content_length_body(raw: Raw) -> None:
    c = raw()
    c.connect()
    dest = q()
    body = b"a\x00b\x00\x00c" + bytes(range(256))
    c.send(f"SEND\ndestination:{dest}\ncontent-length:{len(body)}\ncontent-type:application/octet-stream\n\n".encode() + body + b"\x00")
    c.frame("SUBSCRIBE", {"id": "s", "destination": dest})
    m = c.read()
    assert m.command == "MESSAGE"
    assert m.body == body
    assert m.headers["content-length"] == str(len(body))
    assert m.headers["content-type"] == "application/octet-stream"
    c.close()


@pytest.mark.parametrize(
    ("version", "raw_value", "expected_wire"),
    [
        ("1.0", "a\\cb", "a\\cb"),  # 1.0: no escaping at all
        ("1.1", "line1\\nline2\\c\\\\", "line1\\nline2\\c\\\\"),
        ("1.2", "cr\\rlf\\n", "cr\\rlf\\n"),
    ],
)
def test_header_escaping_round_trips_per_version(raw: Raw, version: str, raw_value: str, expected_wire: str) -> None:
    c = raw()
    c.connect(version)
    dest = q()
    c.send(f"SEND\ndestination:{dest}\nx-custom:{raw_value}\n\nbody\x00".encode())
    c.frame("SUBSCRIBE", {"id": "s", "destination": dest, "ack": "auto"})
    m = c.read()
    assert m.command == "MESSAGE"
    assert m.headers["x-custom"] == expected_wire
    c.close()


def test_frame_before_connect_is_an_error(raw: Raw) -> None:
    c = raw()
    c.frame("SEND", {"destination": q(), "receipt": "r9"}, b"x")
    err = c.read()
    assert err.command == "ERROR"
    assert err.headers["message"]
    assert err.headers.get("receipt-id") == "r9"
    assert c.closed_by_peer()


def test_version_mismatch(raw: Raw) -> None:
    c = raw()
    c.frame("CONNECT", {"accept-version": "2.0,3.1", "host": "/"})
    err = c.read()
    assert err.command == "ERROR"
    assert err.headers["version"] == "1.0,1.1,1.2"
    assert c.closed_by_peer()


def test_no_accept_version_means_1_0_and_stomp_command_accepted(raw: Raw) -> None:
    c = raw()
    c.frame("CONNECT", {"login": "x"})
    assert c.read().headers["version"] == "1.0"
    c.close()
    s = raw()
    s.frame("STOMP", {"accept-version": "1.1,1.2", "host": "/"})
    assert s.read().headers["version"] == "1.2"
    s.close()


def test_oversized_frame_gets_an_error_naming_the_limit_and_others_carry_on(raw: Raw) -> None:
    bystander = raw()
    bystander.connect()
    dest = q()
    bystander.frame("SUBSCRIBE", {"id": "s", "destination": dest})
    c = raw()
    c.connect()
    c.send(f"SEND\ndestination:{dest}\n\n".encode() + b"x" * (4 * 1024 * 1024 + 10) + b"\x00")
    err = c.read(timeout=10)
    assert err.command == "ERROR"
    assert "max_" in (err.headers["message"] + err.body.decode())
    assert c.closed_by_peer()
    bystander.frame("SEND", {"destination": dest}, b"still fine")
    assert bystander.read().body == b"still fine"
    bystander.close()


def test_too_many_headers_and_too_long_header(raw: Raw) -> None:
    c = raw()
    c.connect()
    c.frame("SEND", {"destination": q(), **{f"h{i}": "v" for i in range(200)}})
    err = c.read()
    assert err.command == "ERROR" and "max_headers" in err.headers["message"] + err.body.decode()
    d = raw()
    d.connect()
    d.frame("SEND", {"destination": q(), "big": "v" * 20000})
    err = d.read()
    assert err.command == "ERROR" and "max_header_line_bytes" in err.headers["message"] + err.body.decode()


def test_pre_connect_frame_limit_is_smaller(raw: Raw) -> None:
    c = raw()
    c.send(b"CONNECT\naccept-version:1.2\n" + b"".join(f"h{i}:{'v' * 1000}\n".encode() for i in range(80)) + b"\n\x00")
    err = c.read()
    assert err.command == "ERROR"
    assert "before_connect" in err.headers["message"] + err.body.decode()


def test_disconnect_receipt_then_close(raw: Raw) -> None:
    c = raw()
    c.connect()
    dest = q()
    c.frame("SEND", {"destination": dest}, b"x")
    c.frame("DISCONNECT", {"receipt": "bye"})
    r = c.read()
    assert r.command == "RECEIPT" and r.headers["receipt-id"] == "bye"
    assert c.closed_by_peer()


def test_error_carries_receipt_id_of_the_bad_frame(raw: Raw) -> None:
    c = raw()
    c.connect()
    c.frame("SEND", {"destination": "/nowhere/x", "receipt": "r-bad"}, b"x")
    err = c.read()
    assert err.command == "ERROR"
    assert err.headers["receipt-id"] == "r-bad"
    assert err.headers["message"] == "Invalid destination"
    assert c.closed_by_peer()


def test_silent_client_is_dropped_after_missing_heartbeats(raw: Raw) -> None:
    c = raw()
    connected = c.connect(**{"heart-beat": "500,0"})  # promises a beat every 500 ms, then stays silent
    assert connected.headers["heart-beat"].split(",")[1] != "0"  # the server does want to hear from it
    started = time.monotonic()
    err = c.read(timeout=10)
    assert err.command == "ERROR" and "Heart-beat" in err.headers["message"]
    assert c.closed_by_peer()
    assert time.monotonic() - started < 8


def test_server_sends_heartbeats_when_asked(raw: Raw) -> None:
    c = raw()
    c.connect(**{"heart-beat": "0,500"})
    c.sock.settimeout(3)
    data = c.sock.recv(10)
    assert data.strip(b"\r\n") == b"" and data  # only EOLs
    c.close()


def test_duplicate_subscription_id(raw: Raw) -> None:
    c = raw()
    c.connect()
    c.frame("SUBSCRIBE", {"id": "same", "destination": q()})
    c.frame("SUBSCRIBE", {"id": "same", "destination": q()})
    err = c.read()
    assert err.command == "ERROR" and err.headers["message"] == "Duplicated subscription identifier"
