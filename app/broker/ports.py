"""What each layer of the broker needs from the one above it, as structural types.

The broker's modules import one way only: ``broker`` -> ``session`` -> ``subscriptions`` -> ``ports``. A session calls
back into the broker, and a subscription into its session; those calls go through the Protocols here, which ``Broker``
and ``Session`` satisfy structurally (mypy checks it where a broker makes a session and a session makes a
subscription). This module imports nothing from ``broker``, ``session`` or ``subscriptions``. Each Protocol holds only
the members the lower layer uses: adding a use means adding it here, in sight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any, Literal, Protocol

from app.broker.auth import Authorizer
from app.broker.claim_budget import ClaimBudget
from app.broker.config import BrokerConfig
from app.broker.metrics import BrokerMetrics
from app.datasources.interface import Changes, Datasource, Held, NewMessage, Release, StoredMessage

__all__ = ["BrokerPort", "SessionPort", "SubscriptionPort"]


class BrokerPort(Protocol):
    """What sessions and subscriptions use of the broker: settings, the datasource, metrics, and its group writers.

    The calls that hand the broker a session or a topic subscription are added by ``session.SessionBroker``: they
    name classes this module may not import.
    """

    # -- used by both --
    @property
    def config(self) -> BrokerConfig: ...  # the limits, timeouts and sizes a session and a subscription enforce

    async def release(self, held: list[Held], how: Release) -> None: ...  # NACK, unsubscribe, DLQ: give messages back

    # -- used by a session --
    @property
    def authorizer(self) -> Authorizer: ...  # CONNECT logins, and read/write rights per destination

    @property
    def metrics(self) -> BrokerMetrics: ...  # bytes out and ERROR counts of a connection

    @property
    def durable_in_use(self) -> set[str]: ...  # durable cursor names consumed now: one connection each

    def new_session_id(self) -> str: ...  # a session's id, unique across gateways

    async def forget_durable(self, name: str) -> None: ...  # an UNSUBSCRIBE with durable:true deletes the subscription

    def build_message(self, destination: str, headers: Mapping[str, str], body: bytes) -> NewMessage: ...  # a SEND

    # SENDs, ACKs and COMMITs go to the broker's group writers; each future completes once the write is durable.
    def publish_nowait(self, messages: list[NewMessage], kind: Literal["queue", "topic"]) -> asyncio.Future[None]: ...

    def ack_nowait(self, held: list[Held]) -> asyncio.Future[None]: ...

    def commit_nowait(self, changes: Changes) -> asyncio.Future[None]: ...

    # -- used by a subscription --
    @property
    def datasource(self) -> Datasource: ...  # queue claims, durable topic following and cursors

    @property
    def gateway_id(self) -> str: ...  # the owner of the leases a queue subscription claims

    def now_ms(self) -> int: ...  # the clock a claim's leases are judged by

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...  # a release no caller waits for, kept alive and logged

    def ack_in_background(self, held: list[Held]) -> None: ...  # auto mode: messages the connection took

    def metrics_delivered(self, destination: str, count: int) -> None: ...  # a queue subscription's deliveries

    def save_cursor_soon(self, name: str, position: int) -> asyncio.Future[None]: ...  # a durable subscription's place


class SubscriptionPort(Protocol):
    """What a session reads off the subscription it writes a MESSAGE for (its ``subscription`` and ``ack`` headers)."""

    @property
    def id(self) -> str: ...

    @property
    def needs_ack(self) -> bool: ...


class SessionPort(Protocol):
    """What a subscription uses of its connection (and the broker's topic follower, through ``sub.session``)."""

    # Bytes of topic messages waiting for ACK room (prefetch-count) over all this connection's topic subscriptions,
    # bounded by max_session_buffer (TopicSubscription).
    topic_waiting_bytes: int
    # Bytes its queue subscriptions claimed (or are claiming) and have not handed over: one CLAIM_BUDGET for them all.
    claim_budget: ClaimBudget

    @property
    def broker(self) -> BrokerPort: ...  # the subscription reaches the broker through its session

    @property
    def accepts_deliveries(self) -> bool: ...  # False once failing or closed: stop claiming and delivering

    def deliver(self, subscription: SubscriptionPort, message: StoredMessage) -> bool: ...  # queue one MESSAGE

    # Flow control: how much waits to be written, and a wait until the client has read enough of it.
    def write_backlog(self) -> int: ...

    async def drained(self) -> None: ...

    def flush(self) -> None: ...  # after handing over a batch of queue messages

    def flush_soon(self) -> None: ...  # after a topic delivery: many become one socket write

    def close_with_error(self, message: str, detail: str = "") -> None: ...  # a topic delivery raised (the follower)
