"""POST /destinations/{kind}/{name}: raw bodies with X-Stomp-* headers, JSON envelopes, and every refusal."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from app.datasources.interface import DatasourceUnavailable
from tests.app.api.conftest import Api, api_client

ENVELOPE = "application/vnd.stompgate.envelope+json"


async def backlog(api: Api, path: str = "queue/orders") -> list[dict[str, Any]]:
    response = await api.client.get(f"/messages/{path}")
    assert response.status_code == 200, response.text
    result: list[dict[str, Any]] = response.json()
    return result


def assert_problem(response: Any, status: int, slug: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail", "instance"} <= problem.keys()
    assert problem["status"] == status
    if slug is not None:
        assert problem["type"] == f"urn:stompgate:problem:{slug}"
    return problem


async def test_raw_body_with_stomp_headers(api: Api) -> None:
    response = await api.client.post(
        "/destinations/queue/orders",
        content="héllo".encode(),
        headers={"Content-Type": "text/plain; charset=utf-8", "X-Stomp-Priority": "7", "X-Stomp-Region": "eu"},
    )
    assert response.status_code == 201, response.text
    published = response.json()
    assert published["destination"] == "/queue/orders"
    assert response.headers["location"] == "/destinations/queue/orders"
    (message,) = await backlog(api)
    assert message["message_id"] == published["message_id"]
    assert message["body"] == "héllo"
    assert message["priority"] == 7
    assert message["headers"] == {"priority": "7", "region": "eu", "content-type": "text/plain; charset=utf-8"}


async def test_the_answer_comes_after_the_message_is_stored(api: Api) -> None:
    response = await api.client.post("/destinations/queue/orders", content=b"x")
    assert response.status_code == 201
    stats = await api.broker.datasource.queues.stats("/queue/orders", now_ms=api.broker.now_ms())
    assert stats.ready == 1


async def test_names_may_hold_slashes_and_topics_work_too(api: Api) -> None:
    response = await api.client.post("/destinations/queue/eu/orders", content=b"x")
    assert response.json()["destination"] == "/queue/eu/orders"
    assert len(await backlog(api, "queue/eu/orders")) == 1
    response = await api.client.post("/destinations/topic/prices.eu", content=b"1.5")
    assert response.status_code == 201
    assert response.json()["destination"] == "/topic/prices.eu"


async def test_envelope_utf8_and_base64(api: Api) -> None:
    payload = {"headers": {"priority": "9", "content-type": "application/json"}, "body": '{"id": 1}'}
    response = await api.client.post(
        "/destinations/queue/orders", content=json.dumps(payload), headers={"Content-Type": ENVELOPE}
    )
    assert response.status_code == 201, response.text
    binary = bytes(range(256))
    payload = {"body": base64.b64encode(binary).decode(), "body_encoding": "base64"}
    response = await api.client.post(
        "/destinations/queue/orders", content=json.dumps(payload), headers={"Content-Type": ENVELOPE}
    )
    assert response.status_code == 201, response.text
    first, second = await backlog(api)
    assert first["headers"] == {"priority": "9", "content-type": "application/json"}
    assert first["body"] == '{"id": 1}'
    assert second["body_encoding"] == "base64"
    assert base64.b64decode(second["body"]) == binary


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"body": 1}', b'{"bogus": true}', b'{"body": "***", "body_encoding": "base64"}'],
)
async def test_bad_envelope_is_a_400(api: Api, content: bytes) -> None:
    response = await api.client.post("/destinations/queue/orders", content=content, headers={"Content-Type": ENVELOPE})
    assert_problem(response, 400, "invalid-envelope")


@pytest.mark.parametrize("path", ["queue/bad%20name", "queue/", "queue/trailing/"])
async def test_invalid_destination_is_a_400(api: Api, path: str) -> None:
    assert_problem(await api.client.post(f"/destinations/{path}", content=b"x"), 400, "invalid-destination")


async def test_unknown_kind_is_a_422(api: Api) -> None:
    assert_problem(await api.client.post("/destinations/exchange/x", content=b"x"), 422, "validation")


@pytest.mark.parametrize("headers", [{"X-Stomp-Priority": "99"}, {"X-Stomp-Expiration": "soon"}])
async def test_invalid_header_is_a_400(api: Api, headers: dict[str, str]) -> None:
    assert_problem(await api.client.post("/destinations/queue/orders", content=b"x", headers=headers), 400, "invalid-header")


async def test_envelope_header_with_newline_is_a_400(api: Api) -> None:
    payload = {"headers": {"a": "b\nc"}, "body": ""}
    response = await api.client.post("/destinations/queue/orders", content=json.dumps(payload), headers={"Content-Type": ENVELOPE})
    assert_problem(response, 400, "invalid-header")


async def test_over_max_frame_bytes_is_a_413() -> None:
    async with api_client(max_frame_bytes=2048) as api:
        assert_problem(await api.client.post("/destinations/queue/orders", content=b"x" * 2049), 413, "too-large")

        async def chunks() -> Any:  # no Content-Length: the limit holds while streaming
            for _ in range(5):
                yield b"y" * 1000

        assert_problem(await api.client.post("/destinations/queue/orders", content=chunks()), 413, "too-large")
        payload = {"headers": {"h": "v" * 100}, "body": "z" * 2049}
        response = await api.client.post("/destinations/queue/orders", content=json.dumps(payload), headers={"Content-Type": ENVELOPE})
        assert_problem(response, 413, "too-large")
        # the limit is the body's, as on STOMP: a body of exactly max_frame_bytes fits beside its headers
        payload = {"headers": {"h": "v" * 100}, "body": "z" * 2048}
        response = await api.client.post("/destinations/queue/orders", content=json.dumps(payload), headers={"Content-Type": ENVELOPE})
        assert response.status_code == 201, response.text
        response = await api.client.post("/destinations/queue/orders", content=b"x" * 2048, headers={"X-Stomp-h": "v" * 100})
        assert response.status_code == 201, response.text
        assert await backlog(api) != []


async def test_datasource_down_is_a_503_with_retry_after(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    async def down(*args: Any, **kwargs: Any) -> Any:
        raise DatasourceUnavailable("no primary")

    monkeypatch.setattr(api.broker, "publish", down)
    response = await api.client.post("/destinations/queue/orders", content=b"x")
    problem = assert_problem(response, 503, "datasource-unavailable")
    assert response.headers["retry-after"] == "5"
    assert "no primary" in problem["detail"]
