"""Bearer tokens on REST, per-destination permissions, the admin role, lockouts, and the users file's own checks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.broker.auth import AllowAll, Principal
from app.security import CheckBudget, ConfiguredAuthorizer, LoginThrottle, SecurityConfigError, UsersFile, hash_secret
from tests.app.api.conftest import Api, api_client
from tests.app.api.test_publish import assert_problem
from tests.app.api.users import ALICE_TOKEN, BOB_TOKEN, ROOT_TOKEN, write_users_file


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Api]:
    async with api_client(users_file=str(write_users_file(tmp_path)), login_lockout_seconds=0.2) as api:
        yield api


async def test_a_missing_or_wrong_token_is_a_401(secured: Api) -> None:
    for headers in ({}, bearer("nope"), {"Authorization": "Basic YTpi"}):
        response = await secured.client.get("/destinations", headers=headers)
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert (await secured.client.get("/health")).status_code == 200  # operations stay open
    assert (await secured.client.get("/ready")).status_code == 200


async def test_permissions_on_publish_and_peek(secured: Api) -> None:
    c = secured.client
    assert (await c.post("/destinations/queue/orders.eu", content=b"x", headers=bearer(ALICE_TOKEN))).status_code == 201
    assert_problem(await c.post("/destinations/queue/other", content=b"x", headers=bearer(ALICE_TOKEN)), 403, "forbidden")
    assert_problem(await c.post("/destinations/queue/orders", content=b"x", headers=bearer(BOB_TOKEN)), 403, "forbidden")
    assert_problem(await c.get("/messages/queue/orders.eu", headers=bearer(ALICE_TOKEN)), 403)
    assert len((await c.get("/messages/queue/orders.eu", headers=bearer(BOB_TOKEN))).json()) == 1
    assert (await c.get("/destinations/queue/orders.eu", headers=bearer(BOB_TOKEN))).status_code == 200
    assert (await c.get("/destinations", headers=bearer(ALICE_TOKEN))).json() == []  # lists only what one may read
    assert len((await c.get("/destinations", headers=bearer(BOB_TOKEN))).json()) == 1


async def test_admin_only_routes(secured: Api) -> None:
    c = secured.client
    for method, path in [("DELETE", "/messages/queue/orders"), ("GET", "/connections"), ("GET", "/subscriptions")]:
        assert_problem(await c.request(method, path, headers=bearer(BOB_TOKEN)), 403, "forbidden")
        assert (await c.request(method, path, headers=bearer(ROOT_TOKEN))).status_code == 200


async def test_token_guessing_locks_the_peer_out(secured: Api) -> None:
    for _ in range(5):
        assert (await secured.client.get("/destinations", headers=bearer("guess"))).status_code == 401
    locked = await secured.client.get("/destinations", headers=bearer(ROOT_TOKEN))
    assert_problem(locked, 401)


async def test_a_verified_token_outlives_a_lockout_of_its_address(secured: Api) -> None:
    """Behind one NAT address, a client guessing (or retrying a stale token) must not lock the admin out: a token
    already verified costs no bcrypt and is accepted; a token never verified waits out the lockout."""
    c = secured.client
    assert (await c.get("/connections", headers=bearer(ROOT_TOKEN))).status_code == 200
    for _ in range(5):
        assert_problem(await c.get("/destinations", headers=bearer("guess")), 401)
    assert (await c.get("/connections", headers=bearer(ROOT_TOKEN))).status_code == 200
    assert (await c.get("/connections", headers=bearer(ROOT_TOKEN))).status_code == 200  # and it does not unlock
    assert_problem(await c.get("/destinations", headers=bearer(ALICE_TOKEN)), 401)


async def test_token_checks_beyond_the_budget_are_a_503(secured: Api) -> None:
    authorizer = secured.broker.authorizer
    assert isinstance(authorizer, ConfiguredAuthorizer)
    authorizer.budget = CheckBudget(per_second=0, burst=0)
    busy = await secured.client.get("/destinations", headers=bearer(ROOT_TOKEN))
    assert_problem(busy, 503, "login-checks-busy")
    assert busy.headers["retry-after"] == "1"
    assert authorizer.stats.slow_checks == 0


def test_stomp_login_lockout_and_logging(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = [0.0]
    authorizer = ConfiguredAuthorizer(UsersFile.load(write_users_file(tmp_path)), LoginThrottle(3, 10, lambda: clock[0]))
    assert authorizer.authenticate("alice", "alice-secret") == Principal("alice", frozenset({"producer"}))
    for _ in range(3):
        assert authorizer.authenticate("alice", "wrong-guess") is None
    assert authorizer.authenticate("alice", "alice-secret") is None  # locked out
    assert authorizer.authenticate("bob", "bob-secret") is not None  # per login
    clock[0] = 10.5
    assert authorizer.authenticate("alice", "alice-secret") is not None
    for _ in range(3):
        authorizer.authenticate("alice", "wrong-guess")
    assert authorizer.throttle.locked_for("login:alice@") == pytest.approx(10)  # no peer: keyed by the login alone
    authorizer.authenticate("alice", "wrong-guess")  # refused unchecked while locked: not counted
    clock[0] = 21
    authorizer.authenticate("alice", "wrong-guess")  # the first failure after a lockout doubles it
    assert authorizer.throttle.locked_for("login:alice@") == pytest.approx(20)
    assert authorizer.authenticate(None, None) is None
    assert authorizer.authenticate("mallory", "x") is None
    assert "wrong-guess" not in caplog.text and "alice-secret" not in caplog.text
    assert "alice" in caplog.text


def test_which_logins_need_a_slow_check(tmp_path: Path) -> None:
    """Only a bcrypt the authorizer would really run goes to a worker thread; everything else answers at once."""
    clock = [0.0]
    authorizer = ConfiguredAuthorizer(UsersFile.load(write_users_file(tmp_path)), LoginThrottle(2, 10, lambda: clock[0]))
    assert authorizer.needs_slow_check("alice", "alice-secret")  # never verified: bcrypt
    assert authorizer.authenticate("alice", "alice-secret") is not None
    assert not authorizer.needs_slow_check("alice", "alice-secret")  # remembered
    assert authorizer.needs_slow_check("alice", "another-guess")  # other credentials are checked again
    assert authorizer.needs_slow_check("mallory", "x")  # unknown user: a dummy bcrypt, so it takes as long
    assert not authorizer.needs_slow_check(None, None) and not authorizer.needs_slow_check("alice", None)
    for _ in range(2):
        authorizer.authenticate("bob", "wrong")
    assert not authorizer.needs_slow_check("bob", "bob-secret")  # locked out: refused unchecked
    assert not AllowAll().needs_slow_check("anyone", "x")


def test_globs() -> None:
    users = UsersFile.model_validate(
        {
            "users": [{"name": "u", "passcode_hash": hash_secret("p", 4), "roles": ["r"]}],
            "permissions": [{"role": "r", "read": ["/queue/a.*"], "write": ["/topic/*"]}],
        }
    )
    authorizer = ConfiguredAuthorizer(users, LoginThrottle(5, 1))
    u = Principal("u", frozenset({"r"}))
    assert authorizer.can_read(u, "/queue/a.b") and not authorizer.can_read(u, "/queue/ab")
    assert authorizer.can_write(u, "/topic/x/y") and not authorizer.can_write(u, "/queue/a.b")
    assert authorizer.can_write(Principal("x", frozenset({"admin"})), "/queue/anything")


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("users = 3", "invalid"),
        ("[[users]]\nname = 'a'\npasscode_hash = 'plain'", "bcrypt"),
        ("[[users]]\nname = 'a'\nroles = ['x']\nflavour = 1", "flavour"),
        ("[[users]]\nname = 'a'\n[[users]]\nname = 'a'", "more than once"),
        ("not toml [", "TOML"),
    ],
)
def test_a_bad_users_file_is_one_sentence(tmp_path: Path, text: str, phrase: str) -> None:
    path = tmp_path / "users.toml"
    path.write_text(text)
    with pytest.raises(SecurityConfigError, match=phrase):
        UsersFile.load(path)
    with pytest.raises(SecurityConfigError, match="cannot read"):
        UsersFile.load(tmp_path / "missing.toml")
