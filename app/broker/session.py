"""One STOMP connection, whatever carries its bytes: frames in, broker calls out, frames back.

The transport calls ``receive`` with bytes and ``connection_lost`` at the end; the session writes through the small
``Transport`` protocol. ``receive`` never awaits: work that must reach the database returns a future, and the
``Completions`` queue sends each RECEIPT (or ERROR) in frame order once the work it confirms is durable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import partial
from collections.abc import Coroutine, Mapping
from typing import Any, Literal, Protocol

from app.broker.auth import ANONYMOUS, Principal
from app.broker.claim_budget import ClaimBudget
from app.broker.completions import Completions
from app.broker.errors import SessionError
from app.broker.ordering import WriteOrder
from app.broker.destinations import Destination, InvalidDestination, parse_destination
from app.broker.messages import HeaderError, delivery_headers
from app.broker.ports import BrokerPort, SessionPort, SubscriptionPort
from app.broker.selectors import SelectorError, compile_selector
from app.broker.transactions import Settlement, TransactionMemory, Transactions
from app.broker.subscriptions import (
    SubscriptionArgs,
    DurableTopicSubscription,
    QueueSubscription,
    Subscription,
    TopicSubscription,
)
from app.datasources.interface import Held, NewMessage, Release, StoredMessage
from stomp_core import (
    Abort,
    Ack,
    Begin,
    Commit,
    ConnectRequested,
    Disconnect,
    HeartbeatPlan,
    Nack,
    ProtocolViolation,
    Send,
    ServerConnection,
    ServerEvent,
    State,
    Subscribe,
    Unsubscribe,
)

__all__ = ["Session", "SessionBroker", "Transport"]

log = logging.getLogger("stompgate.session")


@dataclass(slots=True)
class _SendGroup:
    """The SENDs of one read to one kind of destination: one group write, the future it completes, and their bytes."""

    messages: list[NewMessage]
    stored: asyncio.Future[None]
    size: int = 0


# Queued MESSAGE bytes at which a delivery flushes at once rather than at the end of the event-loop turn: small
# messages still share one socket write, and a burst of large ones never sits twice in memory.
FLUSH_EARLY_BYTES = 256 * 1024


class Transport(Protocol):
    """What a session needs from TCP or WebSocket: buffered writes, close, and read flow control."""

    def write(self, data: bytes) -> None: ...

    def writelines(self, chunks: list[bytes]) -> None:
        """Write the chunks in order, as one ``write`` of their concatenation would (a large body is not copied)."""

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def write_backlog(self) -> int:
        """Bytes written but not yet handed to the network."""

    async def drained(self) -> None:
        """Return once the write backlog is small again."""


class SessionBroker(BrokerPort, Protocol):
    """What a session needs from the broker: ``BrokerPort``, plus the calls that hand the broker this layer's objects
    (the session itself, its live topic subscriptions), which ports.py cannot name. ``Broker`` satisfies it."""

    def add_topic_subscription(self, sub: TopicSubscription) -> None: ...  # the topic follower feeds it from now on

    def remove_topic_subscription(self, sub: TopicSubscription) -> None: ...

    def forget_session(self, session: Session) -> None: ...  # the connection ended and released what it held

    @property
    def transaction_memory(self) -> TransactionMemory: ...  # what every connection's open transactions hold


class Session:
    def __init__(self, broker: SessionBroker, transport: Transport, *, peer: str, kind: str) -> None:
        self.broker: SessionBroker = broker
        self.transport = transport
        self.peer = peer
        self.address = peer.rpartition(":")[0] or peer  # the client's IP address, without the port
        self.kind = kind  # "tcp" or "websocket"
        self.id = broker.new_session_id()
        self.conn = ServerConnection(limits=broker.config.limits, server=broker.config.server_name)
        self.principal: Principal | None = None
        self.client_id: str | None = None
        self.subscriptions: dict[str, Subscription] = {}
        self.topic_waiting_bytes = 0  # topic messages waiting for ACK room (see TopicSubscription)
        self.claim_budget = ClaimBudget()  # what the queue subscriptions claimed and hold (see QueueSubscription)
        self.transactions = Transactions(broker.transaction_memory, broker.config, self.address)
        self.heartbeat: HeartbeatPlan | None = None
        now = time.monotonic()
        self.opened_at = now
        self.last_received = now
        self.last_sent = now
        self.frames_in = 0
        self.messages_out = 0
        self.finished = False
        self._failing = False  # an ERROR is due once the frames before the bad one are done: read and deliver no more
        self._paused = False
        self._quiesced = False  # a graceful shutdown stopped reading: nothing resumes it
        self._inflight_bytes = 0  # this connection's SENDs (bodies, headers; a COMMIT's too) not yet stored
        self._completions = Completions(self._maybe_resume)
        self._ending: asyncio.Task[None] | None = None
        self._flush_scheduled = False
        self._pending_sends: dict[Literal["queue", "topic"], _SendGroup] = {}
        self._pending_acks: tuple[list[Held], asyncio.Future[None]] | None = None
        self._order = WriteOrder()  # the database sees this connection's SENDs, ACKs and COMMITs in the order sent
        self._destinations: dict[str, Destination] = {}  # parsed destination names, per connection
        self._held: list[ServerEvent] | None = None  # frames that came after a CONNECT still being checked
        self._login: asyncio.Task[None] | None = None  # that check (a reference keeps the task alive)

    # ---- from the transport ----

    def receive(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        if self.finished or self._failing:
            return
        events = self.conn.receive_data(data)
        if self._held is not None:  # the CONNECT is being checked off the event loop: these wait for it
            self._held.extend(events)
            return
        self._run(events)

    def _run(self, events: list[ServerEvent]) -> None:
        for i, event in enumerate(events):
            if self.conn.closed or self.finished or self._failing:
                break
            self.frames_in += 1
            try:
                self._dispatch(event)
            except SessionError as exc:
                self._fail_after_earlier_frames(exc.message, exc.detail, _receipt_of(event))
            if self._held is not None:  # that was a CONNECT now checked in a thread: the rest waits for it
                self._held.extend(events[i + 1 :])
                return
        self._submit_sends()
        self.flush()
        config = self.broker.config
        if not self._paused and (
            len(self._completions) > config.max_inflight_per_session
            or self._inflight_bytes > config.max_inflight_bytes_per_session
        ):
            self._paused = True
            self.transport.pause_reading()

    @property
    def reading_paused(self) -> bool:
        """The gateway stopped reading this client until its work in flight is done (``_maybe_resume``): the
        client's frames and heart-beats wait unread, so its silence says nothing about it."""
        return self._paused

    def connection_lost(self) -> None:
        """The peer went away (or we closed): release what it held. Safe to call more than once."""
        if self._ending is None:
            self.finished = True
            self._ending = asyncio.get_running_loop().create_task(self._end())

    async def wait_ended(self) -> None:
        if self._ending is not None:
            await self._ending

    # ---- to the transport ----

    def flush(self) -> None:
        limit = self.broker.config.max_session_buffer
        if self.conn.bytes_to_send and not self.conn.closed and self.transport.write_backlog() > limit:
            # Judged before adding these bytes: the client has not read what earlier writes queued. What was about
            # to be added is dropped (the connection closes for it; unacked queue messages go back on close).
            self.conn.data_to_send()
            self._fail("Slow consumer", f"more than max_session_buffer={limit} bytes are waiting to be read", None)
            return
        chunks = self.conn.chunks_to_send()
        if chunks:
            self.last_sent = time.monotonic()
            if len(chunks) == 1:
                self.transport.write(chunks[0])
            else:  # a large MESSAGE body among them, written without being copied into the frame
                self.transport.writelines(chunks)
            self.broker.metrics.bytes_out(self.kind, sum(map(len, chunks)))
        if self.conn.closed and not self.finished:
            self.finished = True
            self.transport.close()
            self.connection_lost()

    def flush_soon(self) -> None:
        """Flush once at the end of this event-loop turn: many deliveries become one socket write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    @property
    def accepts_deliveries(self) -> bool:
        """False once the connection is failing or closed: a MESSAGE would not be sent."""
        return not (self._failing or self.finished or self.conn.closed)

    def write_backlog(self) -> int:
        """Bytes on their way to this client: queued in the connection and not yet flushed, plus the transport's."""
        return self.conn.bytes_to_send + self.transport.write_backlog()

    async def drained(self) -> None:
        """Flush, then return once the transport's backlog is below its low-water mark (at once if it never went
        above its high-water mark). Always yields to the event loop, so a delivery loop can never spin on it."""
        self.flush()
        await self.transport.drained()
        await asyncio.sleep(0)

    def deliver(self, subscription: SubscriptionPort, message: StoredMessage) -> bool:
        """Queue one MESSAGE; False when this connection takes no more (it is failing or closed), so the caller
        keeps the message for release instead of counting it delivered."""
        if not self.accepts_deliveries:
            return False
        headers = delivery_headers(message)
        if isinstance(subscription, DurableTopicSubscription) and subscription.pending_gap is not None:
            headers = {**headers, **dict(subscription.gap_headers())}
        self.conn.send_message(
            destination=message.destination,
            subscription=subscription.id,
            message_id=message.message_id,
            ack=f"{message.message_id}@{subscription.id}" if subscription.needs_ack else None,
            headers=headers,
            body=message.body,
        )
        self.messages_out += 1
        if self.conn.bytes_to_send >= FLUSH_EARLY_BYTES:
            self.flush()  # large deliveries leave at once (and face the slow-consumer check) instead of piling up
        return True

    def send_heartbeat(self) -> None:
        self.conn.send_heartbeat()
        self.flush()

    async def quiesce(self) -> None:
        """Stop reading from the client and let the work it already sent finish, RECEIPTs included."""
        if not self.finished:
            self._quiesced = True
            self.transport.pause_reading()
            self._submit_sends()
            await self._completions.idle()

    def close_with_error(self, message: str, detail: str = "") -> None:
        """Used by the broker (shutdown, heart-beat timeout, login timeout)."""
        self._fail(message, detail, None)

    # ---- frames ----

    def _dispatch(self, event: ServerEvent) -> None:
        match event:
            case Send():
                self._on_send(event)
            case Ack():
                self._on_settle(event.ack_id, event.subscription, event.transaction, event.receipt, None)
            case Nack():
                how = Release.REQUEUE if event.requeue else Release.DEAD_LETTER
                self._on_settle(event.ack_id, event.subscription, event.transaction, event.receipt, how)
            case Subscribe():
                self._on_subscribe(event)
            case Unsubscribe():
                self._on_unsubscribe(event)
            case Begin():
                self._on_begin(event)
            case Commit():
                self._on_commit(event)
            case Abort():
                self.transactions.end(event.transaction)
                self._receipt_after(None, event.receipt)
            case ConnectRequested():
                self._on_connect(event)
            case Disconnect():
                self._on_disconnect(event)
            case ProtocolViolation():
                self._fail_after_earlier_frames(event.message, event.detail, event.receipt_id, event)

    def _on_connect(self, event: ConnectRequested) -> None:
        authorizer = self.broker.authorizer
        if authorizer.needs_slow_check(event.login, event.passcode, peer=self.peer):
            # a bcrypt check takes ~0.25 s: run it in a thread, and hold this connection's later frames meanwhile
            self._held = []
            self.transport.pause_reading()
            self._login = asyncio.get_running_loop().create_task(self._connect_in_thread(event))
            return
        self._connected(event, authorizer.authenticate(event.login, event.passcode, peer=self.peer))

    async def _connect_in_thread(self, event: ConnectRequested) -> None:
        try:
            authenticate = self.broker.authorizer.authenticate
            principal = await asyncio.to_thread(authenticate, event.login, event.passcode, peer=self.peer)
        except Exception:
            log.exception("session %s: checking the login failed", self.id)
            principal = None
        held, self._held = self._held or [], None
        if self.finished:
            return
        if not self._paused:
            self.transport.resume_reading()
        try:
            self._connected(event, principal)
        except SessionError as exc:
            self._fail(exc.message, exc.detail, _receipt_of(event))
            return
        self._run(held)

    def _connected(self, event: ConnectRequested, principal: Principal | None) -> None:
        if principal is None:
            self.broker.metrics.error("auth")
            log.warning("session %s from %s: login failed for user %r", self.id, self.peer, event.login)
            raise SessionError("Access refused", "login or passcode not accepted")
        self.principal = principal
        # Not checked against other logins' names: durable state is scoped by login (_durable_cursor_name), so a
        # client-id reaches nothing of theirs, and a refusal would tell any client which logins exist.
        self.client_id = event.headers.get("client-id") or (event.login or None)
        self.heartbeat = self.conn.accept(
            session=self.id,
            heartbeat=(self.broker.config.heartbeat_send_ms, self.broker.config.heartbeat_receive_ms),
        )

    def _check_write(self, destination: str) -> None:
        assert self.principal is not None
        if not self.broker.authorizer.can_write(self.principal, destination):
            raise SessionError("Access refused", f"user {self.principal.name!r} may not write to {destination}")

    def _destination(self, text: str) -> Destination:
        destination = self._destinations.get(text)
        if destination is None:
            try:
                destination = parse_destination(text)
            except InvalidDestination as exc:
                raise SessionError("Invalid destination", str(exc)) from None
            if len(self._destinations) < 1024:  # a client cycling through names cannot grow this without bound
                self._destinations[text] = destination
        return destination

    def _on_send(self, event: Send) -> None:
        destination = self._destination(event.destination)
        self._check_write(event.destination)
        try:
            message = self.broker.build_message(event.destination, event.headers, event.body)
        except HeaderError as exc:
            raise SessionError("Invalid header", str(exc)) from None
        # What the SEND costs us until it is stored: its body and its headers (the frame limit counts the body only)
        size = len(event.body) + sum(len(k) + len(v) for k, v in event.headers.items())
        if event.transaction is not None:
            tx = self.transactions.get(event.transaction)
            self.transactions.hold(tx, size)
            tx.sends.append(message)
            self._receipt_after(None, event.receipt)
            return
        self._receipt_after(self._batched_send(message, destination.kind, size), event.receipt)

    def _batched_send(self, message: NewMessage, kind: Literal["queue", "topic"], size: int) -> asyncio.Future[None]:
        """Collect the SENDs of one read into one group write: one future (and one callback chain) per read, not
        per frame. ``_submit_sends`` hands the group to the broker at the end of ``receive``."""
        group = self._pending_sends.get(kind)
        if group is None:
            group = self._pending_sends[kind] = _SendGroup([], asyncio.get_running_loop().create_future())
        group.messages.append(message)
        group.size += size
        return group.stored

    def _batched_ack(self, held: list[Held]) -> asyncio.Future[None]:
        if self._pending_acks is None:
            self._pending_acks = ([], asyncio.get_running_loop().create_future())
        self._pending_acks[0].extend(held)
        return self._pending_acks[1]

    def _submit_sends(self) -> None:
        if self._pending_acks is not None:
            (held, placeholder), self._pending_acks = self._pending_acks, None
            self._order.write(lambda: self.broker.ack_nowait(held), placeholder)
        if not self._pending_sends:
            return
        groups, self._pending_sends = self._pending_sends, {}
        for kind, group in groups.items():
            self._count_until_stored(group.stored, group.size)
            self._order.write(partial(self.broker.publish_nowait, group.messages, kind), group.stored)

    def _count_until_stored(self, stored: asyncio.Future[None], size: int) -> None:
        """Count ``size`` bytes against max_inflight_bytes_per_session until ``stored`` is done (stored or not)."""
        self._inflight_bytes += size
        stored.add_done_callback(partial(self._stored, size))

    def _stored(self, size: int, _: object) -> None:
        self._inflight_bytes -= size
        self._maybe_resume()

    def _find_unacked(self, ack_id: str, subscription_id: str | None) -> tuple[Subscription, list[str]]:
        """The subscription holding the unacknowledged message ``ack_id`` names, and the ids the ACK/NACK covers.

        1.0 names no subscription: the first of this connection's that holds the message. 1.1 and 1.2 name one (the
        ``subscription`` header, the ack id), and it is looked at first. When it does not hold the message (RabbitMQ
        clients sometimes name another subscription) the message is still found if exactly one QUEUE subscription
        of this connection holds it, and then only that message is settled, never cumulatively. Topic
        subscriptions are left out of that: one topic message reaches several subscriptions under one id, so a
        repeated or stale ACK on one would settle, and move the position of, another that never acknowledged it.
        Another connection's messages are never reached."""
        message_id, _, sub_from_ack = ack_id.partition("@")
        sub_id = sub_from_ack or subscription_id
        if sub_id is None:  # STOMP 1.0
            for sub in list(self.subscriptions.values()):
                covered = sub.take_for_ack(message_id)
                if covered is not None:
                    return sub, covered
        else:
            named = self.subscriptions.get(sub_id)
            covered = named.take_for_ack(message_id) if named is not None else None
            if named is not None and covered is not None:
                return named, covered
            holders = [
                sub
                for sub in self.subscriptions.values()
                if isinstance(sub, QueueSubscription) and sub is not named and message_id in sub.unacked
            ]
            if len(holders) == 1:
                return holders[0], [message_id]
        raise SessionError("Invalid ack", f"no unacknowledged message {ack_id!r} on this connection")

    def _on_settle(
        self, ack_id: str, subscription_id: str | None, transaction: str | None, receipt: str | None, how: Release | None
    ) -> None:
        sub, message_ids = self._find_unacked(ack_id, subscription_id)
        if transaction is not None:
            self.transactions.get(transaction).settlements.append((sub, message_ids, how))
            self._receipt_after(None, receipt)
            return
        self._receipt_after(self._settle(sub, message_ids, how), receipt)

    def _settle(self, sub: Subscription, message_ids: list[str], how: Release | None) -> asyncio.Future[None] | None:
        settled = sub.settle(message_ids)
        if isinstance(sub, DurableTopicSubscription):
            return sub.save_position()  # the RECEIPT waits until the moved position is stored
        if not isinstance(sub, QueueSubscription):
            return None  # live topic deliveries have nothing to delete
        held = [(d.message_id, d.lease) for d in settled]
        if not held:
            return None
        if how is None:
            return self._batched_ack(held)
        released: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._order.write(lambda: asyncio.ensure_future(self.broker.release(held, how)), released)
        return released

    def _on_subscribe(self, event: Subscribe) -> None:
        if event.id in self.subscriptions:
            raise SessionError("Duplicated subscription identifier", f"subscription id {event.id!r} is already in use")
        if len(self.subscriptions) >= self.broker.config.max_subscriptions_per_connection:
            raise SessionError(
                "Too many subscriptions",
                f"limit max_subscriptions_per_connection={self.broker.config.max_subscriptions_per_connection}",
            )
        try:
            destination = parse_destination(event.destination)
        except InvalidDestination as exc:
            raise SessionError("Invalid destination", str(exc)) from None
        assert self.principal is not None
        if not self.broker.authorizer.can_read(self.principal, event.destination):
            raise SessionError("Access refused", f"user {self.principal.name!r} may not read {event.destination}")
        durable = _says_durable(event.headers)
        # Live topic subscriptions without prefetch-count keep what they always had (RabbitMQ sets no limit there):
        # up to max_prefetch unacknowledged; queues and durable subscriptions default to default_prefetch.
        live_topic = destination.kind == "topic" and not durable
        prefetch = self._prefetch(event, self.broker.config.max_prefetch if live_topic else None)
        selector = None
        if (text := event.headers.get("selector")) is not None:
            try:
                selector = compile_selector(text)
            except SelectorError as exc:
                raise SessionError("Invalid selector", str(exc)) from None
        common = SubscriptionArgs(id=event.id, destination=destination, ack=event.ack, prefetch=prefetch, selector=selector)
        # A subscription knows its session as a SessionPort; the annotation makes mypy check that Session is one.
        owner: SessionPort = self
        sub: Subscription
        if destination.kind == "queue":
            sub = QueueSubscription(owner, **common)
        elif durable:
            cursor = self._durable_cursor_name(event.id)
            if cursor in self.broker.durable_in_use:
                raise SessionError("Durable subscription in use", f"{cursor!r} is already consumed by another connection")
            sub = DurableTopicSubscription(owner, cursor_name=cursor, **common)
            self.broker.durable_in_use.add(cursor)
        else:
            sub = TopicSubscription(owner, **common)
            self.broker.add_topic_subscription(sub)
        self.subscriptions[event.id] = sub
        sub.start()
        if isinstance(sub, DurableTopicSubscription):
            self._receipt_after(sub.placed, event.receipt)
            self._completions.push(None, partial(_complete, sub.announced))
        else:
            self._receipt_after(None, event.receipt)

    def _durable_cursor_name(self, sub_id: str) -> str:
        """Where a durable subscription's place is kept. It belongs to the authenticated login: ``client-id`` only
        names subscriptions within that login's own space, so no other login can reach it (a ``client-id:bob``
        from alice names ``alice/bob/<id>``, never bob's). A connection with no login in open mode (no users file)
        is anonymous: ``<client-id>/<id>``, or ``anonymous/<id>``."""
        principal = self.principal
        assert principal is not None
        client = self.client_id or principal.name
        if principal == ANONYMOUS:
            return f"{client}/{sub_id}"
        if client == principal.name:
            return f"{principal.name}/{sub_id}"
        return f"{principal.name}/{client}/{sub_id}"

    def _prefetch(self, event: Subscribe, default: int | None = None) -> int:
        raw = event.headers.get("prefetch-count") or event.headers.get("activemq.prefetchSize")
        config = self.broker.config
        if raw is None:
            return config.default_prefetch if default is None else default
        try:
            value = int(raw)
        except ValueError:
            raise SessionError("Invalid header", f"prefetch-count must be an integer, got {raw!r}") from None
        if value <= 0:  # RabbitMQ reads 0 as "unlimited"; we never allow unlimited, so it means the maximum
            return config.max_prefetch
        return min(value, config.max_prefetch)

    def _on_unsubscribe(self, event: Unsubscribe) -> None:
        """By ``id``. A STOMP 1.0 UNSUBSCRIBE without one names a destination: it ends the subscription made there
        without an id (whose id is the destination), else the one subscription of this connection on that
        destination; with several there, it is an ERROR (name one). A durable subscription is kept (its position
        saved) unless an UNSUBSCRIBE with an ``id`` says ``durable:true`` (or ``persistent:true``), as with
        RabbitMQ: then it is deleted, and its next SUBSCRIBE starts at the end of the topic."""
        explicit = "id" in event.headers
        if explicit or event.id in self.subscriptions:
            ids = [event.id] if event.id in self.subscriptions else []
        else:
            ids = [sid for sid, sub in self.subscriptions.items() if sub.destination_text == event.id]
            if len(ids) > 1:
                raise SessionError("Bad subscription", f"several subscriptions on {event.id!r}: UNSUBSCRIBE by id")
        if not ids:
            raise SessionError("Bad subscription", f"no subscription with id {event.id!r}")
        forget = explicit and _says_durable(event.headers)
        closing = [self._close_subscription(self.subscriptions.pop(sid), forget=forget) for sid in ids]
        future = asyncio.ensure_future(closing[0] if len(closing) == 1 else _gather(closing))
        self._receipt_after(future, event.receipt)

    async def _close_subscription(self, sub: Subscription, *, forget: bool = False) -> None:
        if isinstance(sub, TopicSubscription):
            self.broker.remove_topic_subscription(sub)
        unacked = await sub.close()
        if isinstance(sub, DurableTopicSubscription):
            try:
                if forget:
                    await self.broker.forget_durable(sub.cursor_name)
            finally:  # the name is free again, even when forgetting failed (the RECEIPT then becomes an ERROR)
                self.broker.durable_in_use.discard(sub.cursor_name)
        if unacked:
            await self.broker.release(unacked, Release.REQUEUE)

    def _on_begin(self, event: Begin) -> None:
        self.transactions.begin(event.transaction)
        self._receipt_after(None, event.receipt)

    def _on_commit(self, event: Commit) -> None:
        """Everything the transaction holds goes to the datasource as one ``Changes`` (one database transaction
        where the store has them: ``Datasource.apply``), after the writes this connection sent before the COMMIT.
        Its ACKs and NACKs settle the subscriptions only once that is stored: until then the messages stay
        unacknowledged, so a failed COMMIT (an ERROR, then the connection closes) releases them with the rest, and
        a durable subscription's position does not move. The RECEIPT waits for all of it."""
        tx = self.transactions.end(event.transaction)
        self._submit_sends()  # SENDs before this COMMIT are written before the transaction's
        changes = tx.changes()
        stored: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if tx.size:  # its SENDs left the transaction limits at the COMMIT: until stored, they count here
            self._count_until_stored(stored, tx.size)
        self._order.commit(lambda: self.broker.commit_nowait(changes), stored)
        done = asyncio.ensure_future(self._settle_after(stored, tx.settlements)) if tx.settlements else stored
        self._receipt_after(done, event.receipt)

    @staticmethod
    async def _settle_after(
        stored: asyncio.Future[None], settlements: list[Settlement]
    ) -> None:
        await stored
        durable: dict[DurableTopicSubscription, None] = {}
        for sub, message_ids, _ in settlements:
            sub.settle(message_ids)
            if isinstance(sub, DurableTopicSubscription) and not sub.closed:  # a closed one saved where it stood
                durable[sub] = None
        await asyncio.gather(*(sub.save_position() for sub in durable))

    def _on_disconnect(self, event: Disconnect) -> None:
        def finish(_: BaseException | None) -> None:
            if event.receipt is not None:
                self.conn.send_receipt(event.receipt)
            self.conn.close()
            self.flush()

        self.transactions.end_all()  # DISCONNECT aborts open transactions
        self._completions.push(None, finish)

    # ---- completions ----

    def _receipt_after(self, future: asyncio.Future[None] | None, receipt: str | None) -> None:
        if future is None and receipt is None:
            return

        def done(exc: BaseException | None) -> None:
            if self.finished:
                return
            if exc is not None:
                log.error("session %s: operation failed: %s", self.id, exc)
                self._fail("Not stored", f"the datasource did not confirm the operation: {exc}", receipt)
                return
            if receipt is not None:
                self.conn.send_receipt(receipt)
                self.flush_soon()

        self._completions.push(future, done)

    def _maybe_resume(self) -> None:
        config = self.broker.config
        if (
            self._paused
            and not self._quiesced
            and len(self._completions) < config.max_inflight_per_session // 2
            and self._inflight_bytes <= config.max_inflight_bytes_per_session // 2
        ):
            self._paused = False
            self.last_received = time.monotonic()  # its heart-beats waited unread: the silence was ours
            self.transport.resume_reading()

    def _fail_after_earlier_frames(
        self, message: str, detail: str, receipt: str | None, violation: ProtocolViolation | None = None
    ) -> None:
        """The client broke a rule: stop reading and delivering now, let the valid frames it sent before the bad one
        finish (their RECEIPTs go out in order), then send the ERROR and close."""
        self._failing = True  # from now on received bytes are discarded unread (``receive``)
        self._submit_sends()

        def send_error(_: BaseException | None) -> None:
            if violation is not None and not self.conn.closed:
                self._count_error(message, detail)
                self.conn.send_violation(violation)
                self.flush()
            else:
                self._fail(message, detail, receipt)

        self._completions.push(None, send_error)

    def _count_error(self, message: str, detail: str) -> None:
        self.broker.metrics.error(message.partition(":")[0])  # "Frame too large: limit ..." counts as "Frame too large"
        level = logging.WARNING if message == "Not stored" else logging.INFO  # our failure, not the client's
        log.log(level, "session %s from %s: ERROR %s: %s", self.id, self.peer, message, detail)

    def _fail(self, message: str, detail: str, receipt: str | None) -> None:
        if self.conn.closed:
            return
        self._count_error(message, detail)
        self.conn.send_error(message, body=detail, receipt_id=receipt)
        self.flush()

    async def _end(self) -> None:
        self._completions.cancel_all()
        self.transactions.end_all()
        subs = list(self.subscriptions.values())
        self.subscriptions.clear()
        for sub in subs:
            try:
                await self._close_subscription(sub)
            except Exception:
                log.exception("session %s: releasing subscription %s failed", self.id, sub.id)
        self.broker.forget_session(self)

    @property
    def connected(self) -> bool:
        return self.conn.state is State.OPEN


def _says_durable(headers: Mapping[str, str]) -> bool:
    """``durable:true`` (RabbitMQ's, and ours) or the legacy ``persistent:true``, on SUBSCRIBE and UNSUBSCRIBE."""
    return headers.get("durable", headers.get("persistent")) == "true"


async def _gather(closing: list[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*closing)


def _complete(future: asyncio.Future[None], _: BaseException | None) -> None:
    if not future.done():
        future.set_result(None)


def _receipt_of(event: ServerEvent) -> str | None:
    return getattr(event, "receipt", None)
