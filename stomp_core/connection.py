"""Sans-I/O STOMP connections: bytes in, events out; calls in, bytes out.

:class:`ServerConnection` (the gateway's side) and :class:`ClientConnection` (tests and the benchmark tool) share the
parser, the serializer and the transition table of :mod:`stomp_core.states`.

Server contract:
- ``receive_data(data)`` never raises. It returns the events of every complete frame in order (frames pipelined behind
  CONNECT included: the app handles ``ConnectRequested`` before the rest of the list; once a CONNECT is parsed the
  frames behind it get the full frame-size limit, since the app checks the login before it acts on them). ``b""``
  means nothing (not EOF). A protocol violation or crossed limit ends the list with a ``ProtocolViolation`` and moves
  to ``FAILING``: nothing more is parsed, and the app finishes the valid frames before it (RECEIPTs may still be sent;
  MESSAGEs are silently dropped), then sends the ERROR with ``send_error`` (``message``, ``content-type:text/plain``,
  ``receipt-id`` when the bad frame asked for a receipt, the detail as body). After that, and after DISCONNECT,
  ``receive_data`` returns [].
- ``accept(...)`` queues CONNECTED, switches to the full frame-size limit and returns the negotiated
  :class:`HeartbeatPlan`; CONNECTED advertises 0 for a direction the negotiation turned off.
- ``send_message``/``send_receipt``/``send_error``/``send_heartbeat`` queue frames; ``data_to_send()`` drains them.
  Once ``closed`` (an ERROR was queued or ``close()`` was called) every send is a silent no-op, so a delivery racing
  the close is harmless; sending MESSAGE or RECEIPT before CONNECTED is a :class:`UsageError`. A MESSAGE header that
  the connection's version cannot carry (a line break in 1.0, a CR in 1.1, a ':' in a 1.0 name, a NUL anywhere) is
  left out of that MESSAGE rather than break the frame: one producer's header never stops another's delivery.
- The I/O layer sends ``data_to_send()`` and closes the socket once ``closed`` is True.
- Accepted beyond the spec, as RabbitMQ accepts it from its clients: a CONNECT body made only of EOLs (LF or CRLF;
  any other byte is still refused), NACK in 1.0 (by ``message-id``, like a 1.0 ACK), and ``requeue`` on NACK read
  case-insensitively (``requeue:False``). ``Unsubscribe`` carries its headers, for extensions a broker reads.

API::

    ServerConnection(*, limits=DEFAULT_LIMITS, versions=("1.0", "1.1", "1.2"), server="stompgate/0.1")
      .state / .version / .closed / .heartbeat
      .receive_data(data) -> list[ServerEvent]
      .accept(*, session, heartbeat=(0, 0), headers=None) -> HeartbeatPlan
      .send_message(*, destination, subscription, message_id, ack, headers, body)  # ack written only in 1.2
      .send_receipt(receipt_id) / .send_error(message, *, body=b"", receipt_id=None, headers=None)
      .send_violation(violation)                 # the ERROR for a ProtocolViolation it reported
      .send_heartbeat() / .close() / .data_to_send() -> bytes

    ClientConnection(*, limits=DEFAULT_LIMITS)
      .connect(*, host="/", login=None, passcode=None, accept_version=("1.0", "1.1", "1.2") | None,
               heartbeat=(0, 0), command="CONNECT", headers=None)
      .send(destination, body, *, headers=None, receipt=None, transaction=None)
      .subscribe(destination, id, *, ack="auto", headers=None, receipt=None) / .unsubscribe(id, *, receipt=None)
      .ack(ack_id, *, subscription=None, transaction=None, receipt=None)   # id (1.2) or message-id (1.0/1.1)
      .nack(ack_id, *, subscription=None, transaction=None, receipt=None, requeue=True)
      .begin(tx, *, receipt=None) / .commit(...) / .abort(...) / .disconnect(*, receipt=None)
      .send_heartbeat() / .close() / .receive_data(data) -> list[ClientEvent] / .data_to_send() -> bytes
      .state / .version / .closed / .heartbeat

Client contract: the same shape in the other direction. Calls that are out of order (or made after close) raise
:class:`UsageError`; a bad frame from the server ends ``receive_data``'s list with a ``ProtocolViolation`` and closes
the connection without queueing anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .errors import LimitExceeded, ProtocolError, UsageError
from .events import (
    Abort,
    Ack,
    AckMode,
    Begin,
    ClientEvent,
    Commit,
    ConnectRequested,
    Connected,
    Disconnect,
    ErrorReceived,
    MessageReceived,
    Nack,
    ProtocolViolation,
    ReceiptReceived,
    Send,
    ServerEvent,
    Subscribe,
    Unsubscribe,
)
from .frame import CLIENT_COMMANDS, SERVER_COMMANDS
from .heartbeat import HeartbeatPlan, negotiate, parse_heartbeat
from .limits import DEFAULT_LIMITS, Limits
from .negotiation import SUPPORTED_VERSIONS, negotiate_version
from .parser import FrameParser
from .serializer import encode_frame, encode_message, encode_message_head, encode_receipt
from .states import TRANSITIONS, State

__all__ = ["ServerConnection", "ClientConnection"]

# A MESSAGE body at least this long is queued as its own chunk instead of being copied into the frame's bytes: a
# copy of 64 KiB costs about what a vectored write's extra buffer does, and a 1 MiB body was copied twice.
SEPARATE_BODY_MIN = 64 * 1024

_ACK_MODES: dict[str, AckMode] = {"auto": "auto", "client": "client", "client-individual": "client-individual"}


def _only_eols(body: bytes) -> bool:
    """True for an empty body or one made only of EOLs (LF or CRLF): several clients end CONNECT with an extra EOL,
    which lands in the body. A bare CR, or any other byte, is a body."""
    return not body or not body.replace(b"\r\n", b"").replace(b"\n", b"")


def _require(headers: Mapping[str, str], name: str, command: str) -> str:
    value = headers.get(name)
    if value is None:
        raise ProtocolError("Missing header", f"{command} requires the '{name}' header")
    return value


class _Endpoint:
    """What both roles share: the state, the negotiated version and heart-beat plan, and the outgoing buffer."""

    _state: State
    _version: str
    _heartbeat: HeartbeatPlan
    _out: list[bytes]
    _out_bytes: int = 0
    _out_large: bool = False  # a chunk of ``_out`` is a body of at least SEPARATE_BODY_MIN bytes, queued as it is

    @property
    def state(self) -> State:
        return self._state

    @property
    def version(self) -> str:
        """The negotiated version; "1.0" until CONNECT (server) or CONNECTED (client) says otherwise."""
        return self._version

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def heartbeat(self) -> HeartbeatPlan:
        """The negotiated heart-beat plan (all zeros until the CONNECT/CONNECTED exchange is done)."""
        return self._heartbeat

    def send_heartbeat(self) -> None:
        if self._state is not State.CLOSED:
            self._queue_out(b"\n")

    def close(self) -> None:
        self._state = State.CLOSED

    @property
    def bytes_to_send(self) -> int:
        """Bytes queued and not yet taken by ``data_to_send`` (for output limits)."""
        return self._out_bytes

    def _queue_out(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        self._out_large = False
        return data

    def chunks_to_send(self) -> list[bytes]:
        """What ``data_to_send`` gives, as chunks for a vectored write (``writelines``): large bodies as they were
        given, the bytes between them joined. Only the small parts are copied."""
        if not self._out_large:
            data = self.data_to_send()
            return [data] if data else []
        # (A large body is always between its frame's head and its NUL, so no joined run is empty.)
        chunks: list[bytes] = []
        small: list[bytes] = []
        for chunk in self._out:
            if len(chunk) < SEPARATE_BODY_MIN:
                small.append(chunk)
            else:
                chunks += (b"".join(small), chunk)
                small = []
        chunks.append(b"".join(small))
        self._out = []
        self._out_bytes = 0
        self._out_large = False
        return chunks


class ServerConnection(_Endpoint):
    """The server side of one STOMP connection."""

    def __init__(
        self,
        *,
        limits: Limits = DEFAULT_LIMITS,
        versions: Sequence[str] = SUPPORTED_VERSIONS,
        server: str = "stompgate/0.1",
    ) -> None:
        self.limits = limits
        self._versions = tuple(versions)
        self._server = server
        self._state = State.AWAITING_CONNECT
        self._version = "1.0"
        self._accepted = False
        self._client_heartbeat = (0, 0)
        self._heartbeat = HeartbeatPlan()
        self._out: list[bytes] = []
        self._parser = FrameParser(limits, commands=CLIENT_COMMANDS, frame_limit="max_frame_bytes_before_connect")
        self._handlers: dict[str, Callable[[Mapping[str, str], bytes], ServerEvent]] = {
            "CONNECT": self._on_connect,
            "STOMP": self._on_connect,
            "SEND": self._on_send,
            "SUBSCRIBE": self._on_subscribe,
            "UNSUBSCRIBE": self._on_unsubscribe,
            "ACK": self._on_ack,
            "NACK": self._on_nack,
            "BEGIN": self._on_begin,
            "COMMIT": self._on_commit,
            "ABORT": self._on_abort,
            "DISCONNECT": self._on_disconnect,
        }

    # ---- receiving ----

    def receive_data(self, data: bytes) -> list[ServerEvent]:
        state = self._state
        if state is State.CLOSED or state is State.CLOSING or state is State.FAILING or not data:
            return []
        parser = self._parser
        parser.append(data)
        events: list[ServerEvent] = []
        handlers = self._handlers
        while True:
            try:
                parts = parser.next_parts()
            except ProtocolError as exc:
                events.append(self._violation(exc))
                return events
            if parts is None:
                return events
            command, headers, body = parts
            try:
                new = TRANSITIONS.get((self._state, command))
                if new is None:
                    raise self._out_of_order(command)
                events.append(handlers[command](headers, body))
                self._state = new
            except ProtocolError as exc:
                exc.receipt_id = headers.get("receipt")
                events.append(self._violation(exc))
                return events
            if new is State.CLOSING:
                return events

    @staticmethod
    def _out_of_order(command: str) -> ProtocolError:
        if command == "CONNECT" or command == "STOMP":
            return ProtocolError("Invalid frame order", f"Received {command} on a connection that is already connected")
        return ProtocolError("Invalid frame order", f"Received {command} before CONNECT")

    def _violation(self, exc: ProtocolError) -> ProtocolViolation:
        self._state = State.FAILING
        return ProtocolViolation(
            exc.message, exc.detail, isinstance(exc, LimitExceeded), exc.receipt_id, tuple(exc.headers.items())
        )

    def _on_connect(self, headers: Mapping[str, str], body: bytes) -> ConnectRequested:
        version = negotiate_version(headers.get("accept-version"), self._versions)
        if not _only_eols(body):
            raise ProtocolError("Bad CONNECT", "A CONNECT frame carries no body")
        heartbeat = (0, 0) if version == "1.0" else parse_heartbeat(headers.get("heart-beat"))
        self._version = self._parser.version = version
        self._client_heartbeat = heartbeat
        # The frames behind a CONNECT wait for the app's login check (reading is paused meanwhile), so they may be as
        # large as any authenticated frame; a failed login closes the connection before any of them is acted on.
        self._parser.use_frame_limit("max_frame_bytes")
        return ConnectRequested(
            version, headers.get("host"), headers.get("login"), headers.get("passcode"), heartbeat, headers
        )

    def _on_send(self, headers: Mapping[str, str], body: bytes) -> Send:
        return Send(
            _require(headers, "destination", "SEND"),
            headers,
            body,
            headers.get("transaction"),
            headers.get("receipt"),
        )

    def _on_subscribe(self, headers: Mapping[str, str], _: bytes) -> Subscribe:
        destination = _require(headers, "destination", "SUBSCRIBE")
        sub_id = headers.get("id")
        if sub_id is None:
            sub_id = destination if self._version == "1.0" else _require(headers, "id", "SUBSCRIBE")
        ack = headers.get("ack", "auto")
        mode = _ACK_MODES.get(ack)
        if mode is None:
            raise ProtocolError("Invalid header", f"ack must be auto, client or client-individual, not {ack[:32]!r}")
        return Subscribe(destination, sub_id, mode, headers, headers.get("receipt"))

    def _on_unsubscribe(self, headers: Mapping[str, str], _: bytes) -> Unsubscribe:
        sub_id = headers.get("id")
        if sub_id is None and self._version == "1.0":
            sub_id = headers.get("destination")
        if sub_id is None:
            raise ProtocolError("Missing header", "UNSUBSCRIBE requires the 'id' header")
        return Unsubscribe(sub_id, headers.get("receipt"), headers)

    def _ack_id(self, headers: Mapping[str, str], command: str) -> str:
        if self._version == "1.2":
            return _require(headers, "id", command)
        ack_id = _require(headers, "message-id", command)
        if self._version == "1.1":
            _require(headers, "subscription", command)
        return ack_id

    def _on_ack(self, headers: Mapping[str, str], _: bytes) -> Ack:
        ack_id = self._ack_id(headers, "ACK")
        return Ack(ack_id, headers.get("subscription"), headers.get("transaction"), headers.get("receipt"))

    def _on_nack(self, headers: Mapping[str, str], _: bytes) -> Nack:
        # NACK is not part of STOMP 1.0, but 1.0 clients send it (RabbitMQ accepts it): by message-id, as a 1.0 ACK.
        ack_id = self._ack_id(headers, "NACK")
        requeue = headers.get("requeue")
        return Nack(
            ack_id,
            headers.get("subscription"),
            headers.get("transaction"),
            headers.get("receipt"),
            requeue is None or requeue.lower() != "false",  # Python clients write the boolean as "False"
        )

    def _on_begin(self, headers: Mapping[str, str], _: bytes) -> Begin:
        return Begin(_require(headers, "transaction", "BEGIN"), headers.get("receipt"))

    def _on_commit(self, headers: Mapping[str, str], _: bytes) -> Commit:
        return Commit(_require(headers, "transaction", "COMMIT"), headers.get("receipt"))

    def _on_abort(self, headers: Mapping[str, str], _: bytes) -> Abort:
        return Abort(_require(headers, "transaction", "ABORT"), headers.get("receipt"))

    def _on_disconnect(self, headers: Mapping[str, str], _: bytes) -> Disconnect:
        return Disconnect(headers.get("receipt"))

    # ---- sending ----

    def _may_send(self, command: str) -> bool:
        state = self._state
        if state is State.CLOSED:
            return False
        if TRANSITIONS.get((state, command)) is None:
            raise UsageError(f"Cannot send {command} while {state.value}")
        return True

    def accept(
        self, *, session: str, heartbeat: tuple[int, int] = (0, 0), headers: Mapping[str, str] | None = None
    ) -> HeartbeatPlan:
        """Queue CONNECTED and open the connection; returns the negotiated heart-beat plan."""
        plan = negotiate(self._client_heartbeat, heartbeat)
        if not self._may_send("CONNECTED"):
            return plan
        if self._accepted:
            raise UsageError("accept() was already called")
        sx = heartbeat[0] if plan.send_every_ms else 0
        sy = heartbeat[1] if plan.expect_every_ms else 0
        connected = {"version": self._version, "server": self._server, "session": session, "heart-beat": f"{sx},{sy}"}
        if headers:
            connected.update(headers)
        self._queue_out(encode_frame("CONNECTED", connected.items(), b"", self._version))
        self._state = TRANSITIONS[(self._state, "CONNECTED")]
        self._accepted = True
        self._heartbeat = plan
        self._parser.use_frame_limit("max_frame_bytes")
        return plan

    def send_message(
        self,
        *,
        destination: str,
        subscription: str,
        message_id: str,
        ack: str | None,
        headers: Mapping[str, str],
        body: bytes,
    ) -> None:
        if self._state is State.OPEN or (self._state is not State.FAILING and self._may_send("MESSAGE")):
            if len(body) < SEPARATE_BODY_MIN:
                self._queue_out(encode_message(destination, subscription, message_id, ack, headers, body, self._version))
                return
            self._queue_out(encode_message_head(destination, subscription, message_id, ack, headers, len(body), self._version))
            self._queue_out(body)  # not copied into the frame: see chunks_to_send
            self._queue_out(b"\0")
            self._out_large = True

    def send_receipt(self, receipt_id: str) -> None:
        if self._state is State.OPEN or self._may_send("RECEIPT"):
            self._queue_out(encode_receipt(receipt_id, self._version))

    def send_violation(self, violation: ProtocolViolation) -> None:
        """Queue the ERROR for a ``ProtocolViolation`` this connection reported, and close."""
        self.send_error(
            violation.message, body=violation.detail, receipt_id=violation.receipt_id, headers=dict(violation.headers)
        )

    def send_error(
        self,
        message: str,
        *,
        body: bytes | str = b"",
        receipt_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Queue an ERROR frame and close."""
        if not self._may_send("ERROR"):
            return
        error = {"message": message, "content-type": "text/plain"}
        if receipt_id is not None:
            error["receipt-id"] = receipt_id
        if headers:
            error.update(headers)
        payload = body.encode() if isinstance(body, str) else body
        self._queue_out(encode_frame("ERROR", error.items(), payload, self._version))
        self._state = State.CLOSED



