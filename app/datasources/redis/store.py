"""The Redis store: the client, the scripts, the notification listener, the persistence check at start-up, and how
driver errors become the contract's errors."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import RedisCluster

from app.datasources.failover import FailoverWriter
from app.datasources.interface import (
    DatasourceError,
    DatasourceOptions,
    DatasourceUnavailable,
    NewMessage,
    StoredMessage,
)
from app.datasources.redis import scripts
from app.datasources.sql_rows import decode_headers, headers_text

__all__ = ["Store", "WriteResult", "queue_prefix", "LAYOUT", "message_from", "new_args", "ORDER_BAND", "order_score", "order_key"]

log = logging.getLogger("stompgate.datasource.redis")

T = TypeVar("T")
# a single server (or a Sentinel-managed primary) or a Redis Cluster: both take the same calls (``Store.open``)
Client = aioredis.Redis | RedisCluster

CONNECT_TIMEOUT_S = 5.0
# a silent server is found after this long; blocking reads (topic followers) block for less
SOCKET_TIMEOUT_S = 30.0
LISTEN_RETRY_S = (0.1, 2.0)
LISTEN_POLL_S = 1.0
HEALTH_CHECK_S = 15
LAYOUT = 2  # the key layout's version (``{ns}:layout``); 1 is the first build's, which wrote none
ORDER_BAND = 2**44  # claim-order score = (9 - priority) * ORDER_BAND + seq


def order_score(priority: int, seq: int) -> int:
    return (9 - priority) * ORDER_BAND + seq


def order_key(score: int) -> tuple[int, int]:
    """A claim-order score as the (priority, seq) a ScanMark holds."""
    band, seq = divmod(score, ORDER_BAND)
    return 9 - band, seq


# Errors that mean "Redis cannot be reached right now" (the operation did not take effect, or is safe to retry). A
# replica answering READONLY (a failover under way) and a server still loading its data count too.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.ReadOnlyError,
    rexc.BusyLoadingError,
    OSError,
    asyncio.TimeoutError,
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def message_from(row: Sequence[Any]) -> StoredMessage:
    """A message as the scripts return it: ``scripts.FIELDS`` in order."""
    message_id, destination, headers, body, priority, expires, published, seq, deliveries, original, lease = row
    return StoredMessage(
        message_id=_text(message_id),
        destination=_text(destination),
        headers=decode_headers(_text(headers)),
        body=bytes(body),
        priority=int(priority),
        expires_at=int(expires) if expires else None,
        published_at=int(published),
        seq=int(seq),
        deliveries=int(deliveries),
        original_destination=_text(original) if original else None,
        lease=int(lease),
    )


def new_args(messages: Sequence[NewMessage]) -> list[Any]:
    """The 7 script arguments of each new message (see ``scripts.APPLY``)."""
    out: list[Any] = []
    for m in messages:
        if not 0 <= m.priority <= 9:
            raise DatasourceError(f"priority {m.priority} is out of range 0-9")
        out += [
            m.message_id, m.destination, m.priority, "" if m.expires_at is None else m.expires_at, m.published_at,
            headers_text(m.headers), m.body,
        ]  # fmt: skip
    return out


class WriteResult:
    __slots__ = ("replayed", "newest", "woken")

    def __init__(self, replayed: bool, newest: int, woken: list[str]) -> None:
        self.replayed = replayed
        self.newest = newest
        self.woken = woken


def queue_prefix(namespace: str, destination: str) -> str:
    """The prefix of a destination's keys, as the scripts' ``qp`` makes it (its length in bytes, then itself)."""
    return f"{{{namespace}}}:q:{len(destination.encode())}:{destination}"


def _client_options() -> dict[str, Any]:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        # a connection idle this long is PINGed before use: the listener finds a server gone silent
        "health_check_interval": HEALTH_CHECK_S,
        "decode_responses": False,
    }


def where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


class Store:
    """The client, the scripts, the listener and the error translation that queues and topics share."""

    def __init__(self, url: str, options: DatasourceOptions) -> None:
        try:  # a malformed URL is the operator's to fix: one sentence, without the URL (it may hold a password)
            parts = urlsplit(url)
            parts.port, parts.hostname  # noqa: B018 - these parse the authority and raise on a bad one
            db = parts.path.lstrip("/")
            if db and not db.isdigit():
                raise ValueError(f"the database must be a number (redis://host:port/0), not {db!r}")
        except ValueError as exc:
            raise DatasourceError(f"the Redis URL is not valid: {exc}") from None
        self.url = url
        self.where = where(url)
        self._password = unquote(parts.password) if parts.password else None
        self.options = options
        self.ns = options.namespace
        if "{" in self.ns or "}" in self.ns:
            raise DatasourceError(f"the namespace {self.ns!r} may not contain braces (they make Redis hash tags)")
        self.channel = f"{self.ns}:wake"
        tag = f"{{{self.ns}}}"  # every key of the namespace in one hash slot (see ``scripts``)
        self.topic_log = f"{tag}:t:log"
        self.topic_head = f"{tag}:t:head"
        self.cursors = f"{tag}:cursors"
        self.dests = f"{tag}:dests"
        self.layout_key = f"{tag}:layout"
        self.anchor = f"{tag}:seq"  # the key each script declares: it routes the call to the namespace's node
        self.cluster = False
        try:
            self.client: Client = aioredis.from_url(url, **_client_options())
        except ValueError as exc:
            raise DatasourceError(f"the Redis URL is not valid: {self.scrub(str(exc))}") from None
        self.scripts: dict[str, Any] = {}
        self.writer = FailoverWriter(options.failover_buffer, unavailable=(DatasourceUnavailable,), database="Redis")
        self.listening = False
        self._listener_task: asyncio.Task[None] | None = None
        self._handlers: list[Callable[[str], None]] = []
        self._lost: list[Callable[[], None]] = []
        self._listening_handlers: list[Callable[[bool], None]] = []
        self._first_listen = asyncio.Event()
        self._closed = False

    def scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    # -- lifecycle -------------------------------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self.client.ping()
            if await self._cluster_enabled():
                await self._switch_to_cluster()
            await self.check_layout()
            await self.check_persistence()
            self.scripts = {name: self.client.register_script(getattr(scripts, name)) for name in scripts.NAMES}
            for script in self.scripts.values():  # loaded once; called by hash from now on (reloaded on NOSCRIPT)
                await self.client.script_load(script.script)
        except DatasourceError:
            await self.client.aclose()
            raise
        except Exception as exc:  # noqa: BLE001 - every way of failing to start becomes one sentence
            await self.client.aclose()
            raise DatasourceError(self.connect_failure(exc)) from None
        self._listener_task = asyncio.get_running_loop().create_task(self._listen(), name="redis listener")
        try:  # start with notifications flowing (no waiter can have missed one yet); if not, polling covers it
            await asyncio.wait_for(self._first_listen.wait(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("Redis notifications are not flowing yet: consumers poll until they do")

    async def _cluster_enabled(self) -> bool:
        try:
            info = await self.client.info("cluster")
        except rexc.ResponseError:  # INFO refused (a managed service): taken as a single server
            return False
        return str(info.get("cluster_enabled", 0)) == "1"

    async def _switch_to_cluster(self) -> None:
        """The URL names a node of a Redis Cluster: from here on a cluster client, which finds the other nodes and
        sends each call to the node that serves its key's slot. A cluster has database 0 only."""
        if urlsplit(self.url).path.lstrip("/") not in ("", "0"):
            raise DatasourceError(self.cluster_database_refusal())
        await self.client.aclose()
        self.client = RedisCluster.from_url(self.url, **_client_options())
        await self.client.initialize()
        self.cluster = True
        log.info("Redis at %s is a cluster node: namespace %r lives in one hash slot", self.where, self.ns)

    def cluster_database_refusal(self) -> str:
        db = urlsplit(self.url).path.lstrip("/")
        return f"Redis at {self.where} is a cluster node, and a cluster has database 0 only, not {db}"

    async def check_layout(self) -> None:
        """Refuse a namespace written by a build whose key layout differs (a newer one, or the first Redis build,
        which kept a destination's keys under a hash tag of their own and wrote no layout version)."""
        stored = await self.client.get(self.layout_key)
        if stored is None:
            earlier = (self.anchor, self.dests, f"{{{self.ns}:t}}:head")  # one by one: on Cluster they are two slots
            if any([await self.client.exists(key) for key in earlier]):
                raise DatasourceError(
                    f"Redis namespace {self.ns!r} at {self.where} holds data in the key layout of an earlier stompgate "
                    f"build: drain it with that build, or choose another --namespace"
                )
            await self.client.set(self.layout_key, LAYOUT, nx=True)
        elif _text(stored) != str(LAYOUT):
            raise DatasourceError(
                f"Redis namespace {self.ns!r} at {self.where} has key layout {_text(stored)}, and this build knows "
                f"layout {LAYOUT} only: upgrade stompgate, or choose another --namespace"
            )

    def connect_failure(self, exc: BaseException) -> str:
        """One sentence for a failure at start-up, naming the server but never the password."""
        reason = self.scrub(str(exc)) or type(exc).__name__
        if isinstance(exc, rexc.AuthenticationError) or "WRONGPASS" in reason or "NOAUTH" in reason:
            return f"Redis at {self.where} refused the login ({reason}): check the password in the URL"
        if isinstance(exc, UNAVAILABLE):
            return f"cannot reach Redis at {self.where}: {reason}"
        if "SELECT is not allowed in cluster mode" in reason:  # the URL names a database other than 0
            return self.cluster_database_refusal()
        return f"cannot open Redis at {self.where}: {type(exc).__name__}: {reason}"

    async def check_persistence(self) -> None:
        """Say what a RECEIPT means with this server's settings: stored durably only with an fsync per write."""
        try:
            got = await self._config_get("append*")
        except rexc.ResponseError as exc:  # CONFIG renamed or refused (managed Redis)
            log.warning(
                "could not check the persistence settings of Redis at %s (CONFIG GET refused: %s): a RECEIPT means "
                "stored durably only if the server runs with appendonly yes and appendfsync always",
                self.where, exc,
            )  # fmt: skip
            return
        settings = {_text(k): _text(v) for k, v in got.items()}
        appendonly, appendfsync = settings.get("appendonly", "?"), settings.get("appendfsync", "?")
        if appendonly != "yes":
            log.warning(
                "Redis at %s runs without an append-only file (appendonly %s): a RECEIPT means the message is in "
                "Redis's memory only, and a Redis crash or restart loses what the last snapshot did not hold; run "
                "Redis with appendonly yes and appendfsync always for RECEIPTs that mean stored",
                self.where, appendonly,
            )  # fmt: skip
        elif appendfsync != "always":
            log.warning(
                "Redis at %s writes its append-only file with appendfsync %s, not always: a RECEIPT means the message "
                "reached Redis, and a power loss or OS crash can lose the last %s of RECEIPTed messages; set "
                "appendfsync always for RECEIPTs that mean stored",
                self.where, appendfsync, "second" if appendfsync == "everysec" else "OS write-back interval",
            )  # fmt: skip
        else:
            log.info("Redis at %s: appendonly yes, appendfsync always: a RECEIPT means stored on disk", self.where)
        policy = _text((await self._config_get("maxmemory-policy")).get("maxmemory-policy", "noeviction"))
        if policy != "noeviction":
            log.warning(
                "Redis at %s evicts keys when its memory is full (maxmemory-policy %s): stored messages, the topic "
                "head and the marks that make a replayed write take effect once may then vanish; set "
                "maxmemory-policy noeviction (writes are then refused when memory is full, and wait in the buffer)",
                self.where, policy,
            )  # fmt: skip

    async def _config_get(self, pattern: str) -> dict[Any, Any]:
        """CONFIG GET on the server that holds the namespace: on Cluster, the node serving its slot."""
        if isinstance(self.client, RedisCluster):
            node = self.client.get_node_from_key(self.anchor)
            return dict(await self.client.config_get(pattern, target_nodes=node))
        return dict(await self.client.config_get(pattern))

    async def close(self) -> None:
        self._closed = True
        await self.writer.close()
        if self._listener_task is not None:
            self._listener_task.cancel()
            await asyncio.gather(self._listener_task, return_exceptions=True)
        try:
            await self.client.aclose()
        except UNAVAILABLE:
            pass

    # -- calls -----------------------------------------------------------------------------------------------------

    async def call(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run a Redis call; the server out of reach is ``DatasourceUnavailable``, a refusal ``DatasourceError``."""
        try:
            return await work()
        except UNAVAILABLE as exc:
            raise DatasourceUnavailable(f"Redis: {self.scrub(str(exc)) or type(exc).__name__}") from exc
        except rexc.ResponseError as exc:
            if str(exc).startswith("BUSY"):  # a long script holds the server: nothing of ours ran, try again later
                raise DatasourceUnavailable(f"Redis: {self.scrub(str(exc))}") from exc
            raise DatasourceError(f"Redis: {self.scrub(str(exc))}") from None
        except rexc.RedisError as exc:
            raise DatasourceError(f"Redis: {type(exc).__name__}: {self.scrub(str(exc))}") from None

    async def script(self, name: str, args: Sequence[Any]) -> Any:
        script = self.scripts[name]
        return await self.call(lambda: script(keys=[self.anchor], args=[self.ns, *args]))

    async def write(
        self,
        queue: Sequence[NewMessage] = (),
        topic: Sequence[NewMessage] = (),
        acks: Sequence[tuple[str, int | None]] = (),
        requeue: Sequence[tuple[str, int | None]] = (),
        dead_letter: Sequence[tuple[str, int | None]] = (),
        *,
        buffered: bool = True,
    ) -> WriteResult:
        """One atomic write (``scripts.APPLY``) through the failover buffer. Its token makes a replay take effect
        once: the script stores it as a mark with its changes, and a replay that finds the mark does nothing.

        Not ``buffered`` (ACKs and releases alone, which the broker retries itself): run at once, without a mark
        (running one twice changes nothing more, as each is fenced by its lease token and by the message's state);
        an unreachable server is ``DatasourceUnavailable`` to the caller."""
        token = uuid.uuid4().hex if buffered else ""
        args: list[Any] = [token, self.options.topic_retention, len(queue), len(topic), len(acks), len(requeue)]
        args += [len(dead_letter), *new_args(queue), *new_args(topic)]
        for held in (acks, requeue, dead_letter):
            for message_id, lease in held:
                args += [message_id, "" if lease is None else lease]

        async def attempt(_retry: bool) -> WriteResult:
            replayed, newest, woken = await self.script("APPLY", args)
            return WriteResult(bool(replayed), int(newest), [_text(d) for d in woken])

        if not buffered:
            return await attempt(False)
        return await self.writer.run(len(queue) + len(topic), attempt)

    # -- notifications ---------------------------------------------------------------------------------------------

    def on_notification(self, handler: Callable[[str], None]) -> None:
        self._handlers.append(handler)

    def on_listener_lost(self, handler: Callable[[], None]) -> None:
        """Called when the listener reconnects: notifications may have been missed meanwhile."""
        self._lost.append(handler)

    def on_listening(self, handler: Callable[[bool], None]) -> None:
        self._listening_handlers.append(handler)

    def _set_listening(self, value: bool) -> None:
        self.listening = value
        for handler in self._listening_handlers:
            handler(value)

    async def _listen(self) -> None:
        delay = LISTEN_RETRY_S[0]
        warned = False
        while not self._closed:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._set_listening(True)
                delay, warned = LISTEN_RETRY_S[0], False
                if self._first_listen.is_set():
                    for lost in self._lost:  # notifications sent while not subscribed were missed: look again
                        lost()
                self._first_listen.set()
                while True:
                    message = await pubsub.get_message(timeout=LISTEN_POLL_S)
                    if message is not None and message.get("type") == "message":
                        payload = _text(message["data"])
                        for handler in self._handlers:
                            handler(payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the listener keeps trying; polling covers the meantime
                if self.listening or not warned:
                    log.warning("Redis notifications stopped (%s); consumers poll until they flow again", self.scrub(str(exc)))
                    warned = True
            finally:
                if self.listening:
                    self._set_listening(False)
                    for lost in self._lost:
                        lost()
                try:
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
                except Exception:  # noqa: BLE001 - a dead connection closes as it can
                    pass
            if not self._closed:
                await asyncio.sleep(delay)
                delay = min(delay * 2, LISTEN_RETRY_S[1])
