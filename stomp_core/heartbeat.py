"""Heart-beat negotiation as pure arithmetic. The core owns no clock: callers pass ``now`` in seconds (any monotonic
clock); periods are kept in milliseconds, as on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import ProtocolError

__all__ = ["HeartbeatPlan", "negotiate", "parse_heartbeat", "GRACE_MS"]

# Slack for the peer's lateness: it is dead only after more than 2 periods plus this much silence. Two periods is what
# stompjs, Artemis and CoilMQ allow; the constant covers scheduling jitter on short periods.
GRACE_MS = 1000
# Digits of one heart-beat period: up to 999,999,999 ms (11 days) is any real period, and a bound keeps int() cheap
# (CPython refuses over 4300 digits with a ValueError, which must never escape the parser).
MAX_HEARTBEAT_DIGITS = 9


@dataclass(frozen=True, slots=True)
class HeartbeatPlan:
    """What one side does: send a beat every ``send_every_ms`` and expect bytes every ``expect_every_ms`` (0 = off)."""

    send_every_ms: int = 0
    expect_every_ms: int = 0

    def send_due(self, last_sent: float, now: float) -> bool:
        """True when nothing was sent for a whole period (seconds in); send an EOL then."""
        return self.send_every_ms > 0 and (now - last_sent) * 1000.0 >= self.send_every_ms

    def peer_dead(self, last_received: float, now: float) -> bool:
        """True when the peer was silent for more than ``2 * expect_every_ms + GRACE_MS`` (seconds in)."""
        return self.expect_every_ms > 0 and (now - last_received) * 1000.0 > 2 * self.expect_every_ms + GRACE_MS


def negotiate(
    client: tuple[int, int], server: tuple[int, int], *, role: Literal["server", "client"] = "server"
) -> HeartbeatPlan:
    """Combine the client's ``(cx, cy)`` and the server's ``(sx, sy)``: server->client beats every ``max(sx, cy)``,
    client->server every ``max(cx, sy)``, each 0 when either side says 0. ``role`` picks whose plan is returned."""
    cx, cy = client
    sx, sy = server
    to_client = 0 if sx == 0 or cy == 0 else max(sx, cy)
    to_server = 0 if cx == 0 or sy == 0 else max(cx, sy)
    if role == "server":
        return HeartbeatPlan(send_every_ms=to_client, expect_every_ms=to_server)
    return HeartbeatPlan(send_every_ms=to_server, expect_every_ms=to_client)


def parse_heartbeat(value: str | None) -> tuple[int, int]:
    """Parse a ``heart-beat`` header (``"x,y"``, non-negative ms); absent means ``(0, 0)``."""
    if value is None:
        return (0, 0)
    first, sep, second = value.partition(",")
    first, second = first.strip(), second.strip()
    if not sep or not (first.isascii() and first.isdigit() and second.isascii() and second.isdigit()):
        raise ProtocolError("Invalid header", f"heart-beat must be two non-negative integers 'x,y', not {value[:32]!r}")
    if len(first) > MAX_HEARTBEAT_DIGITS or len(second) > MAX_HEARTBEAT_DIGITS:
        raise ProtocolError("Invalid header", f"heart-beat periods must be below 10**{MAX_HEARTBEAT_DIGITS} ms")
    return (int(first), int(second))
