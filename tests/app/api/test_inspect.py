"""GET /destinations, backlog peeks with selectors, purge, /connections and /subscriptions with a live STOMP client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.app.api.conftest import Api
from tests.app.api.test_publish import assert_problem


async def publish(api: Api, path: str, body: bytes = b"x", **headers: str) -> None:
    stomp_headers = {f"X-Stomp-{k}": v for k, v in headers.items()}
    response = await api.client.post(f"/destinations/{path}", content=body, headers=stomp_headers)
    assert response.status_code == 201, response.text


class StompClient:
    """Just enough STOMP 1.2 over asyncio streams to hold a connection and a subscription open."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def frame(self, command: str, **headers: str) -> None:
        lines = [command, *(f"{k}:{v}" for k, v in headers.items())]
        self.writer.write(("\n".join(lines) + "\n\n").encode() + b"\0")
        await self.writer.drain()

    async def read(self) -> bytes:
        data = await asyncio.wait_for(self.reader.readuntil(b"\0"), 5)
        return data.lstrip(b"\r\n")


@pytest.fixture
async def stomp(api: Api) -> AsyncIterator[StompClient]:
    reader, writer = await asyncio.open_connection("127.0.0.1", api.state["stomp_port"])
    client = StompClient(reader, writer)
    await client.frame("CONNECT", **{"accept-version": "1.2", "host": "/", "login": "carol", "client-id": "c1"})
    assert (await client.read()).startswith(b"CONNECTED")
    yield client
    writer.close()
    await writer.wait_closed()


async def test_list_and_get_destinations(api: Api) -> None:
    await publish(api, "queue/a")
    await publish(api, "queue/a")
    await publish(api, "queue/b")
    listed = (await api.client.get("/destinations")).json()
    assert [d["destination"] for d in listed] == ["/queue/a", "/queue/b"]
    a = listed[0]
    assert a == {
        "destination": "/queue/a", "kind": "queue", "name": "a", "depth": 2, "unacked": 0, "consumers": 0,
        "publish_rate": a["publish_rate"], "deliver_rate": 0.0,
    }  # fmt: skip
    one = (await api.client.get("/destinations/queue/a")).json()
    assert one["depth"] == 2


async def test_an_unknown_destination_is_a_404_that_says_why(api: Api) -> None:
    problem = assert_problem(await api.client.get("/destinations/topic/never.used"), 404, "unknown-destination")
    assert "no subscribers" in problem["detail"]
    # Where the backlog used to be: the answer points at where it is now.
    await publish(api, "queue/jobs")
    problem = assert_problem(await api.client.get("/destinations/queue/jobs/messages"), 404, "unknown-destination")
    assert "/messages/queue/jobs" in problem["detail"]


async def test_a_name_ending_in_messages_is_a_destination_like_any_other(api: Api) -> None:
    # The name is always the last part of a URL, so no name can be mistaken for a route of another.
    await publish(api, "queue/orders/messages", b"m")
    info = (await api.client.get("/destinations/queue/orders/messages")).json()
    assert (info["destination"], info["depth"]) == ("/queue/orders/messages", 1)
    assert [m["body"] for m in (await api.client.get("/messages/queue/orders/messages")).json()] == ["m"]
    assert (await api.client.get("/messages/queue/orders")).json() == []


async def test_peek_pages_and_filters(api: Api) -> None:
    for i in range(5):
        await publish(api, "queue/jobs", str(i).encode(), priority=str(4 + (i == 3)), n=str(i))
    bodies = [m["body"] for m in (await api.client.get("/messages/queue/jobs")).json()]
    assert bodies == ["3", "0", "1", "2", "4"]  # priority first, then FIFO
    page = (await api.client.get("/messages/queue/jobs", params={"limit": 2, "offset": 1})).json()
    assert [m["body"] for m in page] == ["0", "1"]
    selected = (await api.client.get("/messages/queue/jobs", params={"selector": "n >= 2"})).json()
    assert [m["body"] for m in selected] == ["3", "2", "4"]
    selected = (await api.client.get("/messages/queue/jobs", params={"selector": '{"n": "1"}'})).json()
    assert [m["body"] for m in selected] == ["1"]


async def test_bad_selector_and_topics_have_no_backlog(api: Api) -> None:
    response = await api.client.get("/messages/queue/jobs", params={"selector": "n >"})
    problem = assert_problem(response, 400, "invalid-selector")
    assert "position" in problem["detail"]
    assert_problem(await api.client.get("/messages/topic/t"), 400, "not-a-queue")
    assert_problem(await api.client.delete("/messages/topic/t"), 400, "not-a-queue")


async def test_purge(api: Api) -> None:
    await publish(api, "queue/trash")
    await publish(api, "queue/trash")
    response = await api.client.delete("/messages/queue/trash")
    assert response.json() == {"destination": "/queue/trash", "purged": 2}
    assert (await api.client.get("/messages/queue/trash")).json() == []


async def test_connections_subscriptions_and_deliver_rate(api: Api, stomp: StompClient) -> None:
    await stomp.frame("SUBSCRIBE", id="s1", destination="/queue/work", ack="client-individual", selector="n > 0")
    await stomp.frame("SUBSCRIBE", id="s2", destination="/topic/news")
    connections = (await api.client.get("/connections")).json()
    (conn,) = connections
    assert (conn["transport"], conn["user"], conn["client_id"], conn["stomp_version"]) == ("tcp", "carol", "c1", "1.2")
    assert conn["peer"].startswith("127.0.0.1:")
    for _ in range(50):
        subs = (await api.client.get("/subscriptions")).json()
        if len(subs) == 2:
            break
        await asyncio.sleep(0.02)
    by_id = {s["subscription_id"]: s for s in subs}
    assert by_id["s1"]["destination"] == "/queue/work"
    assert by_id["s1"]["ack"] == "client-individual"
    assert by_id["s1"]["selector"] == "n > 0"
    assert by_id["s2"]["selector"] is None
    await publish(api, "queue/work", b"job", n="1")
    assert b"job" in await stomp.read()
    info = (await api.client.get("/destinations/queue/work")).json()
    assert (info["consumers"], info["depth"], info["unacked"]) == (1, 0, 1)
    assert info["deliver_rate"] > 0
    listed = {d["destination"] for d in (await api.client.get("/destinations")).json()}
    assert {"/queue/work", "/topic/news"} <= listed


async def test_ready(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (await api.client.get("/ready")).json() == {"status": "ready"}
    from app.datasources.interface import DatasourceUnavailable

    async def down() -> None:
        raise DatasourceUnavailable("connection refused")

    monkeypatch.setattr(api.broker.datasource, "ping", down)
    response = await api.client.get("/ready")
    assert_problem(response, 503, "datasource-unavailable")
    assert response.headers["retry-after"] == "5"
    assert (await api.client.get("/health")).status_code == 200


async def test_metrics(api: Api, stomp: StompClient) -> None:
    await publish(api, "queue/m")
    response = await api.client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'stompgate_queue_depth{destination="/queue/m"} 1.0' in text
    assert 'stompgate_queue_unacked{destination="/queue/m"} 0.0' in text
    assert 'stompgate_connections{transport="tcp"} 1.0' in text
    assert "stompgate_datasource_up 1.0" in text
    assert 'stompgate_messages_published_total{kind="queue"} 1.0' in text
