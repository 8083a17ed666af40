"""Malformed HTTP gets RFC 9457 problem JSON too, whether uvicorn's parser or the app notices it.

Raw sockets against a real ``stompgate serve`` process, so the request bytes are exactly the ones written here and
the server is configured as in production.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.app.transports.live_app import LiveApp, live_app
from tests.gateway_process import Gateway, run_gateway
from tests.raw_http import raw_http

PROBLEM_JSON = "application/problem+json"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with run_gateway(tmp_path_factory.mktemp("http-layer"), store="memory://") as gw:
        yield gw


def assert_problem(answer: tuple[int, dict[str, str], bytes], status: int, slug: str) -> dict[str, object]:
    code, headers, body = answer
    assert code == status, body
    assert headers["content-type"] == PROBLEM_JSON, (headers, body)
    assert int(headers["content-length"]) == len(body)
    problem: dict[str, object] = json.loads(body)
    assert problem["type"] == f"urn:stompgate:problem:{slug}"
    assert problem["status"] == status
    assert problem["title"] and problem["detail"]
    return problem


# Requests uvicorn's HTTP parser refuses before the app is called.
PARSER_REJECTS = {
    "control byte in a header value": b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Bad: a\x01b\r\n\r\n",
    "NUL in a header value": b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Bad: a\x00b\r\n\r\n",
    "space in a header name": b"GET /health HTTP/1.1\r\nHost: gw\r\nBad Name: v\r\n\r\n",
    "Content-Length not a number": b"POST /destinations/queue/a HTTP/1.1\r\nHost: gw\r\nContent-Length: abc\r\n\r\nx",
    "two Content-Lengths": b"POST /destinations/queue/a HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
    "bad chunk size": b"POST /destinations/queue/a HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nx\r\n0\r\n\r\n",
    "raw 8-bit byte in the path": b"GET /destinations/queue/a\xff HTTP/1.1\r\nHost: gw\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", PARSER_REJECTS.values(), ids=PARSER_REJECTS.keys())
def test_requests_the_http_parser_refuses_get_problem_json(gateway: Gateway, request_bytes: bytes) -> None:
    code, headers, body = raw_http(gateway.http_port, request_bytes)
    assert_problem((code, headers, body), 400, "invalid-http")
    assert headers["connection"] == "close"


def test_the_parser_problem_names_the_path_when_it_was_read(gateway: Gateway) -> None:
    answer = raw_http(gateway.http_port, b"GET /health?x=1 HTTP/1.1\r\nHost: gw\r\nX-Bad: a\x01b\r\n\r\n")
    assert assert_problem(answer, 400, "invalid-http")["instance"] == "/health"


# Malformed requests the app itself sees: they already were problems, and stay so.
APP_REJECTS = {
    "bad percent-encoding in the path": (
        b"POST /destinations/queue/a%zz HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
        400, "invalid-destination",
    ),
    "percent-encoded byte that is not UTF-8": (
        b"POST /destinations/queue/a%ff HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
        400, "invalid-destination",
    ),
    "envelope that is not JSON": (
        (
            b"POST /destinations/queue/a HTTP/1.1\r\nHost: gw\r\nContent-Type: application/vnd.stompgate.envelope+json\r\n"
            b"Content-Length: 3\r\nConnection: close\r\n\r\n{x:"
        ),
        400, "invalid-envelope",
    ),
    "query parameter that is not a number": (
        b"GET /messages/queue/a?limit=%zz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        422, "validation",
    ),
}  # fmt: skip


@pytest.mark.parametrize(("request_bytes", "status", "slug"), APP_REJECTS.values(), ids=APP_REJECTS.keys())
def test_malformed_requests_the_app_sees_are_problems(gateway: Gateway, request_bytes: bytes, status: int, slug: str) -> None:
    assert_problem(raw_http(gateway.http_port, request_bytes), status, slug)


def test_no_traceback_in_the_log(gateway: Gateway) -> None:
    raw_http(gateway.http_port, PARSER_REJECTS["control byte in a header value"])
    assert "Traceback" not in gateway.log()


def test_a_client_that_leaves_mid_body_is_logged_in_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A body shorter than its Content-Length, then EOF: the client's doing, one log line and no traceback."""
    caplog.set_level(logging.INFO)
    live: LiveApp
    with live_app(tmp_path) as live:
        with socket.create_connection(("127.0.0.1", live.http_port), timeout=5) as sock:
            sock.sendall(b"POST /destinations/queue/short HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\nx")
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        deadline = time.monotonic() + 10
        while not any("before sending the whole request" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.01)  # polling for the log record (the event), not sleeping in its place
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
