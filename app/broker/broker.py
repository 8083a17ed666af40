"""The broker: sessions, subscriptions and delivery over one datasource. Transports and REST call into it."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Coroutine, Mapping
from typing import Any, Literal, NamedTuple

from app.broker.auth import AllowAll, Authorizer
from app.broker.batching import Batcher
from app.broker.transactions import TransactionMemory
from app.broker.config import BrokerConfig
from app.broker.destinations import parse_destination
from app.broker.messages import new_message
from app.broker.metrics import BrokerMetrics
from app.broker.session import Session
from app.broker.cursors import CursorSaver
from app.broker.supervision import BackgroundHealth, supervise
from app.broker.subscriptions import TopicSubscription
from app.datasources.interface import (
    Changes,
    Datasource,
    DatasourceUnavailable,
    Held,
    NewMessage,
    Published,
    Release,
)

__all__ = ["Broker", "Refusal"]

log = logging.getLogger("stompgate.broker")

TICK_S = 0.25  # the heart-beat and login-timeout timer
ACK_ATTEMPTS = 5  # tries of one ACK batch against a failing database (about 0.75 s of back-off in all)


class Refusal(NamedTuple):
    """A connection the broker will not take: the ERROR frame's ``message`` and body, and the metrics label."""

    message: str
    detail: str
    metric: str


