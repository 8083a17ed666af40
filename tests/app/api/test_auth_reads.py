"""With a users file, the read-only surfaces follow the REST API's auth (hardening issue, item 8): ``/metrics`` needs
the ``metrics`` or ``admin`` role, the API documents need any user, the console's API needs ``admin``; the console's
page and assets, ``/health`` and ``/ready`` stay open."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.app.api.conftest import Api, api_client
from tests.app.api.test_publish import assert_problem
from tests.app.api.users import BOB_TOKEN, ROOT_TOKEN, write_users_file

SCRAPER_TOKEN = "scraper-token-0123456789"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Api]:
    users = write_users_file(tmp_path)
    digest = hashlib.sha256(SCRAPER_TOKEN.encode()).hexdigest()
    with users.open("a") as fh:
        fh.write(f'\n[[users]]\nname = "prometheus"\ntoken_hashes = ["sha256:{digest}"]\nroles = ["metrics"]\n')
    async with api_client(users_file=str(users)) as api:
        yield api


async def assert_unauthorized(api: Api, path: str) -> None:
    response = await api.client.get(path)
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_metrics_need_the_metrics_or_admin_role(secured: Api) -> None:
    await assert_unauthorized(secured, "/metrics")
    assert_problem(await secured.client.get("/metrics", headers=bearer(BOB_TOKEN)), 403, "forbidden")
    for token in (SCRAPER_TOKEN, ROOT_TOKEN):
        response = await secured.client.get("/metrics", headers=bearer(token))
        assert response.status_code == 200, response.text
        assert "stompgate_queue_depth" in response.text


async def test_api_documents_need_a_user(secured: Api) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        await assert_unauthorized(secured, path)
        assert (await secured.client.get(path, headers=bearer(BOB_TOKEN))).status_code == 200, path
    spec = (await secured.client.get("/openapi.json", headers=bearer(BOB_TOKEN))).json()
    assert "/destinations" in spec["paths"]
    assert "swagger" in (await secured.client.get("/docs", headers=bearer(BOB_TOKEN))).text.lower()


async def test_the_console_api_needs_admin_but_its_page_loads(secured: Api) -> None:
    await assert_unauthorized(secured, "/console/api/overview")
    assert_problem(await secured.client.get("/console/api/overview", headers=bearer(SCRAPER_TOKEN)), 403, "forbidden")
    overview = await secured.client.get("/console/api/overview", headers=bearer(ROOT_TOKEN))
    assert overview.status_code == 200 and "connections" in overview.json()
    for path in ("/", "/console/static/console.js", "/health", "/ready"):
        assert (await secured.client.get(path)).status_code == 200, path
    script = (await secured.client.get("/console/static/console.js")).text
    assert "sessionStorage" in script and "Bearer" in script  # the page asks for a token and sends it
