"""The real @stomp/stompjs 7 client in headless Chromium, against a live gateway's WebSocket endpoint."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse

from tests.app.transports.live_app import LiveApp, live_app
from tests.browser.conftest import STOMPJS_BUNDLE, BrowserKit

pytestmark = pytest.mark.browser

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>stompjs test</title>
<script src="/_test/stomp.umd.min.js"></script></head><body>stompjs test page</body></html>"""


def page_router() -> APIRouter:
    """The page and the stompjs bundle, served by the gateway under test (the machine has no internet)."""
    router = APIRouter()

    @router.get("/_test/page.html")
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @router.get("/_test/stomp.umd.min.js")
    async def bundle() -> FileResponse:
        return FileResponse(STOMPJS_BUNDLE, media_type="text/javascript")

    @router.get("/_test/stats")
    async def stats(request: Request, destination: str) -> dict[str, int]:
        broker = request.state.broker
        result = await broker.datasource.queues.stats(destination, now_ms=broker.now_ms())
        return {"ready": result.ready, "unacked": result.unacked}

    return router




@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, browser_kit: BrowserKit) -> Iterator[LiveApp]:
    with live_app(
        tmp_path_factory.mktemp("browser"), extra_routers=[page_router()]
    ) as live:
        yield live


def test_stompjs_connect_subscribe_publish_ack_disconnect(browser_kit: BrowserKit, gateway: LiveApp) -> None:
    queue = "/queue/browser-stompjs"
    report = browser_kit.run(
        "stompjs_flow.js", f"{gateway.http_url}/_test/page.html", f"{gateway.ws_url}/stomp", queue
    )
    assert report["ok"], report
    assert report["_exit"] == 0, report
    assert report["version"] == "1.2"
    assert report["subprotocol"] == "v12.stomp"
    text, binary = report["received"]
    assert text == {"body": "hello from stompjs", "ackHeader": True, "destination": queue}
    assert binary["body"] == [0, 1, 2, 250, 251, 255]
    assert report["messageKinds"] == ["text", "binary"]  # a non-UTF-8 body must not travel in a TEXT message
    assert report["receipts"] == ["ack-0", "ack-1"]
    assert report["disconnectedWithReceipt"] is True
    assert report["closeCode"] == 1000
    # Both messages were acknowledged: nothing waits and nothing is leased.
    stats = httpx.get(f"{gateway.http_url}/_test/stats", params={"destination": queue}, timeout=5).json()
    assert stats == {"ready": 0, "unacked": 0}
