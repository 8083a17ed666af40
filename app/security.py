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

Failed logins are throttled: after ``login_failures_before_lockout`` failures in a row, the key is locked out for
``login_lockout_seconds``, doubled by each further failure (at most 15 minutes); while locked, even the right
passcode is refused. STOMP logins are keyed by login name (the session does not pass its peer address); REST tokens
by the client address. Log lines name the login and the peer, never a passcode or token.

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

from app.broker.auth import AllowAll, Principal, TokenAuthorizer, is_admin
from app.settings import Settings

__all__ = [
    "SecurityConfigError",
    "UsersFile",
    "LoginThrottle",
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

    name: str = Field(min_length=1)
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


class LoginThrottle:
    """Lock a key out after repeated failures, with a lockout that doubles per further failure. Thread-safe (REST
    checks tokens in a worker thread)."""

    def __init__(self, max_failures: int, lockout_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds
        self._clock = clock
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (failures, locked until)
        self._lock = threading.Lock()

    def locked_for(self, key: str) -> float:
        """Seconds this key stays locked out (0 when it may try)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return 0.0
            failures, until = entry
            now = self._clock()
            if failures and now - until > MAX_LOCKOUT_SECONDS:  # quiet long enough: forgive
                del self._entries[key]
                return 0.0
            return max(0.0, until - now)

    def failed(self, key: str) -> None:
        with self._lock:
            failures, _ = self._entries.pop(key, (0, 0.0))
            failures += 1
            now = self._clock()
            until = now
            if failures >= self.max_failures:
                until = now + min(self.lockout_seconds * 2 ** (failures - self.max_failures), MAX_LOCKOUT_SECONDS)
            self._entries[key] = (failures, until)
            while len(self._entries) > _THROTTLE_KEYS:
                self._entries.popitem(last=False)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)


@dataclass(frozen=True, slots=True)
class _User:
    principal: Principal
    passcode_hash: str | None
    token_hashes: tuple[str, ...]


class ConfiguredAuthorizer:
    """Users and permissions from a :class:`UsersFile`; implements ``app.broker.auth.TokenAuthorizer``."""

    def __init__(self, config: UsersFile, throttle: LoginThrottle) -> None:
        self.throttle = throttle
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
        self._verified_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ConfiguredAuthorizer:
        assert settings.users_file is not None
        throttle = LoginThrottle(settings.login_failures_before_lockout, settings.login_lockout_seconds)
        return cls(UsersFile.load(settings.users_file), throttle)

    # ---- authentication ----

    def authenticate(self, login: str | None, passcode: str | None) -> Principal | None:
        """STOMP CONNECT: login and passcode, throttled per login name."""
        if not login or passcode is None:
            log.warning("STOMP login refused: no login or passcode given")
            return None
        key = "login:" + login
        wait = self.throttle.locked_for(key)
        if wait > 0:
            log.warning("STOMP login refused for user %r: locked out for %.1fs after repeated failures", login, wait)
            return None
        user = self._users.get(login)
        principal = None
        if user is not None and user.passcode_hash is not None:
            principal = self._check(_login_key(login, passcode), passcode, (user.passcode_hash,), user)
        if principal is None:
            self.throttle.failed(key)
            log.warning("STOMP login failed for user %r", login)
            return None
        self.throttle.succeeded(key)
        return principal

    def needs_slow_check(self, login: str | None, passcode: str | None) -> bool:
        if not login or passcode is None:
            return False
        user = self._users.get(login)
        if user is None or user.passcode_hash is None or user.passcode_hash.startswith("sha256:"):
            return False
        if self.throttle.locked_for("login:" + login) > 0:
            return False
        return not self._verified_before(_login_key(login, passcode), user)

    def authenticate_token(self, token: str | None, peer: str) -> Principal | None:
        """REST: a bearer token, throttled per client address."""
        key = "peer:" + peer
        wait = self.throttle.locked_for(key)
        if wait > 0:
            log.warning("REST token refused from %s: locked out for %.1fs after repeated failures", peer, wait)
            return None
        if not token:
            return None  # a missing token is not a guess: do not count it
        principal = None
        for user in self._users.values():
            principal = self._check(b"t\0" + token.encode(), token, user.token_hashes, user)
            if principal is not None:
                break
        if principal is None:
            self.throttle.failed(key)
            log.warning("REST token not accepted from %s", peer)
            return None
        self.throttle.succeeded(key)
        return principal

    def _verified_before(self, cache_input: bytes, user: _User) -> bool:
        with self._verified_lock:
            return self._verified.get(self._digest(cache_input)) is user.principal

    def _digest(self, cache_input: bytes) -> bytes:
        return hmac.new(self._cache_key, cache_input, hashlib.sha256).digest()

    def _check(self, cache_input: bytes, secret: str, hashes: tuple[str, ...], user: _User) -> Principal | None:
        if self._verified_before(cache_input, user):
            return user.principal
        digest = self._digest(cache_input)
        if not any(verify_secret(secret, hashed) for hashed in hashes):
            return None
        with self._verified_lock:
            self._verified[digest] = user.principal
            while len(self._verified) > _VERIFIED_CACHE:
                self._verified.popitem(last=False)
        return user.principal

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
