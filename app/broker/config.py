"""Broker settings: the delivery rules' numbers and the per-connection limits, in one frozen value."""

from __future__ import annotations

from dataclasses import dataclass, field

from stomp_core import DEFAULT_LIMITS, Limits

__all__ = ["BrokerConfig"]


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    limits: Limits = field(default_factory=lambda: DEFAULT_LIMITS)
    # What we offer in CONNECTED: we can send a beat every sx ms, and want one from the client every sy ms.
    heartbeat_send_ms: int = 10_000
    heartbeat_receive_ms: int = 10_000
    login_timeout: float = 10.0  # seconds a connection may stay without a CONNECT (RabbitMQ uses 10 s)
    max_connections: int = 10_000  # STOMP connections over TCP and WebSocket together
    # From one IP address, logged in or not: one host cannot take every slot with bare sockets (40 addresses are
    # needed to fill 10,000), while many clients behind one NAT or proxy still fit. Loopback is not exempt.
    max_connections_per_address: int = 256
    max_subscriptions_per_connection: int = 256
    max_transactions_per_connection: int = 16
    max_frames_per_transaction: int = 10_000
    # Bytes of SEND bodies and headers one connection may hold in open transactions (they live in memory until
    # COMMIT): 64 MiB is 16 maximum-size frames, and bounds what a single client can make the gateway hold.
    max_transaction_bytes: int = 64 * 1024 * 1024
    # The same, summed over the connections from one client address: one host cannot take the whole total below
    # by opening more connections (it takes four addresses to fill it with the defaults).
    max_transaction_bytes_per_address: int = 128 * 1024 * 1024
    # The same, summed over every connection of this gateway, so that many clients together cannot exhaust memory.
    max_transaction_bytes_total: int = 512 * 1024 * 1024
    default_prefetch: int = 100  # unacked messages per subscription when the client does not say
    max_prefetch: int = 10_000  # a client cannot ask for more: "never unlimited"
    max_deliveries: int = 5  # deliveries before a queue message moves to its .DLQ
    lease_ms: int = 60_000  # how long another gateway waits before redelivering a crashed gateway's messages
    poll_interval: float = 0.25  # seconds: the longest another gateway's new work waits before a consumer sees it
    # Receipted work a single connection may have in flight before we stop reading from it (back-pressure).
    max_inflight_per_session: int = 2_000
    # Bytes of SENDs (bodies and headers, a COMMIT's too) one connection may have waiting for the datasource before the
    # gateway stops reading it (the count above alone let a producer of 4 MiB bodies park 2,000 of them in memory).
    # The SEND that crosses it is still taken.
    max_inflight_bytes_per_session: int = 8 * 1024 * 1024
    # Bytes queued for a slow client before it is disconnected with an ERROR naming the limit.
    max_session_buffer: int = 16 * 1024 * 1024
    claim_batch: int = 256  # most messages one claim round trip may take for one subscription
    shutdown_grace: float = 5.0  # seconds a stopping gateway waits for receipts in flight before closing sessions
    server_name: str = "stompgate/0.1.0"
    # Destinations with Prometheus series of their own; the rest share destination="_other" (see BrokerMetrics).
    metrics_max_destinations: int = 1_000
    # A destination with no publish or delivery here for this long, no subscriber here and no stored message gives
    # its metric slot back (Broker.forget_idle_destinations): long enough that a quiet but live one keeps its series.
    metrics_idle_seconds: float = 600.0
