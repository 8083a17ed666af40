"""A subscription: what one SUBSCRIBE asked for, its unacked deliveries, and the task that feeds it."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from typing import TypedDict, Unpack

from app.broker.destinations import Destination
from app.broker.ports import BrokerPort, SessionPort
from app.broker.selectors import Selector
from app.datasources.interface import DatasourceUnavailable, Gap, Held, Published, Release, ScanMark, StoredMessage
from stomp_core import AckMode

__all__ = ["SubscriptionArgs", "Subscription", "QueueSubscription", "TopicSubscription", "DurableTopicSubscription"]

log = logging.getLogger("stompgate.subscriptions")

# Bytes a subscription lets wait in its connection's buffers before it takes more work. It equals the transports'
# write high-water mark (1 MiB, where TCP and WebSocket pause), so a client that reads slowly holds back the topic log
# instead of making the gateway buffer it.
WRITE_BUDGET = 1024 * 1024
# The same for a queue subscription, whose claims are sized to the room left below it, so that a slow reader holds
# back claims instead of making the gateway buffer (and, in auto mode, delete) messages it has not read. It is 4x the
# high-water mark: with 1 MiB bodies a budget of 1 MiB claimed one message at a time, and each claim's round trip
# through the writer then came between two deliveries (1 MiB queue, 2/2: 136-174 -> 159-194 msgs/s).
CLAIM_BUDGET = 4 * WRITE_BUDGET
# What a topic message waiting for ACK room is counted as beyond its body and its headers (the bookkeeping), so that
# a flood of empty messages is bounded too: at most max_session_buffer / 512 of them wait per connection.
WAITING_OVERHEAD = 512


def _waiting_cost(message: StoredMessage) -> int:
    """Bytes a waiting topic message holds: its body, its headers (up to about 800 KiB beside a body since the frame
    limit counts the body only) and the bookkeeping."""
    return len(message.body) + sum(len(k) + len(v) for k, v in message.headers.items()) + WAITING_OVERHEAD


@dataclass(slots=True)
class Delivery:
    """A message handed to the client and not yet acknowledged: what settling it needs, never its body or headers
    (a client that reads and never acks would otherwise make the gateway hold prefetch x body bytes)."""

    message_id: str
    lease: int  # the lease token it was claimed under (queues; 0 for topics)
    position: int  # topic position (0 for queues)


class SubscriptionArgs(TypedDict):
    """What every kind of subscription is made with, besides its session (``Subscription.__init__``'s keywords)."""

    id: str
    destination: Destination
    ack: AckMode
    prefetch: int
    selector: Selector | None


class Subscription:
    """Common bookkeeping: unacked deliveries in delivery order, keyed by message id."""

    def __init__(
        self,
        session: SessionPort,  # a Session; typed by what is used of it, as this module may not import session.py
        *,
        id: str,
        destination: Destination,
        ack: AckMode,
        prefetch: int,
        selector: Selector | None,
    ) -> None:
        self.session = session
        self.id = id
        self.destination = destination
        self.destination_text = str(destination)
        self.ack = ack
        self.prefetch = prefetch
        self.selector = selector
        self.unacked: dict[str, Delivery] = {}
        self.delivered = 0
        self.closed = False
        self._credit = asyncio.Event()

    @property
    def needs_ack(self) -> bool:
        return self.ack != "auto"

    def start(self) -> None:
        """Begin delivering (queue and durable subscriptions run a task; live topic ones are fed by the broker)."""

    def take_for_ack(self, message_id: str) -> list[str] | None:
        """The message ids an ACK/NACK of ``message_id`` covers (cumulative in ``client`` mode), or None."""
        if message_id not in self.unacked:
            return None
        if self.ack != "client":
            return [message_id]
        covered: list[str] = []
        for mid in self.unacked:
            covered.append(mid)
            if mid == message_id:
                break
        return covered

    def settle(self, message_ids: list[str]) -> list[Delivery]:
        """Forget these deliveries (acked, nacked or released) and give the credit back."""
        settled = [d for mid in message_ids if (d := self.unacked.pop(mid, None)) is not None]
        self._credit.set()
        return settled

    async def close(self) -> list[Held]:
        """Stop delivering; return the queue messages it held (id and lease) for the caller to release."""
        self.closed = True
        self._credit.set()
        return []

    async def _stop(self, task: asyncio.Task[None] | None) -> None:
        """Mark closed, wake the feeding task and wait for it to end; its own failure must not stop the closing."""
        self.closed = True
        self._credit.set()
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("subscription %s task failed", self.id)

    def matches(self, message: StoredMessage) -> bool:
        return self.selector is None or self.selector.matches(message.headers)

    def _deliver(self, message: StoredMessage, position: int = 0) -> bool:
        """Hand one message to the connection; False when it takes no more (failing or closed), and then the
        caller still holds the message (a queue subscription releases it on close)."""
        if not self.session.deliver(self, message):
            return False
        self.delivered += 1
        if self.needs_ack:
            self.unacked[message.message_id] = Delivery(message.message_id, message.lease, position)
        return True


class QueueSubscription(Subscription):
    """Competing consumer on a PollQueue: claims up to its credit, delivers, and acks or waits for acks."""

    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"queue-sub {self.destination_text}")

    def _credit_left(self) -> int:
        return self.prefetch - len(self.unacked)

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._held: list[StoredMessage] = []  # claimed, not yet handed to the connection (no room yet)
        self._reserved = 0  # this subscription's part of the connection's claim budget (see _reserve)
        self._woken = False  # it waited for the budget and was let go: it must not take the others' turn (handoff)
        self._auto_in_flight: list[Held] = []  # auto mode: handed to the connection, acked once it took them
        # What a claim assumes a message weighs before it has seen any: the largest body a client may send, so the
        # first claim is one message, not CLAIM_BUDGET / 64 KiB of 4 MiB bodies; then the largest body of the last claim.
        self._size_estimate = self.session.broker.config.limits.max_frame_bytes
        self._backoff = 0.05  # seconds before retrying a claim the database refused; doubles up to 2 s
        self._scan = ScanMark()  # where a selector's scan of the backlog goes on from (used with a Python selector)

    async def _run(self) -> None:
        broker = self.session.broker
        while not self.closed:
            try:
                await self._turn()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug must not strand claimed messages: give back what this turn held, and go on after a pause.
                log.exception("queue subscription %s on %s failed; releasing what it held", self.id, self.destination_text)
                held = [(m.message_id, m.lease) for m in self._held]
                self._held.clear()
                self._reserve(0)
                if held:
                    broker.spawn(broker.release(held, Release.REQUEUE))
                await asyncio.sleep(0.5)

    async def _turn(self) -> None:
        """One step: hand over held messages as room allows, ack what auto mode handed over, claim into the room."""
        broker = self.session.broker
        config = broker.config
        if self._held:
            self._deliver_held()
            await self._settle_handed_over()
            if self._held:
                if self.session.accepts_deliveries:
                    await self.session.drained()  # above the high-water mark: wait until the client read some
                else:  # failing: the ERROR and the close are coming, and close() releases what is held
                    self._credit.clear()
                    await self._credit.wait()
            return
        await self._settle_handed_over()
        credit = self._credit_left()
        if credit <= 0 or not self.session.accepts_deliveries:  # no room, or the connection is failing: wait
            self._credit.clear()  # close() and settle() set it
            await self._credit.wait()
            return
        room = CLAIM_BUDGET - self.session.write_backlog()
        if room < 0:  # past the claim budget (and so the transports' high-water mark): drained() waits for the reader
            await self.session.drained()
            return
        budget = self.session.claim_budget
        if budget.reserved and room - budget.reserved <= 0:
            await budget.freed()  # the connection's other queue subscriptions are claiming or hold the rest
            self._woken = True
            return
        if self._woken:  # one of the woken: its turn is now, whatever other waiters were woken with it
            self._woken = False
        elif await budget.let_waiters_go_first():
            return  # they may have taken the room: look again
        room -= budget.reserved
        limit = min(credit, config.claim_batch, max(1, room // self._size_estimate))
        self._reserve(limit * self._size_estimate)
        try:
            messages = await self._claim(limit)
        finally:
            self._reserve(0)
        if messages is None or self.closed:
            if messages:
                await broker.release([(m.message_id, m.lease) for m in messages], Release.REQUEUE)
            return
        self._size_estimate = max(max(len(m.body) for m in messages), 256)
        self._held.extend(self._dead_lettered(messages))
        self._reserve(sum(len(m.body) for m in self._held))
        self._deliver_held()

    def _reserve(self, size: int) -> None:
        """Hold ``size`` bytes of the connection's claim budget (claims in flight, then messages claimed and not
        handed over), in place of what this subscription held before."""
        self.session.claim_budget.change(size - self._reserved)
        self._reserved = size

    async def _claim(self, limit: int) -> list[StoredMessage] | None:
        """Claim up to ``limit`` messages; None after waiting for work (nothing was ready) or a database hiccup."""
        broker = self.session.broker
        queues = broker.datasource.queues
        config = broker.config
        native = self.selector.native if (self.selector is not None and broker.datasource.native_selectors) else None
        predicate = self.selector.matches if self.selector is not None and native is None else None
        wake = queues.wake_token(self.destination_text)  # before the claim: work arriving meanwhile still wakes us
        answer: asyncio.Future[list[StoredMessage]] = asyncio.get_running_loop().create_future()
        claiming = queues.claim(
            self.destination_text,
            owner=broker.gateway_id,
            limit=limit,
            lease_ms=config.lease_ms,
            now_ms=broker.now_ms(),
            selector=predicate,
            native_selector=native,
            scan=self._scan if predicate is not None else None,
        )
        # The claim runs in a task of its own: if we are cancelled mid-claim, it still completes and its messages are
        # released instead of staying leased to this gateway until the lease lapses.
        broker.spawn(_answer(answer, claiming, broker))
        try:
            messages = await answer
        except asyncio.CancelledError:
            # Cancelled after the claim answered but before this task resumed (a stop handled in that turn): the
            # answer holds messages no list of ours has, and lease renewal would keep them leased for good.
            if answer.done() and not answer.cancelled() and answer.exception() is None:
                held = [(m.message_id, m.lease) for m in answer.result()]
                if held:
                    broker.spawn(broker.release(held, Release.REQUEUE))
            raise
        except DatasourceUnavailable as exc:
            self._reserve(0)  # nothing claimed: the pause below holds none of the connection's budget
            log.warning("claim on %s failed, retrying: %s", self.destination_text, exc)
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, 2.0)
            return None
        self._backoff = 0.05
        if not messages:
            self._reserve(0)  # nothing claimed: waiting for work holds none of the connection's budget
            if predicate is not None and self._scan.more:
                await asyncio.sleep(0)  # the scan stopped at its budget: let others run, then go on scanning
            else:
                await queues.wait(self.destination_text, self._idle_wait(), wake)
            return None
        return messages

    def _idle_wait(self) -> float:
        """How long an empty claim waits for a wake-up before looking again. On a shared database another gateway's
        work is only seen by looking: ``poll_interval``. On a store only this process writes, every put and requeue
        wakes the waiter, so it looks again only at the lease period, for a lease this process let lapse."""
        broker = self.session.broker
        if broker.datasource.shared:
            return broker.config.poll_interval
        return max(broker.config.poll_interval, broker.config.lease_ms / 1000)

    def _dead_lettered(self, messages: list[StoredMessage]) -> list[StoredMessage]:
        """Move messages past ``max_deliveries`` to the dead-letter queue; return the rest, to deliver."""
        broker = self.session.broker
        max_deliveries = broker.config.max_deliveries
        if self.destination_text.endswith(".DLQ"):
            return messages
        dead = [(m.message_id, m.lease) for m in messages if m.deliveries > max_deliveries]
        if not dead:
            return messages
        broker.spawn(broker.release(dead, Release.DEAD_LETTER))
        return [m for m in messages if m.deliveries <= max_deliveries]

    def _deliver_held(self) -> None:
        """Hand held messages to the connection while it has room below the write budget (at least one per call)."""
        session = self.session
        held = self._held
        count = handed = 0
        while count < len(held) and (count == 0 or session.write_backlog() < CLAIM_BUDGET):
            message = held[count]
            if not self._deliver(message):
                break  # the connection is failing or closed: what is still held is released on close
            count += 1
            handed += len(message.body)
            if not self.needs_ack:
                self._auto_in_flight.append((message.message_id, message.lease))
        if count:
            del held[:count]
            self._reserve(self._reserved - handed)
            session.flush()
            session.broker.metrics_delivered(self.destination_text, count)

    async def _settle_handed_over(self) -> None:
        """Auto mode: a message is acked (deleted) once the connection took it: flushed and below the transport's
        high-water mark. If the connection ends first, it is released instead (see ``close``)."""
        if not self._auto_in_flight:
            return
        await self.session.drained()
        if self.closed or not self.session.accepts_deliveries:
            return
        held, self._auto_in_flight = self._auto_in_flight, []
        self.session.broker.ack_in_background(held)

    async def close(self) -> list[Held]:
        await self._stop(self._task)
        # Unacked, held (claimed, never handed over) and auto deliveries the connection may not have taken: all go
        # back to the queue. An auto message already written to the socket may so be delivered twice, never lost.
        released = [(d.message_id, d.lease) for d in self.unacked.values()]
        released += [(m.message_id, m.lease) for m in self._held] + self._auto_in_flight
        self.unacked.clear()
        self._held.clear()
        self._reserve(0)
        self._auto_in_flight = []
        return released


async def _answer(
    answer: asyncio.Future[list[StoredMessage]], claiming: Awaitable[list[StoredMessage]], broker: BrokerPort
) -> None:
    """Run a claim for a subscription waiting on ``answer``, and answer it from the claim's own last step: the
    subscription resumes one event-loop turn sooner than if it waited for the task to end (as ``asyncio.shield``
    does), a turn that under load is milliseconds of every claim. If the subscription stopped waiting (it was
    cancelled), what the claim took goes back to the queue."""
    try:
        messages = await claiming
    except asyncio.CancelledError:
        answer.cancel()
        raise
    except Exception as exc:
        if not answer.done():
            answer.set_exception(exc)
        return
    if answer.cancelled():
        held = [(m.message_id, m.lease) for m in messages]
        if held:
            broker.spawn(broker.release(held, Release.REQUEUE))
        return
    answer.set_result(messages)


class TopicSubscription(Subscription):
    """Live subscriber of a topic: the broker's single follower hands it each new message.

    In ``client`` and ``client-individual`` modes at most ``prefetch`` MESSAGEs are unacknowledged: the rest wait
    here, in order, and go out as ACKs and NACKs make room. What waits is bounded per connection, over all its topic
    subscriptions: ``max_session_buffer`` bytes, each message counted as its body plus ``WAITING_OVERHEAD``. A
    subscriber that lets more pile up is too slow for a live topic: its connection gets an ERROR "Slow consumer"
    and is closed, as when more than ``max_session_buffer`` bytes wait to be written to it.
    """

    def __init__(self, session: SessionPort, **args: Unpack[SubscriptionArgs]) -> None:
        super().__init__(session, **args)
        # no room under prefetch yet: delivered in order once acks make it; each with its cost (``_waiting_cost``)
        self._waiting: deque[tuple[Published, int]] = deque()

    def offer(self, published: Published) -> None:
        if self.closed or not self.matches(published.message) or not self.session.accepts_deliveries:
            return
        if self.needs_ack and (self._waiting or len(self.unacked) >= self.prefetch):
            self._wait(published)
            return
        self._deliver(published.message, published.position)

    def _wait(self, published: Published) -> None:
        session = self.session
        limit = session.broker.config.max_session_buffer
        cost = _waiting_cost(published.message)
        if session.topic_waiting_bytes + cost > limit:
            session.close_with_error(
                "Slow consumer",
                f"topic messages waiting for ACKs (prefetch-count={self.prefetch} on subscription {self.id!r}) passed "
                f"max_session_buffer={limit} bytes",
            )
            return
        self._waiting.append((published, cost))
        session.topic_waiting_bytes += cost

    def settle(self, message_ids: list[str]) -> list[Delivery]:
        settled = super().settle(message_ids)
        if self._waiting:
            self._deliver_waiting()
        return settled

    def _deliver_waiting(self) -> None:
        session = self.session
        delivered = False
        while self._waiting and len(self.unacked) < self.prefetch and not self.closed:
            published, cost = self._waiting[0]
            if not self._deliver(published.message, published.position):
                break  # the connection is failing: what waits is dropped on close
            self._waiting.popleft()
            session.topic_waiting_bytes -= cost
            delivered = True
        if delivered:
            session.flush_soon()

    async def close(self) -> list[Held]:
        waiting, self._waiting = self._waiting, deque()
        self.session.topic_waiting_bytes -= sum(cost for _, cost in waiting)
        return await super().close()


class DurableTopicSubscription(Subscription):
    """A topic subscription that keeps its place across reconnects (``durable:true`` with an ``id``).

    It follows the log from its saved position in a task of its own; the position advances on delivery in ``auto``
    mode and on acknowledgement otherwise, so what was delivered but not acked is replayed after a reconnect.
    """

    _task: asyncio.Task[None] | None = None

    def __init__(self, session: SessionPort, *, cursor_name: str, **args: Unpack[SubscriptionArgs]) -> None:
        super().__init__(session, **args)
        self.cursor_name = cursor_name
        self.position = 0
        self.pending_gap: Gap | None = None
        # Done once the starting position is known (loaded, or fixed at the log's end for a new subscription): the
        # SUBSCRIBE's RECEIPT waits for it, so every message published after that RECEIPT is delivered.
        self.placed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Completed by the session once that RECEIPT is out: the backlog's first MESSAGE comes after it.
        self.announced: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"durable {self.cursor_name}")

    def safe_position(self) -> int:
        if self.unacked:
            return min(d.position for d in self.unacked.values()) - 1
        return self.position

    async def _run(self) -> None:
        """Follow the log; a database failure (loading the cursor included) is retried with a back-off from where
        this subscription was, never silently ends it."""
        backoff = 0.1
        loaded = False
        while not self.closed:
            try:
                if not loaded:
                    await self._load()
                    loaded = True
                    if not self.placed.done():
                        self.placed.set_result(None)
                    await self.announced
                await self._follow()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("durable subscription %s failed, retrying in %.1fs: %r", self.cursor_name, backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _load(self) -> None:
        topics = self.session.broker.datasource.topics
        saved = await topics.load_cursor(self.cursor_name)
        if saved is None:
            saved = await topics.last_position()
            await topics.save_cursor(self.cursor_name, saved)
        self.position = saved

    async def _follow(self) -> None:
        broker = self.session.broker
        async for event in broker.datasource.topics.follow(after=self.position):
            if self.closed:
                return
            if isinstance(event, Gap):
                log.warning("durable subscription %s missed messages %d..%d", self.cursor_name, event.expected, event.oldest - 1)
                self.pending_gap = event
                continue
            while self.needs_ack and len(self.unacked) >= self.prefetch and not self.closed:
                self._credit.clear()
                await self._credit.wait()
            if self.session.write_backlog() > WRITE_BUDGET:  # a slow reader: wait instead of buffering the log
                await self.session.drained()
            if self.closed:
                return
            if event.message.destination == self.destination_text and self.matches(event.message):
                if not self._deliver(event.message, event.position):
                    return  # the connection is failing: the position stays before this message
                broker.metrics_delivered(self.destination_text, 1)
                self.session.flush_soon()
            self.position = event.position
            if not self.needs_ack:
                broker.save_cursor_soon(self.cursor_name, self.position)

    def gap_headers(self) -> Iterator[tuple[str, str]]:
        """Headers telling the client, on the first message after a gap, what the retained window lost."""
        if self.pending_gap is not None:
            gap, self.pending_gap = self.pending_gap, None
            yield "x-missed-from", str(gap.expected)
            yield "x-missed-to", str(gap.oldest - 1)

    def save_position(self) -> asyncio.Future[None]:
        """Store where this subscription stands now (after a settle); the future completes once it is stored."""
        return self.session.broker.save_cursor_soon(self.cursor_name, self.safe_position())

    async def close(self) -> list[Held]:
        await self._stop(self._task)
        if not self.placed.done():  # closed before its position was loaded: the stored one (if any) stands
            self.placed.set_result(None)
            return []
        await self.session.broker.datasource.topics.save_cursor(self.cursor_name, self.safe_position())
        return []
