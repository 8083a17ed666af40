"""The operator console in headless Chromium: it follows a topic, publishes, and its tail and counters move."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.console import router as console_router
from tests.app.transports.live_app import LiveApp, live_app
from tests.browser.conftest import BrowserKit

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    with live_app(tmp_path_factory.mktemp("console"), routers=[console_router]) as live:
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


def test_console_tail_publish_and_counters(browser_kit: BrowserKit, gateway: LiveApp) -> None:
    report = browser_kit.run("console_check.js", gateway.http_url + "/")
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


def _publish(http: httpx.Client, destination: str, body: str) -> None:
    response = http.post(f"/destinations{destination}", content=body, headers={"Content-Type": "text/plain"})
    assert response.status_code == 201, response.text


def test_each_destination_is_one_row_with_rest_and_overview_merged(browser_kit: BrowserKit, gateway: LiveApp) -> None:
    # The app serves the REST API as well, so the page reads both GET /destinations (items name "orders" and carry
    # the full "/queue/orders" as destination) and its overview (full destinations only).
    queue, topic = "/queue/console-merge", "/topic/console-merge"
    with httpx.Client(base_url=gateway.http_url, timeout=5) as http:
        for body in ("m0", "m1"):
            _publish(http, queue, body)
        _publish(http, topic, "t")
    report = browser_kit.run("console_destinations_check.js", gateway.http_url + "/", queue, topic)
    assert report["ok"], report
    names = [row["name"] for row in report["rows"]]
    assert len(names) == len(set(names)), names
    assert all(name.startswith(("/queue/", "/topic/")) for name in names), names
    rows = {row["name"]: row["cells"] for row in report["rows"]}
    # destination, kind, depth, unacked, consumers, publish/s (from REST only), deliver/s
    assert rows[queue][:5] == [queue, "queue", "2", "0", "0"]
    assert rows[queue][5] != "–"
    assert rows[topic][:5] == [topic, "topic", "–", "–", "1"]
    assert rows[topic][5] != "–"
    assert report["merged"] is True


def test_clicking_a_topic_follows_it_and_a_queue_only_fills_the_forms(browser_kit: BrowserKit, gateway: LiveApp) -> None:
    topic_a, topic_b, queue = "/topic/console-click-a", "/topic/console-click-b", "/queue/console-click"
    with httpx.Client(base_url=gateway.http_url, timeout=5) as http:
        for destination in (topic_a, topic_b, queue):  # traffic puts a topic in the list; the queue keeps its message
            _publish(http, destination, f"before the page, to {destination}")
    report = browser_kit.run("console_click_tail_check.js", gateway.http_url + "/", topic_a, topic_b, queue)
    assert report["ok"], report
    assert report["publishStatus"] == 201
    assert "published after the click" in report["tailText"]
    assert report["tailStateAfterQueueClick"] == f"following {topic_b}"  # the queue's click took over no tail
    assert report["queueNoteShown"] is True
    assert (report["publishForm"], report["tailForm"]) == (queue, queue)
    assert report["stopEnabled"] is True
    assert report["pageSubscriptions"] == [topic_b]
    assert report["queueDepth"] == 1  # a click took none of the queue's messages


def test_console_under_traffic_and_its_picture(
    browser_kit: BrowserKit, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # STOMPGATE_CONSOLE_SCREENSHOT=1 refreshes docs/console.png after 100 polls of traffic (about two minutes), so the
    # charts and sparklines have a shape; otherwise 8 polls, and the picture stays in a temporary folder.
    refresh = bool(os.environ.get("STOMPGATE_CONSOLE_SCREENSHOT"))
    tmp = tmp_path_factory.mktemp("console-scene")
    shot = REPO / "docs" / "console.png" if refresh else tmp / "console.png"
    points = 100 if refresh else 8
    # A gateway of its own, so the picture shows only the scene's destinations.
    with live_app(tmp, routers=[console_router]) as live:
        url = live.http_url + "/"
        report = browser_kit.run("console_scene.js", url, str(shot), str(points), timeout=points * 1.5 + 40)
    assert report["ok"], report
    assert report["_exit"] == 0, report
    names = [row["name"] for row in report["rows"]]
    assert names == ["/queue/emails", "/queue/invoices", "/queue/orders", "/topic/prices"], names
    rows = {row["name"]: row["cells"] for row in report["rows"]}
    assert int(rows["/queue/invoices"][2]) > 0  # published to, never consumed
    assert rows["/queue/orders"][4] == "1"
    assert rows["/topic/prices"][4] == "3"  # two helper subscribers and the console's own tail
    assert all(cells[5] != "–" for cells in rows.values())  # the REST publish rate is merged into every row
    assert report["tailItems"] >= 1
    assert {"shop-api", "order-worker", "mailer", "dashboard", "risk-engine"} <= set(report["connections"])
    assert report["rates"][0] > 0 and report["rates"][1] > 0
    assert shot.stat().st_size > 10_000
