"""A subscription: what one SUBSCRIBE asked for, its unacked deliveries, and the task that feeds it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.broker.destinations import Destination
from app.broker.selectors import Selector
from app.datasources.interface import DatasourceUnavailable, Gap, Published, Release, StoredMessage
from stomp_core import AckMode

if TYPE_CHECKING:
    from app.broker.session import Session

__all__ = ["Subscription", "QueueSubscription", "TopicSubscription", "DurableTopicSubscription"]

log = logging.getLogger("stompgate.subscriptions")


@dataclass(slots=True)
class Delivery:
    message: StoredMessage
    position: int  # topic position (0 for queues)


class Subscription:
    """Common bookkeeping: unacked deliveries in delivery order, keyed by message id."""

    def __init__(
        self,
        session: Session,
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

    async def close(self) -> list[str]:
        """Stop delivering; return the unacked queue message ids for the caller to release."""
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

    def _deliver(self, message: StoredMessage, position: int = 0) -> None:
        self.delivered += 1
        if self.needs_ack:
            self.unacked[message.message_id] = Delivery(message, position)
        self.session.deliver(self, message)


class QueueSubscription(Subscription):
    """Competing consumer on a PollQueue: claims up to its credit, delivers, and acks or waits for acks."""

    _task: asyncio.Task[None] | None = None
    _claiming: asyncio.Task[list[StoredMessage]] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"queue-sub {self.destination_text}")

    def _credit_left(self) -> int:
        return self.prefetch - len(self.unacked)

    async def _run(self) -> None:
        broker = self.session.broker
        queues = broker.datasource.queues
        config = broker.config
        native = self.selector.native if (self.selector is not None and broker.datasource.native_selectors) else None
        predicate = self.selector.matches if self.selector is not None and native is None else None
        backoff = 0.05
        while not self.closed:
            credit = self._credit_left()
            if credit <= 0:
                self._credit.clear()
                await self._credit.wait()
                continue
            if self.session.write_backlog() > config.max_session_buffer // 2:
                await self.session.drained()
                continue
            generation = broker.queue_generation
            claim = asyncio.ensure_future(
                queues.claim(
                    self.destination_text,
                    owner=broker.gateway_id,
                    limit=min(credit, config.claim_batch),
                    lease_ms=config.lease_ms,
                    now_ms=broker.now_ms(),
                    selector=predicate,
                    native_selector=native,
                )
            )
            self._claiming = claim
            try:
                # Shielded: if we are cancelled mid-claim, the claim still completes and its messages are released
                # instead of staying leased to this gateway forever.
                messages = await asyncio.shield(claim)
            except asyncio.CancelledError:
                claim.add_done_callback(broker.release_claim_result)
                raise
            except DatasourceUnavailable as exc:
                log.warning("claim on %s failed, retrying: %s", self.destination_text, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            finally:
                self._claiming = None
            backoff = 0.05
            if not messages:
                if generation == broker.queue_generation:
                    await queues.wait(self.destination_text, config.poll_interval)
                continue
            if self.closed:
                await broker.release([m.message_id for m in messages], Release.REQUEUE)
                return
            self._deliver_batch(messages)

    def _deliver_batch(self, messages: list[StoredMessage]) -> None:
        broker = self.session.broker
        dead: list[str] = []
        auto: list[str] = []
        max_deliveries = broker.config.max_deliveries
        for message in messages:
            if message.deliveries > max_deliveries and not self.destination_text.endswith(".DLQ"):
                dead.append(message.message_id)
                continue
            self._deliver(message)
            if not self.needs_ack:
                auto.append(message.message_id)
        self.session.flush_soon()
        broker.metrics_delivered(self.destination_text, len(messages) - len(dead))
        if dead:
            broker.spawn(broker.release(dead, Release.DEAD_LETTER))
        if auto:
            broker.ack_in_background(auto)

    async def close(self) -> list[str]:
        await self._stop(self._task)
        released = list(self.unacked)
        self.unacked.clear()
        return released


class TopicSubscription(Subscription):
    """Live subscriber of a topic: the broker's single follower hands it each new message."""

    def offer(self, published: Published) -> None:
        if self.closed or not self.matches(published.message):
            return
        if self.needs_ack and len(self.unacked) >= self.session.broker.config.max_prefetch:
            # A client that never acks cannot make us remember unbounded deliveries; the oldest is forgotten.
            self.unacked.pop(next(iter(self.unacked)))
        self._deliver(published.message, published.position)


class DurableTopicSubscription(Subscription):
    """A topic subscription that keeps its place across reconnects (``durable:true`` with an ``id``).

    It follows the log from its saved position in a task of its own; the position advances on delivery in ``auto``
    mode and on acknowledgement otherwise, so what was delivered but not acked is replayed after a reconnect.
    """

    _task: asyncio.Task[None] | None = None

    def __init__(self, *args: object, cursor_name: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.cursor_name = cursor_name
        self.position = 0
        self.pending_gap: Gap | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"durable {self.cursor_name}")

    def safe_position(self) -> int:
        if self.unacked:
            return min(d.position for d in self.unacked.values()) - 1
        return self.position

    async def _run(self) -> None:
        broker = self.session.broker
        topics = broker.datasource.topics
        saved = await topics.load_cursor(self.cursor_name)
        if saved is None:
            saved = await topics.last_position()
            await topics.save_cursor(self.cursor_name, saved)
        self.position = saved
        async for event in topics.follow(after=saved):
            if self.closed:
                return
            if isinstance(event, Gap):
                log.warning("durable subscription %s missed messages %d..%d", self.cursor_name, event.expected, event.oldest - 1)
                self.pending_gap = event
                continue
            while self.needs_ack and len(self.unacked) >= self.prefetch and not self.closed:
                self._credit.clear()
                await self._credit.wait()
            if self.closed:
                return
            if event.message.destination == self.destination_text and self.matches(event.message):
                self._deliver(event.message, event.position)
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

    def settle(self, message_ids: list[str]) -> list[Delivery]:
        settled = super().settle(message_ids)
        self.session.broker.save_cursor_soon(self.cursor_name, self.safe_position())
        return settled

    async def close(self) -> list[str]:
        await self._stop(self._task)
        await self.session.broker.datasource.topics.save_cursor(self.cursor_name, self.safe_position())
        return []
