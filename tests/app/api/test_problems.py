"""Every error is RFC 9457 problem JSON: routing misses, wrong methods, validation and unhandled failures."""

from __future__ import annotations

import pytest

from app.api import install
from tests.app.api.conftest import Api, api_client
from tests.app.api.test_publish import assert_problem


async def test_404_405_422(api: Api) -> None:
    problem = assert_problem(await api.client.get("/no/such/route"), 404)
    assert problem["instance"] == "/no/such/route"
    assert_problem(await api.client.put("/destinations"), 405)
    problem = assert_problem(await api.client.get("/messages/queue/q", params={"limit": "many"}), 422, "validation")
    assert problem["errors"][0]["loc"] == ["query", "limit"]


async def test_405_allows_every_method_of_the_path(api: Api) -> None:
    # Each method of a path is its own route: the answer names them all, not the first route's.
    for method, path, allowed in [
        ("PUT", "/destinations/queue/a", {"GET", "POST"}),
        ("POST", "/messages/queue/a", {"GET", "DELETE"}),
        ("DELETE", "/destinations", {"GET"}),
    ]:
        response = await api.client.request(method, path)
        assert_problem(response, 405)
        assert set(response.headers["allow"].split(", ")) == allowed, (method, path)


async def test_unhandled_error_is_a_500_problem(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async with api_client(raise_app_exceptions=False) as api:

        async def broken() -> list[str]:
            raise RuntimeError("boom")

        monkeypatch.setattr(api.broker.datasource.queues, "destinations", broken)
        problem = assert_problem(await api.client.get("/destinations"), 500, "internal")
        assert "boom" not in problem["detail"]  # internals stay in the log
        assert "boom" in caplog.text


async def test_install_is_idempotent(api: Api) -> None:
    routes = len(api.app.routes)
    install(api.app)
    assert len(api.app.routes) == routes
