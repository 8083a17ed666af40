"""The console of a gateway with a users file, in headless Chromium: the page loads, asks for a bearer token, says
why one is refused (401, or 403 for a user without the admin role), and works with an admin's token; with the admin's
login and passcode too, its own STOMP connection (the live tail) works as well."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.console import router as console_router
from tests.app.api.users import BOB_TOKEN, ROOT_TOKEN, write_users_file
from tests.app.transports.live_app import LiveApp, live_app
from tests.browser.conftest import BrowserKit

pytestmark = pytest.mark.browser

ROOT_PASSCODE = "root-secret"  # root's passcode in write_users_file's users


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    tmp = tmp_path_factory.mktemp("console-auth")
    with live_app(tmp, routers=[console_router], users_file=str(write_users_file(tmp))) as live:
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


def test_a_signed_in_admin_tails_and_publishes(browser_kit: BrowserKit, secured: LiveApp) -> None:
    topic = "/topic/console-signed-in"
    url = secured.http_url + "/"
    report = browser_kit.run("console_auth_tail_check.js", url, ROOT_TOKEN, "root", ROOT_PASSCODE, topic)
    assert report["ok"], report
    assert "passcode" in report["stompMessage"]
    assert "did not accept" in report["wrongMessage"]
    # Page loaded (refused: no login), wrong passcode (refused), right passcode: no retries of a refused login.
    assert report["webSocketsSignedIn"] == 3, report
    assert report["webSockets"] == 4, report  # signing out connects once more, without a login (and is refused)
    assert report["stompState"].startswith("STOMP: connected (")
    assert report["secretsCleared"] is True  # the form does not keep them once stored
    assert report["publishResult"].startswith("stored")
    assert report["tailShows"] is True
    assert report["user"] == ["root"]  # the page's STOMP session is the signed-in user, not anonymous
    assert report["storedLogin"] == "root"
    assert report["storedAfterSignOut"] == []
    # Secrets stay out of the browser console (where they could end up in a bug report).
    logged = "\n".join(report["consoleLines"])
    for secret in (ROOT_TOKEN, ROOT_PASSCODE, "wrong-" + ROOT_PASSCODE):
        assert secret not in logged
