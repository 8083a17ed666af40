"""Users, passcodes, tokens and permissions from a TOML file; failed-login throttling; TLS for the TCP listener.

The users file (setting ``users_file``)::

    [[users]]
    name = "alice"
    passcode_hash = "$2b$12$..."      # `stompgate hash-passcode` prints one
    token_hashes = ["$2b$12$..."]     # REST bearer tokens, hashed the same way (or "sha256:<hex>" for long random tokens)
    roles = ["producer"]

    [[permissions]]
    role = "producer"
    read = ["/queue/orders*"]
    write = ["/queue/*", "/topic/prices.*"]

Patterns are shell globs matched against the whole destination (``fnmatch``, case-sensitive; ``*`` also matches
``/``). A principal may read (SUBSCRIBE, REST peek/inspect) or write (SEND, REST publish) a destination when any of
its roles has a matching pattern. The ``admin`` role may do anything, including purging queues over REST and
listing connections and subscriptions.

The ``metrics`` role may scrape ``/metrics`` (so a Prometheus token reads no messages); ``admin`` may too. With a
users file, ``/docs``, ``/redoc`` and ``/openapi.json`` need any user's token and the console's ``/console/api/*``
needs ``admin``; ``/health`` and ``/ready`` stay open for probes.

Failed logins are throttled per (login, client address) for STOMP and per client address for REST tokens (a token
names no user): after ``login_failures_before_lockout`` failures in a row the key is locked out for
``login_lockout_seconds``, doubled by each further failure (at most 15 minutes); while locked, even the right
passcode is refused, so guessing from one address stalls while the same login from elsewhere still works. An attempt
is counted *before* its bcrypt, so parallel guesses cannot each get a check in before the first failure lands. A REST
token this process has verified before is accepted even from a locked-out address: behind one NAT address, one
client's bad tokens must not lock the admin out, and a remembered token costs no bcrypt (guessing one at request rate
is hopeless for the long random tokens tokens should be). Such a look-up does not reset the address's count.

Every bcrypt check, passcode or token, spends a global budget (a token bucket: about one core's worth of checks a
second, bursts of ten seconds' worth), so guesses spread over many addresses cannot take the CPU; beyond it a check is
refused unhashed (REST answers 503 with ``Retry-After``). An unknown login (or one with no passcode) is checked against
a dummy hash of the users' usual cost, so its refusal takes as long as a wrong passcode's and names cannot be
enumerated by timing. ``ConfiguredAuthorizer.stats`` counts checks and refusals (``/metrics`` shows them). Log lines
name the login and the peer, never a passcode or token.

bcrypt is slow on purpose (~0.25 s at the default cost), so a successful check is remembered (as an HMAC under a
per-process key, never the passcode itself) and repeated logins cost one hash, not one bcrypt; a login that does
need bcrypt (``needs_slow_check``) is checked by the session in a worker thread, so it never stalls the event loop
that serves every other connection.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import secrets
import ssl
import threading
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import bcrypt
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from app.broker.auth import AllowAll, LoginChecksBusy, Principal, TokenAuthorizer, is_admin
from app.settings import Settings

__all__ = [
    "SecurityConfigError",
    "UsersFile",
    "LoginThrottle",
    "CheckBudget",
    "AuthStats",
    "client_address",
    "ConfiguredAuthorizer",
    "hash_secret",
    "verify_secret",
    "load_authorizer",
    "tls_context",
]

log = logging.getLogger("stompgate.security")

MAX_LOCKOUT_SECONDS = 15 * 60  # the doubling stops here: long enough to stall guessing, short enough to self-heal
_THROTTLE_KEYS = 100_000  # throttle entries kept; the oldest go first so a flood of names cannot exhaust memory
_VERIFIED_CACHE = 10_000  # remembered successful checks


class SecurityConfigError(Exception):
    """The users file or the TLS files cannot be used; the message is one sentence for the operator."""


def _secret_hash(value: str) -> str:
    if value.startswith(("$2a$", "$2b$", "$2y$")) and len(value) == 60:
        return value
    if value.startswith("sha256:") and len(value) == 7 + 64 and all(c in "0123456789abcdef" for c in value[7:]):
        return value
    raise ValueError("must be a bcrypt hash ($2b$...) from `stompgate hash-passcode`, or sha256:<64 hex digits>")


SecretHash = Annotated[str, AfterValidator(_secret_hash)]


class UserEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # No '/' (it separates the login from the client-id and subscription id in durable subscription names, so a
    # login "alice/b" could reach alice's subscriptions), no ':' and no control characters (STOMP 1.0 headers).
    name: str = Field(min_length=1, max_length=256, pattern=r"^[^/:\x00-\x1f\x7f]+$")
    passcode_hash: SecretHash | None = None
    token_hashes: list[SecretHash] = []
    roles: list[str] = []


class PermissionEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str = Field(min_length=1)
    read: list[str] = []
    write: list[str] = []


class UsersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    users: list[UserEntry] = Field(min_length=1)
    permissions: list[PermissionEntry] = []

    @classmethod
    def load(cls, path: str | Path) -> UsersFile:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise SecurityConfigError(f"cannot read the users file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SecurityConfigError(f"the users file {path} is not valid TOML: {exc}") from None
        try:
            parsed = cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise SecurityConfigError(f"the users file {path} is invalid at {where}: {first['msg']}") from None
        names = [u.name for u in parsed.users]
        if len(set(names)) != len(names):
            raise SecurityConfigError(f"the users file {path} names a user more than once")
        return parsed


def hash_secret(secret: str, rounds: int = 12) -> str:
    """A bcrypt hash of a passcode or token, for the users file."""
    return bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds=rounds)).decode()


def verify_secret(secret: str, hashed: str) -> bool:
    if hashed.startswith("sha256:"):
        return hmac.compare_digest(hashlib.sha256(secret.encode()).hexdigest(), hashed[7:])
    try:
        return bcrypt.checkpw(secret.encode(), hashed.encode())
    except ValueError:
        return False


def _login_key(login: str, passcode: str) -> bytes:
    """What a verified STOMP login is remembered by (as an HMAC of this, never the passcode itself)."""
    return b"p\0" + login.encode() + b"\0" + passcode.encode()


def client_address(peer: str) -> str:
    """The address of a transport peer ``host:port`` (``[v6]:port`` or ``v6:port`` too): the port changes with every
    connection, so throttling by it would throttle nothing."""
    host, colon, port = peer.rpartition(":")
    if not colon or not host or not port.isdigit():
        return peer
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


# An address may fail this many times the per-login limit, over all logins, before it is locked out: room for the
# typos of many people behind one NAT, none for a sweep through invented login names.
ADDRESS_FAILURES_FACTOR = 4


def _address_key(peer: str | None) -> str | None:
    return f"address:{client_address(peer)}" if peer else None


def _stomp_key(login: str, peer: str | None) -> str:
    """Throttle key of a STOMP login: per login and client address (by login alone when the peer is not known)."""
    return f"login:{login}@{client_address(peer) if peer else ''}"


def _is_bcrypt(hashed: str) -> bool:
    return not hashed.startswith("sha256:")


def _bcrypt_cost(hashed: str) -> int:
    return int(hashed.split("$")[2])  # "$2b$12$<salt+hash>"


class LoginThrottle:
    """Lock a key out after repeated failures, with a lockout that doubles per further failure. Thread-safe (REST
    checks tokens in a worker thread, STOMP sessions in another)."""

    def __init__(self, max_failures: int, lockout_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds
        self.clock = clock
        self._clock = clock
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (failures, locked until)
        self._lock = threading.Lock()

    def locked_for(self, key: str) -> float:
        """Seconds this key stays locked out (0 when it may try)."""
        with self._lock:
            return self._locked_for(key)

    def attempt(self, key: str) -> bool:
        """Count an attempt as a failure before it is checked (``succeeded`` forgives it): False, and nothing
        counted, while the key is locked out. Parallel attempts thus see each other and the lockout at once."""
        with self._lock:
            if self._locked_for(key) > 0:
                return False
            self._fail(key)
            return True

    def failed(self, key: str) -> None:
        with self._lock:
            self._fail(key)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def forgive_one(self, key: str) -> None:
        """Take back one counted attempt (it succeeded), leaving the others and any lockout as they are."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                failures, until = entry
                if failures <= 1:
                    del self._entries[key]
                else:
                    self._entries[key] = (failures - 1, until)

    def _locked_for(self, key: str) -> float:
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        failures, until = entry
        now = self._clock()
        if failures and now - until > MAX_LOCKOUT_SECONDS:  # quiet long enough: forgive
            del self._entries[key]
            return 0.0
        return max(0.0, until - now)

    def _fail(self, key: str) -> None:
        failures, _ = self._entries.pop(key, (0, 0.0))
        failures += 1
        now = self._clock()
        until = now
        if failures >= self.max_failures:
            until = now + min(self.lockout_seconds * 2 ** (failures - self.max_failures), MAX_LOCKOUT_SECONDS)
        self._entries[key] = (failures, until)
        while len(self._entries) > _THROTTLE_KEYS:
            self._entries.popitem(last=False)


