"""Connection states and the one transition table both roles use.

A key is (state, command); for the server the command is one it received (or ``CONNECTED``/``RECEIPT``/``MESSAGE``/
``ERROR`` it sends), for the client the mirror image; the command sets of the two directions are disjoint, so one
table serves both. ``close`` is the local close. A missing key means the frame is out of order.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["State", "TRANSITIONS", "next_state"]


class State(Enum):
    AWAITING_CONNECT = "awaiting-connect"  # nothing yet
    CONNECTING = "connecting"  # CONNECT seen, CONNECTED not yet
    OPEN = "open"
    CLOSING = "closing"  # DISCONNECT seen: only the RECEIPT (and late MESSAGEs) may follow
    FAILING = "failing"  # a protocol violation seen: RECEIPTs for the frames before it, then the ERROR
    CLOSED = "closed"  # after ERROR or close(): nothing more

    # Enum's own __hash__ is Python code (hash of the name); the connections look a (state, command) pair up in
    # TRANSITIONS for every frame. Members are singletons compared by identity, so the identity hash is right.
    __hash__ = object.__hash__


_WORK = ("SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK", "BEGIN", "COMMIT", "ABORT")

TRANSITIONS: dict[tuple[State, str], State] = {
    (State.AWAITING_CONNECT, "CONNECT"): State.CONNECTING,
    (State.AWAITING_CONNECT, "STOMP"): State.CONNECTING,
    # frames pipelined behind CONNECT are allowed; the app handles the CONNECT first
    **{(State.CONNECTING, command): State.CONNECTING for command in _WORK},
    (State.CONNECTING, "DISCONNECT"): State.CLOSING,
    (State.CONNECTING, "CONNECTED"): State.OPEN,
    **{(State.OPEN, command): State.OPEN for command in _WORK},
    (State.OPEN, "MESSAGE"): State.OPEN,
    (State.OPEN, "RECEIPT"): State.OPEN,
    (State.OPEN, "DISCONNECT"): State.CLOSING,
    (State.CLOSING, "CONNECTED"): State.CLOSING,  # CONNECT and DISCONNECT pipelined, then accepted
    (State.CLOSING, "MESSAGE"): State.CLOSING,
    (State.CLOSING, "RECEIPT"): State.CLOSING,
    (State.FAILING, "CONNECTED"): State.FAILING,  # a valid CONNECT before the bad frame is still answered
    (State.FAILING, "RECEIPT"): State.FAILING,
    **{(state, "ERROR"): State.CLOSED for state in State if state is not State.CLOSED},
    **{(state, "close"): State.CLOSED for state in State},
}


def next_state(state: State, command: str) -> State | None:
    """The state after ``command`` in ``state``, or None when the command is not allowed there."""
    return TRANSITIONS.get((state, command))