class Broker:
    def __init__(
        self,
        datasource: Datasource,
        config: BrokerConfig | None = None,
        *,
        authorizer: Authorizer | None = None,
        metrics: BrokerMetrics | None = None,
    ) -> None:
        self.datasource = datasource
        self.config = config or BrokerConfig()
        self.authorizer: Authorizer = authorizer or AllowAll()
        self.metrics = metrics or BrokerMetrics(max_destinations=self.config.metrics_max_destinations)
        # Unique per process start: message ids are "<gateway>-<n>", unique across gateways sharing a database.
        self.gateway_id = secrets.token_hex(6)
        self._message_counter = itertools.count(1)
        self._session_counter = itertools.count(1)
        self.sessions: dict[str, Session] = {}
        # Open sessions per client IP address (for max_connections_per_address), and each session's address.
        self.connections_per_address: dict[str, int] = {}
        self._address_of: dict[str, str] = {}
        self.topic_subscriptions: dict[str, set[TopicSubscription]] = defaultdict(set)
        self.durable_in_use: set[str] = set()
        self.transaction_memory = TransactionMemory(self.config)  # every connection's open transactions
        self.health = BackgroundHealth(on_change=self._background_changed)
        self.cursors = CursorSaver(self._save_cursor, self._delete_cursor, self.health)
        self._topic_position: int | None = None  # the topic follower's place, kept across its restarts
        self._queue_writer: Batcher[NewMessage] = Batcher(self._put_queues)
        self._topic_writer: Batcher[NewMessage] = Batcher(self._publish_topics)
        self._acker: Batcher[Held] = Batcher(self._ack_with_retry)
        # Queue SENDs and ACKs in one group writer where the store wants them in one transaction (group commit).
        self._sends_and_acks: Batcher[Changes] | None = (
            Batcher(self._write_sends_and_acks, max_batch=256) if datasource.joins_sends_and_acks else None
        )
        # Several connections' COMMITs share one database transaction where ``apply`` is atomic; elsewhere each
        # goes alone, since a group that failed part-way could not be written again one COMMIT at a time.
        self._committer: Batcher[Changes] = Batcher(
            self._apply_commits, max_batch=64 if datasource.atomic_changes else 1
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        # Messages this gateway holds for nobody: their consumer is gone or settled them, but the ACK or release
        # that should have ended their lease failed. Lease renewal (which renews every lease of this gateway) would
        # keep them held for good, so the renewal step gives them back (requeues them, fenced) until that succeeds.
        self._give_back: dict[Held, None] = {}
        self._background: list[asyncio.Task[None]] = []
        self.accepting = True
        self.started_at = time.time()

    # ---- lifecycle ----

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        health = self.health
        renew_every = max(self.config.lease_ms / 3000, 0.5)
        sweep_every = max(1.0, min(60.0, self.config.metrics_idle_seconds / 10))  # a slot comes back at most 10% late
        self._background = [
            loop.create_task(supervise("topic follower", self._follow_topics, health), name="topic follower"),
            loop.create_task(supervise("heart-beat tick", self._tick, health, every=TICK_S), name="heart-beat tick"),
            loop.create_task(
                supervise("lease renewal", self._renew_leases, health, every=renew_every), name="lease renewal"
            ),
            loop.create_task(
                supervise("metric slots", self.forget_idle_destinations, health, every=sweep_every),
                name="metric slots",
            ),
        ]

    async def stop(self) -> None:
        """Stop accepting, tell every client with an ERROR, release what they held, finish writes in flight."""
        self.accepting = False
        sessions = list(self.sessions.values())
        # Finish what clients already sent (their RECEIPTs included) before telling them, within a bound.
        quiet = asyncio.gather(*(s.quiesce() for s in sessions), return_exceptions=True)
        try:
            await asyncio.wait_for(quiet, timeout=self.config.shutdown_grace)
        except asyncio.TimeoutError:
            log.warning("shutdown: some receipts did not complete within %.1fs", self.config.shutdown_grace)
        for session in sessions:
            session.close_with_error("Server shutting down", "the gateway is stopping; reconnect to another")
        for session in list(self.sessions.values()):
            session.connection_lost()
            await session.wait_ended()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._queue_writer.close()
        await self._topic_writer.close()
        await self._acker.close()
        if self._sends_and_acks is not None:
            await self._sends_and_acks.close()
        await self._committer.close()
        await self.cursors.close()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ---- sessions ----

    def new_session_id(self) -> str:
        return f"{self.gateway_id}-s{next(self._session_counter)}"

    def refusal(self, address: str | None = None) -> Refusal | None:
        """Why a new connection from IP ``address`` would be refused; None when it is welcome."""
        if not self.accepting:
            return Refusal("Connection refused", "the gateway is shutting down", "shutting down")
        limit = self.config.max_connections
        if len(self.sessions) >= limit:
            return Refusal(
                f"Connection refused (limit max_connections={limit})", "the gateway is at max_connections", "connection limit"
            )
        per_address = self.config.max_connections_per_address
        if address is not None and self.connections_per_address.get(address, 0) >= per_address:
            return Refusal(
                f"Connection refused (limit max_connections_per_address={per_address})",
                f"{address} already holds max_connections_per_address={per_address} STOMP connections",
                "address connection limit",
            )
        return None

    def open_session(self, transport: Any, *, peer: str, kind: str, address: str | None = None) -> Session | None:
        """A new connection from IP ``address``; None when ``refusal`` says no (the transport then closes it)."""
        if (refused := self.refusal(address)) is not None:
            self.metrics.error(refused.metric)
            return None
        # A session knows its broker as a session.SessionBroker (ports.BrokerPort and the calls that take a session or
        # a topic subscription): passing ``self`` here is where mypy checks that Broker provides all of it.
        session = Session(self, transport, peer=peer, kind=kind)
        self.sessions[session.id] = session
        if address is not None:
            self._address_of[session.id] = address
            self.connections_per_address[address] = self.connections_per_address.get(address, 0) + 1
        self.metrics.connections.labels(kind).inc()
        return session

    def forget_session(self, session: Session) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.metrics.connections.labels(session.kind).dec()
        address = self._address_of.pop(session.id, None)
        if address is not None:
            left = self.connections_per_address[address] - 1
            if left:
                self.connections_per_address[address] = left
            else:
                del self.connections_per_address[address]  # no entry per address ever seen: the dict stays bounded

    # ---- publishing ----

    def new_message_id(self) -> str:
        return f"{self.gateway_id}-{next(self._message_counter)}"

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)

    def build_message(self, destination: str, headers: Mapping[str, str], body: bytes) -> NewMessage:
        return new_message(
            message_id=self.new_message_id(), destination=destination, headers=headers, body=body, now_ms=self.now_ms()
        )

    def publish_nowait(self, messages: list[NewMessage], kind: Literal["queue", "topic"]) -> asyncio.Future[None]:
        """Queue ``messages`` (all of one kind) for the next group write; the future completes once durable."""
        self.metrics.published(kind, [m.destination for m in messages])
        if kind == "queue" and self._sends_and_acks is not None:
            return self._sends_and_acks.submit([Changes(queue=messages)])
        writer = self._queue_writer if kind == "queue" else self._topic_writer
        return writer.submit(messages)

    async def publish(self, destination: str, headers: Mapping[str, str], body: bytes) -> NewMessage:
        """Publish one message (REST uses this); returns once it is durably stored."""
        parsed = parse_destination(destination)
        message = self.build_message(destination, headers, body)
        await self.publish_nowait([message], parsed.kind)
        return message

    async def _put_queues(self, messages: list[NewMessage]) -> None:
        await self.datasource.queues.put(messages)

    async def _publish_topics(self, messages: list[NewMessage]) -> None:
        await self.datasource.topics.publish(messages)

    # ---- transactions ----

    def commit_nowait(self, changes: Changes) -> asyncio.Future[None]:
        """Store a STOMP COMMIT's changes with the next group of commits; the future completes once they are
        stored (all or nothing where ``datasource.atomic_changes``). The session keeps the messages it settles
        unacknowledged until then: when the COMMIT fails, the connection's close gives them back."""
        if changes.queue:
            self.metrics.published("queue", [m.destination for m in changes.queue])
        if changes.topic:
            self.metrics.published("topic", [m.destination for m in changes.topic])
        future = self._committer.submit([changes])

        def settled(done: asyncio.Future[None]) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            if changes.requeue:
                self.metrics.redelivered(len(changes.requeue))
            if changes.dead_letter:
                self.metrics.dead_lettered(len(changes.dead_letter))

        future.add_done_callback(settled)
        return future

    async def _apply_commits(self, batch: list[Changes]) -> None:
        await self.datasource.apply(Changes.merge(batch))

    # ---- acknowledgements ----

    async def _ack_with_retry(self, held: list[Held]) -> None:
        """An ACK is a delete by id and lease, so it is safe to repeat: a passing database error is retried a few
        times before the session is told, because failing it would redeliver messages the client already processed.
        Fenced by the lease: an ACK whose lease lapsed and whose message was claimed again deletes nothing (the
        message is redelivered, as with any late ACK)."""
        message_ids = [message_id for message_id, _ in held]
        leases = [lease for _, lease in held]
        for attempt in range(ACK_ATTEMPTS):
            try:
                await self.datasource.queues.ack(message_ids, leases)
                return
            except Exception as exc:
                if attempt == ACK_ATTEMPTS - 1:
                    self._give_back.update(dict.fromkeys(held))  # the client was told: they come again
                    raise
                log.warning("ack of %d messages failed (attempt %d), retrying: %r", len(message_ids), attempt + 1, exc)
                await asyncio.sleep(0.05 * 2**attempt)

    def ack_nowait(self, held: list[Held]) -> asyncio.Future[None]:
        if self._sends_and_acks is not None:
            return self._sends_and_acks.submit([Changes(acks=held)])
        return self._acker.submit(held)

    def ack_in_background(self, held: list[Held]) -> None:
        self.ack_nowait(held).add_done_callback(_log_failure)

    async def _write_sends_and_acks(self, batch: list[Changes]) -> None:
        """The SENDs and ACKs that arrived together, as one ``apply``. ACKs alone (none came with SENDs, or they are
        written alone after their group failed) keep their retries; a group the database refused for want of
        space in its failover buffer gives its ACKs' messages back, as a failed ACK does."""
        changes = Changes.merge(batch)
        if not changes.queue:
            await self._ack_with_retry(list(changes.acks))
            return
        try:
            await self.datasource.apply(changes)
        except DatasourceUnavailable:
            self._give_back.update(dict.fromkeys(changes.acks))
            raise

    async def release(self, held: list[Held], how: Release) -> None:
        """Requeue or dead-letter messages this gateway's consumers hold, fenced by their leases."""
        if held:
            try:
                await self.datasource.queues.release([i for i, _ in held], how, [lease for _, lease in held])
            except Exception:
                self._give_back.update(dict.fromkeys(held))
                raise
            if how is Release.REQUEUE:
                self.metrics.redelivered(len(held))
            else:
                self.metrics.dead_lettered(len(held))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    def metrics_delivered(self, destination: str, count: int) -> None:
        self.metrics.delivered(destination, count)

    async def forget_idle_destinations(self) -> None:
        """Give back the metric slots (config.metrics_max_destinations) of destinations that look gone: no publish or
        delivery here for config.metrics_idle_seconds, no subscriber here and, for a queue, no stored message (unless
        every slot is taken). One step, run by ``supervise``."""
        idle_for = self.config.metrics_idle_seconds
        idle = self.metrics.idle_destinations(idle_for)
        if not idle:
            return
        subscribed = {sub.destination_text for s in list(self.sessions.values()) for sub in list(s.subscriptions.values())}
        # With every slot taken, an idle destination gives its slot back even while it holds messages: otherwise
        # one message left in each of metrics_max_destinations invented queues would pin every slot for good.
        full = self.metrics.slots_full()
        now_ms = self.now_ms()
        for destination in idle:
            if destination in subscribed:
                continue
            if not full and parse_destination(destination).kind == "queue":
                stats = await self.datasource.queues.stats(destination, now_ms=now_ms)
                if stats.ready or stats.unacked:
                    continue
            self.metrics.forget(destination, idle_for=idle_for)  # unless it had traffic during the await

    # ---- topics ----

    def add_topic_subscription(self, sub: TopicSubscription) -> None:
        self.topic_subscriptions[sub.destination_text].add(sub)

    def remove_topic_subscription(self, sub: TopicSubscription) -> None:
        subs = self.topic_subscriptions.get(sub.destination_text)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.topic_subscriptions[sub.destination_text]

    async def _follow_topics(self) -> None:
        """One follower per gateway: every topic message, from wherever it was published, fans out locally. Run by
        ``supervise``: after a failure it starts again from the last position it handed out."""
        if self._topic_position is None:
            self._topic_position = await self.datasource.topics.last_position()
        async for event in self.datasource.topics.follow(after=self._topic_position):
            if not isinstance(event, Published):
                log.warning("topic follower: messages %d..%d were lost", event.expected, event.oldest - 1)
                continue
            self._topic_position = event.position
            subs = self.topic_subscriptions.get(event.message.destination)
            if subs:
                for sub in list(subs):
                    try:
                        sub.offer(event)
                    except Exception:  # one subscriber's failure must not cost the others this message
                        log.exception("topic subscription %s failed on a delivery; closing its session", sub.id)
                        sub.session.close_with_error("Delivery failed", "the gateway could not deliver a message")
                        continue
                    sub.session.flush_soon()
                self.metrics.delivered(event.message.destination, len(subs))

    async def _save_cursor(self, name: str, position: int) -> None:
        await self.datasource.topics.save_cursor(name, position)

    async def _delete_cursor(self, name: str) -> None:
        await self.datasource.topics.delete_cursor(name)

    async def forget_durable(self, name: str) -> None:
        """Delete durable subscription ``name`` (an UNSUBSCRIBE with ``durable:true``): its saved position is
        deleted, so its next SUBSCRIBE starts fresh, at the end of the topic as of then."""
        await self.cursors.delete(name)

    def save_cursor_soon(self, name: str, position: int) -> asyncio.Future[None]:
        """Save a durable subscription's position with the next batch of saves (within 50 ms); the future completes
        once it is stored (a durable ACK's RECEIPT waits for it)."""
        return self.cursors.save_soon(name, position)

    # ---- timers ----

    def _background_changed(self, name: str, failing: bool) -> None:
        self.metrics.background_failing.labels(name).set(1 if failing else 0)

    async def _tick(self) -> None:
        """Heart-beats both ways and the login timeout, for every session: one step of the timer ``supervise`` runs
        every ``TICK_S``."""
        now = time.monotonic()
        for session in list(self.sessions.values()):
            try:
                self._tick_session(session, now)
            except Exception:  # one session's failure must not cost the others their heart-beats and timeouts
                log.exception("session %s: heart-beat tick failed", session.id)

    def _tick_session(self, session: Session, now: float) -> None:
        if session.finished:
            return
        plan = session.heartbeat
        if plan is None:
            if now - session.opened_at > self.config.login_timeout:
                session.close_with_error("Login timeout", f"no CONNECT within login_timeout={self.config.login_timeout}s")
            return
        if plan.peer_dead(session.last_received, now) and not session.reading_paused:
            self.metrics.error("heart-beat timeout")
            session.close_with_error("Heart-beat timeout", "no frame or heart-beat received in time")
        elif plan.send_due(session.last_sent, now):
            session.send_heartbeat()

    async def _renew_leases(self) -> None:
        """Keep the leases of our in-flight messages alive, so only a dead gateway's messages come back. One step:
        ``supervise`` runs it every lease/3 and retries any failure, whatever its kind."""
        await self.datasource.queues.renew(self.gateway_id, lease_ms=self.config.lease_ms, now_ms=self.now_ms())
        if self._give_back:
            held = list(self._give_back)
            await self.datasource.queues.release([i for i, _ in held], Release.REQUEUE, [lease for _, lease in held])
            for pair in held:
                self._give_back.pop(pair, None)
            log.info("gave back %d messages whose ACK or release had failed", len(held))


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.error("background operation failed: %r", exc)