class CheckBudget:
    """A token bucket of bcrypt checks shared by every login and token: ``per_second`` refill, at most ``burst`` saved
    up. Per-key lockouts stop guessing from one address; this stops guessing spread over many. Thread-safe."""

    def __init__(self, per_second: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_second
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()
        self._lock = threading.Lock()

    @classmethod
    def one_core(cls, seconds_per_check: float) -> CheckBudget:
        """About one core's worth of checks a second, with ten seconds' worth saved up for a burst of reconnects."""
        per_second = 1.0 / max(seconds_per_check, 1e-4)
        return cls(per_second, 10 * per_second)

    def take(self, checks: int) -> bool:
        """Spend ``checks`` if the bucket holds them; False (nothing spent) otherwise."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_second)
            self._at = now
            if checks > self._tokens:
                return False
            self._tokens -= checks
            return True

    def refund(self, checks: int) -> None:
        with self._lock:
            self._tokens = min(self.burst, self._tokens + checks)


@dataclass
class AuthStats:
    """What the authorizer has done, for ``/metrics`` and tests: bcrypt checks run, and attempts refused unhashed."""

    slow_checks: int = 0
    refused_locked: int = 0
    refused_over_budget: int = 0


@dataclass(frozen=True, slots=True)
class _User:
    principal: Principal
    passcode_hash: str | None
    token_hashes: tuple[str, ...]


def _dummy_hashes(config: UsersFile) -> tuple[tuple[str, ...], float]:
    """A hash of a random secret at the users' most common passcode cost, so refusing an unknown login costs what a
    wrong passcode costs; and how long making it took (a bcrypt of that cost), to size the default budget."""
    costs = [_bcrypt_cost(u.passcode_hash) for u in config.users if u.passcode_hash and _is_bcrypt(u.passcode_hash)]
    costs = costs or [_bcrypt_cost(h) for u in config.users for h in u.token_hashes if _is_bcrypt(h)]
    if not costs:  # no bcrypt anywhere: a sha256 comparison is what a known user costs
        return ("sha256:" + secrets.token_hex(32),), 1e-4
    cost = max(set(costs), key=costs.count)
    start = time.perf_counter()
    hashed = hash_secret(secrets.token_urlsafe(16), rounds=cost)
    return (hashed,), time.perf_counter() - start


class ConfiguredAuthorizer:
    """Users and permissions from a :class:`UsersFile`; implements ``app.broker.auth.TokenAuthorizer``."""

    def __init__(self, config: UsersFile, throttle: LoginThrottle, budget: CheckBudget | None = None) -> None:
        self.throttle = throttle
        # Failures from one address whatever the login: one address cycling through invented login names would
        # otherwise never be locked out, and could spend the global budget of checks that everyone's logins share.
        self.address_throttle = LoginThrottle(
            ADDRESS_FAILURES_FACTOR * throttle.max_failures, throttle.lockout_seconds, throttle.clock
        )
        self.stats = AuthStats()
        self._users = {
            u.name: _User(Principal(u.name, frozenset(u.roles)), u.passcode_hash, tuple(u.token_hashes)) for u in config.users
        }
        self._read: dict[str, list[str]] = {}
        self._write: dict[str, list[str]] = {}
        for perm in config.permissions:
            self._read.setdefault(perm.role, []).extend(perm.read)
            self._write.setdefault(perm.role, []).extend(perm.write)
        self._cache_key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, Principal] = OrderedDict()
        self._lock = threading.Lock()  # guards the verified cache and the stats
        self._dummy, seconds_per_check = _dummy_hashes(config)
        self._token_hashes = [(hashed, user) for user in self._users.values() for hashed in user.token_hashes]
        token_checks = sum(_is_bcrypt(hashed) for hashed, _ in self._token_hashes)
        self.budget = budget or CheckBudget.one_core(seconds_per_check)
        # a wrong token is checked against every token hash: the bucket must hold that many or no token ever passes
        self.budget.burst = max(self.budget.burst, token_checks)

    @classmethod
    def from_settings(cls, settings: Settings) -> ConfiguredAuthorizer:
        assert settings.users_file is not None
        throttle = LoginThrottle(settings.login_failures_before_lockout, settings.login_lockout_seconds)
        return cls(UsersFile.load(settings.users_file), throttle)

    # ---- authentication ----

    def authenticate(self, login: str | None, passcode: str | None, *, peer: str | None = None) -> Principal | None:
        """STOMP CONNECT: login and passcode, throttled per (login, address of ``peer``, a ``host:port``)."""
        if not login or passcode is None:
            log.warning("STOMP login refused from %s: no login or passcode given", peer or "an unnamed peer")
            return None
        key = _stomp_key(login, peer)
        if self._locked_out(key, f"STOMP login for user {login!r} from {peer or 'an unnamed peer'}"):
            return None
        user = self._users.get(login)
        cache_input = _login_key(login, passcode)
        if user is not None and self._remembered(cache_input) is user.principal:
            self.throttle.succeeded(key)
            return user.principal  # verified before: even from an address locked out as a whole
        what = f"STOMP login for user {login!r} from {peer or 'an unnamed peer'}"
        address_key = _address_key(peer)
        if address_key is not None and self._locked_out(address_key, what, self.address_throttle):
            return None
        known = user is not None and user.passcode_hash is not None
        hashes = (user.passcode_hash,) if user is not None and user.passcode_hash is not None else self._dummy
        if not self._spend(key, hashes, what, address_key):
            return None
        matched = any(verify_secret(passcode, hashed) for hashed in hashes)  # the dummy is checked but never counts
        if not (matched and known and user is not None):
            log.warning("STOMP login failed for user %r from %s", login, peer or "an unnamed peer")
            return None
        self._remember(cache_input, user.principal)
        self.throttle.succeeded(key)
        # The address's count gives back only this attempt (counted before its check): one valid login must not wipe
        # a sweep's record; the rest is forgiven once the address has been quiet long enough.
        if address_key is not None:
            self.address_throttle.forgive_one(address_key)
        return user.principal

    def needs_slow_check(self, login: str | None, passcode: str | None, *, peer: str | None = None) -> bool:
        if not login or passcode is None:
            return False
        if self.throttle.locked_for(_stomp_key(login, peer)) > 0:
            return False
        user = self._users.get(login)
        if user is not None and self._remembered(_login_key(login, passcode)) is user.principal:
            return False
        address_key = _address_key(peer)
        if address_key is not None and self.address_throttle.locked_for(address_key) > 0:
            return False
        hashed = user.passcode_hash if user is not None and user.passcode_hash is not None else self._dummy[0]
        return _is_bcrypt(hashed)  # unknown users too: their dummy check takes as long (a budget refusal is fast)

    def authenticate_token(self, token: str | None, peer: str) -> Principal | None:
        """REST: a bearer token, throttled per client address ``peer``. Raises LoginChecksBusy past the budget."""
        if not token:
            return None  # a missing token is not a guess: do not count it
        cache_input = b"t\0" + token.encode()
        remembered = self._remembered(cache_input)
        if remembered is not None:
            return remembered  # even from a locked-out address, and without resetting its count (see the docstring)
        key = "token:" + peer
        if self._locked_out(key, f"REST token from {peer}"):
            return None
        if not self._spend(key, tuple(hashed for hashed, _ in self._token_hashes), f"REST token from {peer}"):
            raise LoginChecksBusy("too many logins are being checked; retry in a second")
        for hashed, user in self._token_hashes:
            if verify_secret(token, hashed):
                self._remember(cache_input, user.principal)
                self.throttle.succeeded(key)
                return user.principal
        log.warning("REST token not accepted from %s", peer)
        return None

    def _locked_out(self, key: str, what: str, throttle: LoginThrottle | None = None) -> bool:
        wait = (throttle or self.throttle).locked_for(key)
        if wait <= 0:
            return False
        with self._lock:
            self.stats.refused_locked += 1
        log.warning("%s refused: locked out for %.1fs after repeated failures", what, wait)
        return True

    def _spend(self, key: str, hashes: tuple[str, ...], what: str, address_key: str | None = None) -> bool:
        """Take the budget for these hashes and count the attempt (per key, and per address when given), all
        before any bcrypt runs; False if refused."""
        checks = sum(map(_is_bcrypt, hashes))
        if checks and not self.budget.take(checks):
            with self._lock:
                self.stats.refused_over_budget += 1
            log.warning("%s refused unchecked: the budget of bcrypt checks is spent", what)
            return False
        if not self.throttle.attempt(key) or (
            address_key is not None and not self.address_throttle.attempt(address_key)
        ):  # another attempt's count locked it since the first look
            self.budget.refund(checks)
            with self._lock:
                self.stats.refused_locked += 1
            log.warning("%s refused: locked out after repeated failures", what)
            return False
        with self._lock:
            self.stats.slow_checks += checks
        return True

    def _remembered(self, cache_input: bytes) -> Principal | None:
        digest = self._digest(cache_input)
        with self._lock:
            return self._verified.get(digest)

    def _remember(self, cache_input: bytes, principal: Principal) -> None:
        digest = self._digest(cache_input)
        with self._lock:
            self._verified[digest] = principal
            while len(self._verified) > _VERIFIED_CACHE:
                self._verified.popitem(last=False)

    def _digest(self, cache_input: bytes) -> bytes:
        return hmac.new(self._cache_key, cache_input, hashlib.sha256).digest()

    # ---- permissions ----

    def can_read(self, principal: Principal, destination: str) -> bool:
        return is_admin(principal) or self._allowed(self._read, principal, destination)

    def can_write(self, principal: Principal, destination: str) -> bool:
        return is_admin(principal) or self._allowed(self._write, principal, destination)

    @staticmethod
    def _allowed(table: dict[str, list[str]], principal: Principal, destination: str) -> bool:
        return any(
            fnmatch.fnmatchcase(destination, pattern) for role in principal.roles for pattern in table.get(role, ())
        )


def load_authorizer(settings: Settings) -> TokenAuthorizer:
    """The configured users, or :class:`AllowAll` when ``users_file`` is not set. Raises SecurityConfigError."""
    if settings.users_file is None:
        return AllowAll()
    return ConfiguredAuthorizer.from_settings(settings)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server-side TLS context for the STOMP TCP listener, or None without ``tls_certfile``."""
    if settings.tls_certfile is None:
        if settings.tls_keyfile is not None:
            raise SecurityConfigError("tls_keyfile is set but tls_certfile is not; set both to enable TLS")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for path in (settings.tls_certfile, settings.tls_keyfile):
        if path is not None and not Path(path).is_file():
            raise SecurityConfigError(f"cannot read the TLS file {path}: no such file")
    try:
        context.load_cert_chain(settings.tls_certfile, settings.tls_keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise SecurityConfigError(
            f"cannot load the TLS certificate {settings.tls_certfile} and key {settings.tls_keyfile}: {exc}"
        ) from None
    return context
