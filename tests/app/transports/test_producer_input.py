"""What producers may not say: broker-set delivery headers and destination names that hide another destination.

Against a real uvicorn (``live_app``), with raw STOMP sockets and httpx over the network.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import httpx
import pytest

from tests.app.transports.live_app import LiveApp, live_app
from tests.raw_stomp import RawClient
from tests.raw_http import raw_http

_names = itertools.count(1)

# Headers only the broker sets on a delivery: a producer's values must never reach a consumer.
FORGED = {
    "redelivered": "true",
    "x-delivery-count": "9",
    "x-original-destination": "/queue/somewhere-else",
    "x-missed-from": "1",
    "x-missed-to": "99",
}


def unique(kind: str = "queue") -> str:
    return f"/{kind}/producer-input-{next(_names)}"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    with live_app(tmp_path_factory.mktemp("producer-input"), heartbeat_ms=0) as live:
        yield live


@pytest.fixture
def stomp(gateway: LiveApp) -> Iterator[RawClient]:
    client = RawClient(gateway.stomp_port)
    client.connect()
    yield client
    client.close()


def consume_one(gateway: LiveApp, destination: str) -> dict[str, str]:
    consumer = RawClient(gateway.stomp_port)
    try:
        consumer.connect()
        consumer.frame("SUBSCRIBE", {"id": "s", "destination": destination, "ack": "client-individual"})
        message = consumer.read()
        assert message.command == "MESSAGE", message
        return message.headers
    finally:
        consumer.close()


def assert_first_delivery(headers: dict[str, str], destination: str) -> None:
    assert headers.get("redelivered") == "false", headers  # the gateway's own value, not the forged "true"
    for name in FORGED:
        if name != "redelivered":
            assert name not in headers, f"forged {name!r} reached the consumer: {headers}"
    assert headers["destination"] == destination
    assert headers["kept"] == "yes"  # application headers still travel


def test_stomp_send_cannot_forge_delivery_headers(gateway: LiveApp, stomp: RawClient) -> None:
    destination = unique()
    stomp.frame("SEND", {"destination": destination, "receipt": "r", "kept": "yes", **FORGED}, b"forged?")
    assert stomp.read().command == "RECEIPT"
    assert_first_delivery(consume_one(gateway, destination), destination)


def test_rest_raw_publish_cannot_forge_delivery_headers(gateway: LiveApp) -> None:
    destination = unique()
    headers = {f"X-Stomp-{name}": value for name, value in {**FORGED, "kept": "yes"}.items()}
    response = httpx.post(f"{gateway.http_url}/destinations{destination}", content=b"forged?", headers=headers)
    assert response.status_code == 201, response.text
    assert_first_delivery(consume_one(gateway, destination), destination)


def test_rest_envelope_publish_cannot_forge_delivery_headers(gateway: LiveApp) -> None:
    destination = unique()
    response = httpx.post(
        f"{gateway.http_url}/destinations{destination}",
        json={"headers": {**FORGED, "kept": "yes", "message-id": "forged-id"}, "body": "forged?"},
        headers={"Content-Type": "application/vnd.stompgate.envelope+json"},
    )
    assert response.status_code == 201, response.text
    headers = consume_one(gateway, destination)
    assert_first_delivery(headers, destination)
    assert headers["message-id"] != "forged-id"


def test_rest_publish_refuses_a_destination_header(gateway: LiveApp) -> None:
    """The URL names the destination; an X-Stomp-destination (or an envelope's destination) naming another was
    dropped without a word, so the sender believed it had published there."""
    destination = unique()
    raw = httpx.post(
        f"{gateway.http_url}/destinations{destination}", content=b"x", headers={"X-Stomp-destination": "/queue/other"}
    )
    envelope = httpx.post(
        f"{gateway.http_url}/destinations{destination}",
        json={"headers": {"destination": "/queue/other"}, "body": "x"},
        headers={"Content-Type": "application/vnd.stompgate.envelope+json"},
    )
    for response in (raw, envelope):
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "destination" in response.json()["detail"]


# ---- destination names ----

BAD_NAMES = ["/queue/orders/../reports", "/queue/orders/./reports", "/queue/orders//reports", "/topic/orders/.."]


@pytest.mark.parametrize("destination", BAD_NAMES)
def test_stomp_send_to_a_dot_segment_destination_is_an_error(gateway: LiveApp, destination: str) -> None:
    client = RawClient(gateway.stomp_port)
    try:
        client.connect()
        client.frame("SEND", {"destination": destination, "receipt": "r"}, b"x")
        error = client.read()
        assert (error.command, error.headers["message"]) == ("ERROR", "Invalid destination")
        assert error.headers["receipt-id"] == "r"
        assert client.closed_by_peer()
    finally:
        client.close()


def test_stomp_subscribe_to_a_dot_segment_destination_is_an_error(gateway: LiveApp) -> None:
    client = RawClient(gateway.stomp_port)
    try:
        client.connect()
        client.frame("SUBSCRIBE", {"id": "s", "destination": "/queue/orders/../reports"})
        error = client.read()
        assert (error.command, error.headers["message"]) == ("ERROR", "Invalid destination")
        assert client.closed_by_peer()
    finally:
        client.close()


def test_stomp_destination_with_an_escaped_control_character_is_an_error(gateway: LiveApp) -> None:
    """STOMP 1.2 escapes let a header value hold a newline: the name must still be refused."""
    client = RawClient(gateway.stomp_port)
    try:
        client.connect("1.2")
        client.send(b"SEND\ndestination:/queue/a\\nb\nreceipt:r\n\nx\x00")
        error = client.read()
        assert (error.command, error.headers["message"]) == ("ERROR", "Invalid destination")
    finally:
        client.close()


@pytest.mark.parametrize(
    "path",
    [
        "/destinations/queue/orders/../reports",
        "/destinations/queue/orders/%2E%2E/reports",
        "/destinations/queue/orders/./reports",
        "/destinations/queue/orders//reports",
        "/destinations/queue/orders/%00x",
        "/destinations/queue/orders%1Fx",
        "/destinations/topic/orders/%7F",
    ],
)
def test_rest_publish_to_a_bad_name_is_a_400_problem(gateway: LiveApp, path: str) -> None:
    request = f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx".encode()
    status, headers, body = raw_http(gateway.http_port, request)
    assert status == 400, body
    assert headers["content-type"] == "application/problem+json"
    assert b"invalid-destination" in body
