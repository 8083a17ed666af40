"""Login throttling that keys by (login, client address), counts an attempt before its bcrypt, spends a global budget
of bcrypt checks, and takes as long for an unknown user as for a known one (hardening issue, item 7)."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.broker.auth import Principal
from app.security import CheckBudget, ConfiguredAuthorizer, LoginThrottle, UserEntry, UsersFile, hash_secret
from tests.app.api.users import write_users_file

ALICE = Principal("alice", frozenset({"producer"}))  # as write_users_file makes her


def users_at_cost(directory: Path, rounds: int) -> UsersFile:
    path = directory / "users.toml"
    path.write_text(
        f'[[users]]\nname = "alice"\npasscode_hash = "{hash_secret("alice-secret", rounds=rounds)}"\nroles = ["producer"]\n'
    )
    return UsersFile.load(path)


def in_parallel(count: int, call: Callable[[int], object]) -> list[object]:
    """Run ``call(i)`` in ``count`` threads released together by a barrier, so the calls really overlap."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        results[i] = call(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_failures_from_one_address_do_not_lock_out_another(tmp_path: Path) -> None:
    clock = [0.0]
    authorizer = ConfiguredAuthorizer(UsersFile.load(write_users_file(tmp_path)), LoginThrottle(3, 10, lambda: clock[0]))
    for port in range(3):
        assert authorizer.authenticate("alice", "guess", peer=f"10.0.0.1:{4000 + port}") is None
    assert authorizer.authenticate("alice", "alice-secret", peer="10.0.0.1:5000") is None  # that address: locked
    assert authorizer.authenticate("alice", "alice-secret", peer="10.0.0.2:5000") == ALICE  # another: not
    assert authorizer.authenticate("alice", "alice-secret", peer="[2001:db8::7]:5000") == ALICE
    assert not authorizer.needs_slow_check("alice", "alice-secret", peer="10.0.0.1:5001")  # locked: refused unchecked
    clock[0] = 10.5
    assert authorizer.authenticate("alice", "alice-secret", peer="10.0.0.1:5002") == ALICE


def test_parallel_guesses_from_one_address_cost_at_most_the_lockout_threshold(tmp_path: Path) -> None:
    """40 wrong passcodes at once: each attempt is counted before its bcrypt, so only the first five are hashed."""
    authorizer = ConfiguredAuthorizer(users_at_cost(tmp_path, 6), LoginThrottle(5, 30))
    results = in_parallel(40, lambda i: authorizer.authenticate("alice", f"guess-{i}", peer=f"10.0.0.9:{1000 + i}"))
    assert results == [None] * 40
    assert authorizer.stats.slow_checks == 5
    assert authorizer.stats.refused_locked == 35
    assert authorizer.authenticate("alice", "alice-secret", peer="10.0.0.9:2000") is None  # locked out


def test_a_global_budget_bounds_bcrypt_checks_across_addresses(tmp_path: Path) -> None:
    """Guesses from 40 addresses are not stopped by the per-address lockout; the shared budget stops them unhashed."""
    clock = [0.0]
    budget = CheckBudget(per_second=2, burst=3, clock=lambda: clock[0])
    authorizer = ConfiguredAuthorizer(users_at_cost(tmp_path, 6), LoginThrottle(5, 30), budget=budget)
    assert authorizer.authenticate("alice", "alice-secret", peer="10.1.0.1:1") == ALICE  # one check of the three
    results = in_parallel(40, lambda i: authorizer.authenticate("alice", f"guess-{i}", peer=f"10.2.0.{i}:1"))
    assert results == [None] * 40
    assert authorizer.stats.slow_checks == 3
    assert authorizer.stats.refused_over_budget == 38
    assert authorizer.authenticate("alice", "alice-secret", peer="10.1.0.2:1") == ALICE  # verified before: no bcrypt
    assert authorizer.authenticate("mallory", "x", peer="10.1.0.3:1") is None  # unknown users spend it too
    assert authorizer.stats.slow_checks == 3
    clock[0] = 1.0  # two more checks a second
    assert authorizer.authenticate("alice", "guess", peer="10.3.0.1:1") is None
    assert authorizer.authenticate("mallory", "guess", peer="10.3.0.1:1") is None
    assert authorizer.authenticate("alice", "guess", peer="10.3.0.1:1") is None
    assert authorizer.stats.slow_checks == 5


def test_unknown_users_take_as_long_as_known_ones(tmp_path: Path) -> None:
    """A correctness property, not a speed target: the answer's timing must not say whether a login exists."""
    authorizer = ConfiguredAuthorizer(users_at_cost(tmp_path, 8), LoginThrottle(1000, 1))
    assert authorizer.needs_slow_check("mallory", "x")  # the dummy check is a bcrypt too: off the event loop

    def seconds(login: str, i: int) -> float:
        start = time.perf_counter()
        assert authorizer.authenticate(login, f"wrong-{i}", peer=f"10.4.0.{i % 200}:1") is None
        return time.perf_counter() - start

    known, unknown = [], []
    for i in range(15):  # interleaved, so a noisy neighbour slows both alike
        known.append(seconds("alice", i))
        unknown.append(seconds(f"nobody-{i}", i))
    assert statistics.median(unknown) >= 0.5 * statistics.median(known), (known, unknown)


def test_an_address_sweeping_through_invented_logins_is_locked_out_as_a_whole(tmp_path: Path) -> None:
    """Per-(login, address) keys alone never lock out an address that tries a new login name each time: it could
    spend the global budget of checks everyone shares. The address as a whole is limited too (four times the
    per-login threshold), while a login already verified from there still gets in, and other addresses are not hurt."""
    authorizer = ConfiguredAuthorizer(UsersFile.load(write_users_file(tmp_path)), LoginThrottle(5, 30))
    assert authorizer.authenticate("alice", "alice-secret", peer="10.0.0.7:1") == ALICE  # verified: remembered
    checks_before = authorizer.stats.slow_checks
    for i in range(40):
        assert authorizer.authenticate(f"nobody-{i}", "guess", peer=f"10.0.0.7:{1000 + i}") is None
    assert authorizer.stats.slow_checks - checks_before == 20  # 4 x 5 failures, then refused unchecked
    assert not authorizer.needs_slow_check("bob", "bob-secret", peer="10.0.0.7:2000")  # answered at once
    assert authorizer.authenticate("bob", "bob-secret", peer="10.0.0.7:2001") is None  # new logins: locked
    assert authorizer.authenticate("alice", "alice-secret", peer="10.0.0.7:2002") == ALICE  # remembered: in
    assert authorizer.authenticate("bob", "bob-secret", peer="10.0.0.8:1") is not None  # another address: in


def test_a_login_name_that_could_alias_a_durable_subscription_is_refused(tmp_path: Path) -> None:
    for name in ("alice/b", "a:b", "a\nb"):
        with pytest.raises(ValidationError):
            UserEntry(name=name, passcode_hash=None)
    assert UserEntry(name="alice.b@example", passcode_hash=None).name == "alice.b@example"