class ClientConnection(_Endpoint):
    """The client side of one STOMP connection."""

    def __init__(self, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._state = State.AWAITING_CONNECT
        self._version = "1.0"
        self._offered_heartbeat = (0, 0)
        self._heartbeat = HeartbeatPlan()
        self._out: list[bytes] = []
        self._parser = FrameParser(limits, commands=SERVER_COMMANDS)

    # ---- sending ----

    def _queue(self, command: str, headers: list[tuple[str, str]], body: bytes = b"") -> None:
        new = TRANSITIONS.get((self._state, command))
        if new is None:
            raise UsageError(f"Cannot send {command} while {self._state.value}")
        self._queue_out(encode_frame(command, headers, body, self._version))
        self._state = new

    @staticmethod
    def _extra(
        pairs: list[tuple[str, str]], receipt: str | None, headers: Mapping[str, str] | None = None
    ) -> list[tuple[str, str]]:
        if receipt is not None:
            pairs.append(("receipt", receipt))
        if headers:
            pairs.extend(headers.items())
        return pairs

    def connect(
        self,
        *,
        host: str = "/",
        login: str | None = None,
        passcode: str | None = None,
        accept_version: Sequence[str] | None = SUPPORTED_VERSIONS,
        heartbeat: tuple[int, int] = (0, 0),
        command: str = "CONNECT",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Queue CONNECT (or STOMP). ``accept_version=None`` omits the header, which means STOMP 1.0."""
        if command not in ("CONNECT", "STOMP"):
            raise UsageError(f"connect() sends CONNECT or STOMP, not {command!r}")
        pairs: list[tuple[str, str]] = []
        if accept_version is not None:
            pairs.append(("accept-version", ",".join(accept_version)))
        pairs.append(("host", host))
        if login is not None:
            pairs.append(("login", login))
        if passcode is not None:
            pairs.append(("passcode", passcode))
        if accept_version is not None or heartbeat != (0, 0):
            pairs.append(("heart-beat", f"{heartbeat[0]},{heartbeat[1]}"))
        self._queue(command, self._extra(pairs, None, headers))
        self._offered_heartbeat = heartbeat

    def send(
        self,
        destination: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        receipt: str | None = None,
        transaction: str | None = None,
    ) -> None:
        pairs = [("destination", destination)]
        if transaction is not None:
            pairs.append(("transaction", transaction))
        self._queue("SEND", self._extra(pairs, receipt, headers), body)

    def subscribe(
        self,
        destination: str,
        id: str,
        *,
        ack: AckMode = "auto",
        headers: Mapping[str, str] | None = None,
        receipt: str | None = None,
    ) -> None:
        pairs = [("destination", destination), ("id", id), ("ack", ack)]
        self._queue("SUBSCRIBE", self._extra(pairs, receipt, headers))

    def unsubscribe(self, id: str, *, receipt: str | None = None) -> None:
        self._queue("UNSUBSCRIBE", self._extra([("id", id)], receipt))

    def _ack_pairs(self, ack_id: str, subscription: str | None, transaction: str | None) -> list[tuple[str, str]]:
        if self._version == "1.2":
            pairs = [("id", ack_id)]
        elif self._version == "1.1" and subscription is None:
            raise UsageError("STOMP 1.1 ACK/NACK needs the subscription")
        else:
            pairs = [("message-id", ack_id)]
        if subscription is not None:
            pairs.append(("subscription", subscription))
        if transaction is not None:
            pairs.append(("transaction", transaction))
        return pairs

    def ack(
        self,
        ack_id: str,
        *,
        subscription: str | None = None,
        transaction: str | None = None,
        receipt: str | None = None,
    ) -> None:
        """ACK a message: ``ack_id`` is the MESSAGE's ``ack`` header in 1.2, its ``message-id`` in 1.0/1.1."""
        self._queue("ACK", self._extra(self._ack_pairs(ack_id, subscription, transaction), receipt))

    def nack(
        self,
        ack_id: str,
        *,
        subscription: str | None = None,
        transaction: str | None = None,
        receipt: str | None = None,
        requeue: bool = True,
    ) -> None:
        if self._version == "1.0":
            raise UsageError("NACK is not part of STOMP 1.0")
        pairs = self._ack_pairs(ack_id, subscription, transaction)
        if not requeue:
            pairs.append(("requeue", "false"))
        self._queue("NACK", self._extra(pairs, receipt))

    def begin(self, tx: str, *, receipt: str | None = None) -> None:
        self._queue("BEGIN", self._extra([("transaction", tx)], receipt))

    def commit(self, tx: str, *, receipt: str | None = None) -> None:
        self._queue("COMMIT", self._extra([("transaction", tx)], receipt))

    def abort(self, tx: str, *, receipt: str | None = None) -> None:
        self._queue("ABORT", self._extra([("transaction", tx)], receipt))

    def disconnect(self, *, receipt: str | None = None) -> None:
        self._queue("DISCONNECT", self._extra([], receipt))


    # ---- receiving ----

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        if self._state is State.CLOSED or not data:
            return []
        parser = self._parser
        parser.append(data)
        events: list[ClientEvent] = []
        while self._state is not State.CLOSED:
            try:
                parts = parser.next_parts()
                if parts is None:
                    break
                events.append(self._handle(*parts))
            except ProtocolError as exc:
                self._state = State.CLOSED
                events.append(ProtocolViolation(exc.message, exc.detail, isinstance(exc, LimitExceeded)))
        return events

    def _handle(self, command: str, headers: Mapping[str, str], body: bytes) -> ClientEvent:
        new = TRANSITIONS.get((self._state, command))
        if new is None:
            raise ProtocolError("Invalid frame order", f"Received {command} while {self._state.value}")
        event: ClientEvent
        if command == "MESSAGE":
            event = MessageReceived(
                _require(headers, "destination", command),
                headers.get("subscription", ""),
                _require(headers, "message-id", command),
                headers.get("ack"),
                headers,
                body,
            )
        elif command == "RECEIPT":
            event = ReceiptReceived(_require(headers, "receipt-id", command))
        elif command == "ERROR":
            event = ErrorReceived(headers.get("message", ""), headers, body)
        else:  # CONNECTED
            version = headers.get("version", "1.0")
            if version not in SUPPORTED_VERSIONS:
                raise ProtocolError("Version mismatch", f"The server chose an unknown version {version[:16]!r}")
            server_heartbeat = parse_heartbeat(headers.get("heart-beat"))
            self._version = self._parser.version = version
            self._heartbeat = negotiate(self._offered_heartbeat, server_heartbeat, role="client")
            event = Connected(version, server_heartbeat, headers.get("session"), headers.get("server"), headers)
        self._state = new
        return event
