"""The operator console in headless Chromium: it follows a topic, publishes, and its tail and counters move."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.console import router as console_router
from app.transports.websocket import router as websocket_router
from tests.app.transports.live_app import LiveApp, live_app
from tests.browser.conftest import BrowserKit

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    with live_app(tmp_path_factory.mktemp("console"), routers=[websocket_router, console_router]) as live:
        yield live


def test_console_assets_and_overview(gateway: LiveApp) -> None:
    with httpx.Client(base_url=gateway.http_url, timeout=5) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "/console/static/console.js" in page.text
        for asset in ("console.js", "console.css", "stomp-lite.js"):
            assert http.get(f"/console/static/{asset}").status_code == 200
        assert http.get("/console/static/..%2Fconsole.py").status_code == 404
        assert http.get("/console/static/nothing.js").status_code == 404
        overview = http.get("/console/api/overview").json()
    assert set(overview) >= {"destinations", "connections", "subscriptions", "published_total", "delivered_total"}


def test_console_tail_publish_and_counters(browser_kit: BrowserKit, gateway: LiveApp, tmp_path: Path) -> None:
    # STOMPGATE_CONSOLE_SCREENSHOT=1 refreshes docs/console.png; otherwise the picture stays in tmp_path.
    shot = REPO / "docs" / "console.png" if os.environ.get("STOMPGATE_CONSOLE_SCREENSHOT") else tmp_path / "console.png"
    report = browser_kit.run("console_check.js", gateway.http_url + "/", str(shot))
    assert report["ok"], report
    assert report["_exit"] == 0, report
    assert report["tailShows"] is True
    assert "colour:blue" in report["tailText"]
    assert report["publishResult"].startswith("stored")
    assert report["publishedAfter"] >= report["publishedBefore"] + 4
    assert "/queue/console-orders" in report["destinations"]
    assert "/topic/console-check" in report["destinations"]
    assert "websocket" in report["connections"]
    assert "/topic/console-check" in report["subscriptions"]
    assert report["deliveredTotal"] >= 1
    assert report["chartsDrawn"] == [True, True]
    assert shot.stat().st_size > 10_000
