"""STOMP transactions (BEGIN .. COMMIT or ABORT): what a connection's open transactions hold, the limits on them, and
the memory they hold across the gateway.

A transaction's SENDs live in memory until COMMIT, so their bytes count against three limits: the connection's
(``max_transaction_bytes``), its client address's (``..._per_address``, so one host cannot take the total by opening
connections) and the gateway's (``..._total``). ``TransactionMemory`` is the broker's account of the last two;
``Transactions`` is one connection's open transactions and its own account.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.broker.config import BrokerConfig
from app.broker.errors import SessionError
from app.broker.subscriptions import QueueSubscription, Subscription
from app.datasources.interface import Changes, Held, NewMessage, Release

__all__ = ["Settlement", "Transaction", "TransactionMemory", "Transactions"]

# An ACK (``None``) or NACK (how the messages go back) inside a transaction: the subscription and the message ids it
# covers (one for client-individual, every earlier unacked one for a cumulative ACK).
Settlement = tuple[Subscription, list[str], Release | None]


@dataclass(slots=True)
class Transaction:
    sends: list[NewMessage] = field(default_factory=list)
    settlements: list[Settlement] = field(default_factory=list)
    size: int = 0  # bytes of the SENDs held (bodies and headers), counted against the transaction limits

    def __len__(self) -> int:
        return len(self.sends) + len(self.settlements)

    def changes(self) -> Changes:
        """What the COMMIT asks of the store: its SENDs, and its queue ACKs and NACKs with the lease tokens the
        messages are held under now (topic settlements touch no stored message)."""
        acks: list[Held] = []
        released: dict[Release, list[Held]] = {Release.REQUEUE: [], Release.DEAD_LETTER: []}
        for sub, message_ids, how in self.settlements:
            if isinstance(sub, QueueSubscription):
                held = [(d.message_id, d.lease) for i in message_ids if (d := sub.unacked.get(i))]
                (acks if how is None else released[how]).extend(held)
        return Changes(
            queue=[m for m in self.sends if m.destination.startswith("/queue/")],
            topic=[m for m in self.sends if not m.destination.startswith("/queue/")],
            acks=acks,
            requeue=released[Release.REQUEUE],
            dead_letter=released[Release.DEAD_LETTER],
        )


class TransactionMemory:
    """Bytes held by the open transactions of every connection, in total and per client address."""

    def __init__(self, config: BrokerConfig) -> None:
        self._config = config
        self.total = 0
        self.by_address: dict[str, int] = {}

    def hold(self, address: str, size: int) -> None:
        """Count ``size`` more bytes for ``address``, or refuse (nothing counted) when a limit would be passed."""
        config = self._config
        held_here = self.by_address.get(address, 0)
        if held_here + size > config.max_transaction_bytes_per_address:
            raise SessionError(
                "Transaction too large",
                f"limit max_transaction_bytes_per_address={config.max_transaction_bytes_per_address}: open "
                f"transactions of the connections from {address} may hold no more",
            )
        if self.total + size > config.max_transaction_bytes_total:
            raise SessionError(
                "Transaction too large",
                f"limit max_transaction_bytes_total={config.max_transaction_bytes_total}: the gateway holds as much "
                "uncommitted data as it allows; commit smaller transactions or retry later",
            )
        self.total += size
        self.by_address[address] = held_here + size

    def give_back(self, address: str, size: int) -> None:
        self.total -= size
        left = self.by_address.get(address, 0) - size
        if left > 0:
            self.by_address[address] = left
        else:
            self.by_address.pop(address, None)


class Transactions:
    """One connection's open transactions, by name."""

    def __init__(self, memory: TransactionMemory, config: BrokerConfig, address: str) -> None:
        self._memory = memory
        self._config = config
        self._address = address
        self._open: dict[str, Transaction] = {}
        self.bytes = 0  # held by this connection's open transactions

    def begin(self, name: str) -> None:
        if name in self._open:
            raise SessionError("Bad transaction", f"transaction {name!r} is already open")
        if len(self._open) >= self._config.max_transactions_per_connection:
            raise SessionError(
                "Too many transactions",
                f"limit max_transactions_per_connection={self._config.max_transactions_per_connection}",
            )
        self._open[name] = Transaction()

    def get(self, name: str) -> Transaction:
        """The open transaction ``name``, refused when it cannot take one more frame."""
        tx = self._open.get(name)
        if tx is None:
            raise SessionError("Bad transaction", f"transaction {name!r} is not open")
        if len(tx) >= self._config.max_frames_per_transaction:
            raise SessionError(
                "Transaction too large", f"limit max_frames_per_transaction={self._config.max_frames_per_transaction}"
            )
        return tx

    def hold(self, tx: Transaction, size: int) -> None:
        """Count a SEND's ``size`` bytes against this connection's, its address's and the gateway's limits."""
        if self.bytes + size > self._config.max_transaction_bytes:
            raise SessionError(
                "Transaction too large",
                f"limit max_transaction_bytes={self._config.max_transaction_bytes}: open transactions of one "
                "connection may hold no more",
            )
        self._memory.hold(self._address, size)
        tx.size += size
        self.bytes += size

    def end(self, name: str) -> Transaction:
        """Close ``name`` (COMMIT or ABORT) and give its memory back; refused when it is not open."""
        tx = self._open.pop(name, None)
        if tx is None:
            raise SessionError("Bad transaction", f"transaction {name!r} is not open")
        if tx.size:
            self.bytes -= tx.size
            self._memory.give_back(self._address, tx.size)
        return tx

    def end_all(self) -> None:
        """DISCONNECT, or the connection closed: open transactions are aborted."""
        for name in list(self._open):
            self.end(name)
