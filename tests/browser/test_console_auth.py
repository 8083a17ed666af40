"""The console of a gateway with a users file, in headless Chromium: the page loads, asks for a bearer token, says
why one is refused (401, or 403 for a user without the admin role), and works with an admin's token."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.console import router as console_router
from app.transports.websocket import router as websocket_router
from tests.app.api.users import BOB_TOKEN, ROOT_TOKEN, write_users_file
from tests.app.transports.live_app import LiveApp, live_app
from tests.browser.conftest import BrowserKit

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    tmp = tmp_path_factory.mktemp("console-auth")
    with live_app(tmp, routers=[websocket_router, console_router], users_file=str(write_users_file(tmp))) as live:
        yield live


def test_the_console_asks_for_a_token(browser_kit: BrowserKit, secured: LiveApp) -> None:
    report = browser_kit.run("console_auth_check.js", secured.http_url + "/", ROOT_TOKEN, BOB_TOKEN)
    assert report["ok"], report
    assert "admin role" in report["firstMessage"]
    assert "did not accept" in report["wrongMessage"]
    assert "'bob'" in report["forbiddenMessage"]
    assert report["stored"] == ROOT_TOKEN
    assert report["liveAfterReload"] is True
    assert report["forgotten"] is None
