"""Incremental frame parser: bytes in, :class:`Frame` values out, with every limit enforced.

Rules (any split of the input gives the same frames):
- Between frames any number of LF, CRLF and stray NUL bytes is noise (heart-beats); a CR not followed by LF is an
  error. CRLF line endings are accepted in every version.
- Header lines split on the FIRST colon, so values may hold raw colons. The first of repeated headers wins.
- Header names and values are unescaped per ``version`` (never in CONNECT/CONNECTED). In 1.0 only, values are
  trimmed of surrounding spaces and tabs, as RabbitMQ and ActiveMQ Classic do for old clients that write
  ``destination: /queue/a``; 1.1 and 1.2 keep every byte.
- ``content-length`` means exactly N bytes (NULs allowed), then a NUL; without it the body runs to the first NUL.
- Headers must be UTF-8. Errors are :class:`ProtocolError` (``"Invalid frame"``, ``"Invalid header"``,
  ``"Bad command"``) or :class:`LimitExceeded`, whose message names the limit. After an error the parser is dead.
- Sizes: under ``max_frame_bytes`` (a logged-in peer) the limit counts the body only, so a body of exactly that size
  fits whatever headers come with it; the headers are bounded by their own limits (``max_headers`` lines of at most
  ``max_header_line_bytes``), so a frame never holds more than the body limit plus that. Under any other frame limit
  (``max_frame_bytes_before_connect``: a stranger) it counts the whole frame. The body is also held to
  ``max_body_bytes`` in every state.

The parser scans whole frames with ``bytes.find``; when a chunk holds complete frames it slices them straight out of
the received ``bytes`` without copying into the buffer. A body of ``gather_min`` bytes or more whose
``content-length`` is known is gathered instead: the chunks that hold it are kept as received and joined once, when
the last one arrives, so it is copied once, not once into the buffer per chunk (with its reallocations) and again
out of it.
"""

from __future__ import annotations

from .errors import LimitExceeded, ProtocolError
from .escaping import RAW_COMMANDS, unescape
from .frame import CLIENT_COMMANDS, SERVER_COMMANDS, Frame
from .limits import DEFAULT_LIMITS, Limits

__all__ = ["FrameParser", "ALL_COMMANDS", "Parts"]

ALL_COMMANDS = CLIENT_COMMANDS | SERVER_COMMANDS

_Pending = tuple[str, dict[str, str], int, int]  # command, headers, body offset from frame start, length or -1
Parts = tuple[str, dict[str, str], bytes]  # a frame's command, headers and body, before they become a Frame

GATHER_MIN = 64 * 1024  # the default ``FrameParser.gather_min``


class FrameParser:
    """Feed bytes with :meth:`append`, pull frames with :meth:`next_frame`; or do both with :meth:`feed`.

    ``version`` may be changed between frames (the connection does so once CONNECT negotiated a version), and so
    may the frame-size limit (:meth:`use_frame_limit`), so that frames pipelined behind a CONNECT are parsed right.
    """

    __slots__ = (
        "limits",
        "version",
        "commands",
        "_frame_limit",
        "_frame_limit_name",
        "_whole",
        "_body_limit",
        "_head_limit",
        "_buf",
        "_pos",
        "_scan",
        "_pending",
        "_failed",
        "gather_min",
        "_parts",
        "_gathered",
    )

    def __init__(
        self,
        limits: Limits = DEFAULT_LIMITS,
        *,
        version: str = "1.0",
        commands: frozenset[str] = ALL_COMMANDS,
        frame_limit: str = "max_frame_bytes",
    ) -> None:
        self.limits = limits
        self.version = version
        self.commands = commands
        self._frame_limit_name = frame_limit
        self._frame_limit: int = 0
        self._whole = False  # the frame limit counts the whole frame (True) or the body only
        self._body_limit = 0
        # No head of at most max_headers lines (and the command) of max_header_line_bytes each, CRLF-ended, is longer.
        self._head_limit = (limits.max_headers + 1) * (limits.max_header_line_bytes + 2) + 2
        self.use_frame_limit(frame_limit)
        self._buf: bytes | bytearray = b""
        self._pos = 0  # start of the unconsumed data (the current frame once noise is skipped)
        self._scan = 0  # offset from _pos where the next search for a terminator resumes
        self._pending: _Pending | None = None
        self._failed: ProtocolError | None = None
        # A large body being gathered (``_pending`` is its frame then): the received chunks from its first byte on,
        # as received, and how many bytes they hold.
        self.gather_min = GATHER_MIN
        self._parts: list[bytes | memoryview] | None = None
        self._gathered = 0

    def use_frame_limit(self, name: str) -> None:
        """Switch the frame-size limit to another field of :class:`Limits` (``max_frame_bytes`` after login, which
        counts the body only; any other counts the whole frame)."""
        self._frame_limit = limit = getattr(self.limits, name)
        self._frame_limit_name = name
        self._whole = name != "max_frame_bytes"
        self._body_limit = self.limits.max_body_bytes if self._whole else min(limit, self.limits.max_body_bytes)

    @property
    def failed(self) -> ProtocolError | None:
        """The error that stopped the parser, or None."""
        return self._failed

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames."""
        return len(self._buf) - self._pos + self._gathered

    def append(self, data: bytes) -> None:
        if not data or self._failed is not None:
            return
        if self._parts is not None:  # kept as it is: ``bytes`` cannot change under us (anything else is copied once)
            self._parts.append(data if type(data) is bytes else bytes(data))
            self._gathered += len(data)
            return
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            self._buf = bytes(data)
        elif isinstance(buf, bytes):
            rest = bytearray(memoryview(buf)[pos:])
            rest += data
            self._buf = rest
        else:
            if pos:
                del buf[:pos]
            buf += data
        self._pos = 0

    def feed(self, data: bytes) -> list[Frame | ProtocolError]:
        """Append ``data`` and return every complete frame; an error, if any, is the last item."""
        self.append(data)
        out: list[Frame | ProtocolError] = []
        while True:
            try:
                frame = self.next_frame()
            except ProtocolError as exc:
                out.append(exc)
                return out
            if frame is None:
                return out
            out.append(frame)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None when more bytes are needed. Raises :class:`ProtocolError`."""
        parts = self.next_parts()
        return None if parts is None else Frame(*parts)

    def next_parts(self) -> Parts | None:
        """:meth:`next_frame` as a (command, headers, body) tuple: the connections' hot path builds no Frame."""
        if self._failed is not None:
            return None
        try:
            return self._next()
        except ProtocolError as exc:
            self._failed = exc
            raise

    # ---- internals ----

    def _too_large(self, receipt: str | None) -> LimitExceeded:
        name = self._frame_limit_name
        return LimitExceeded(
            f"Frame too large: limit {name}={self._frame_limit}",
            f"A frame may hold at most {self._frame_limit} bytes",
            receipt_id=receipt,
        )

    def _body_too_large(self, receipt: str | None) -> LimitExceeded:
        if not self._whole and self._frame_limit <= self.limits.max_body_bytes:  # the frame limit is the body's
            return LimitExceeded(
                f"Frame too large: limit {self._frame_limit_name}={self._frame_limit}",
                f"A frame body may hold at most {self._frame_limit} bytes",
                receipt_id=receipt,
            )
        limit = self.limits.max_body_bytes
        return LimitExceeded(
            f"Body too large: limit max_body_bytes={limit}",
            f"A frame body may hold at most {limit} bytes",
            receipt_id=receipt,
        )

    def _head_too_large(self) -> LimitExceeded:
        limits = self.limits
        return LimitExceeded(
            f"Headers too large: limit max_headers={limits.max_headers}, "
            f"max_header_line_bytes={limits.max_header_line_bytes}",
            f"No end of headers within {self._head_limit} bytes: a frame may hold at most {limits.max_headers} header "
            f"lines of at most {limits.max_header_line_bytes} bytes",
        )

    def _next(self) -> Parts | None:
        if self._parts is not None:
            return self._gathered_frame()
        buf = self._buf
        pos = self._pos
        end = len(buf)
        pending = self._pending
        if pending is None:
            # noise between frames: LF, CRLF, NUL
            while pos < end:
                c = buf[pos]
                if c == 10 or c == 0:
                    pos += 1
                elif c == 13:
                    if pos + 1 == end:
                        break
                    if buf[pos + 1] != 10:
                        raise ProtocolError("Invalid frame", "A CR must be followed by LF")
                    pos += 2
                else:
                    break
            self._pos = pos
            if pos >= end or buf[pos] == 13:
                return None
            pending = self._parse_head(buf, pos, end)
            if pending is None:
                return None
        command, headers, body_off, length = pending
        body_start = pos + body_off
        if length >= 0:
            stop = body_start + length
            if stop >= end:
                self._pending = pending
                if length >= self.gather_min:  # the rest comes in later chunks: gather them, see _gathered_frame
                    # (a view of received bytes costs nothing; what a bytearray holds is copied, as it will change)
                    view = memoryview(buf)[body_start:end]
                    self._parts = [view if type(buf) is bytes else bytes(view)]
                    self._gathered = end - body_start
                    self._buf = b""
                    self._pos = 0
                return None
            if buf[stop] != 0:
                raise ProtocolError(
                    "Invalid frame",
                    f"content-length {length} is not followed by a NUL",
                    receipt_id=headers.get("receipt"),
                )
        else:
            stop = buf.find(b"\0", max(body_start, pos + self._scan))
            if stop < 0:
                if self._whole and end - pos >= self._frame_limit:
                    raise self._too_large(headers.get("receipt"))
                if end - body_start > self._body_limit:
                    raise self._body_too_large(headers.get("receipt"))
                self._pending = pending
                self._scan = end - pos
                return None
            if stop - body_start > self._body_limit:
                raise self._body_too_large(headers.get("receipt"))
            if self._whole and stop - pos >= self._frame_limit:
                raise self._too_large(headers.get("receipt"))
        self._pos = stop + 1
        self._pending = None
        self._scan = 0
        # one copy: slicing a bytearray would copy the body once into a bytearray and again into the bytes
        return command, headers, bytes(memoryview(buf)[body_start:stop])

    def _gathered_frame(self) -> Parts | None:
        """The gathered frame once its body and the NUL after it arrived; what followed them is the new buffer."""
        parts = self._parts
        pending = self._pending
        assert parts is not None and pending is not None
        command, headers, _, length = pending
        if self._gathered <= length:
            return None
        i, need = 0, length  # the part that holds the body's last byte (or, for a body that ends a part, the NUL)
        while need >= len(parts[i]):
            need -= len(parts[i])
            i += 1
        last = memoryview(parts[i])
        if last[need] != 0:
            raise ProtocolError(
                "Invalid frame", f"content-length {length} is not followed by a NUL", receipt_id=headers.get("receipt")
            )
        pieces = [*parts[:i], last[:need]]
        rest = b"".join([last[need + 1 :], *parts[i + 1 :]])
        body = b"".join(pieces)
        self._parts = None
        self._gathered = 0
        self._pending = None
        self._scan = 0
        self._buf = rest
        self._pos = 0
        return command, headers, body

    def _parse_head(self, buf: bytes | bytearray, pos: int, end: int) -> _Pending | None:
        start = pos + self._scan
        lf = buf.find(b"\n\n", start)
        crlf = buf.find(b"\n\r\n", start, end if lf < 0 else lf + 1)
        if crlf >= 0:
            block_end, body_start = crlf, crlf + 3
        elif lf >= 0:
            block_end, body_start = lf, lf + 2
        else:
            if self._whole and end - pos >= self._frame_limit:
                raise self._too_large(None)
            if end - pos > self._head_limit:
                raise self._head_too_large()
            self._scan = max(0, end - pos - 2)
            return None
        self._scan = 0
        limits = self.limits
        try:
            text = buf[pos:block_end].decode()
        except UnicodeDecodeError:
            raise ProtocolError("Invalid header", "Headers must be UTF-8") from None
        if "\0" in text:  # relayed, a NUL would end the consumer's frame early and forge another from the rest
            raise ProtocolError("Invalid header", "Headers must not contain NUL")
        lines = text.split("\n")
        if "\r" in text:
            for i, line in enumerate(lines):
                if line.endswith("\r"):
                    line = lines[i] = line[:-1]
                if "\r" in line:
                    raise ProtocolError("Invalid frame", "A CR must be followed by LF")
        command = lines[0]
        if command not in self.commands:
            raise ProtocolError("Bad command", f"Could not interpret command {command[:64]!r}")
        if len(lines) - 1 > limits.max_headers:
            raise LimitExceeded(
                f"Too many headers: limit max_headers={limits.max_headers}",
                f"A frame may hold at most {limits.max_headers} header lines",
            )
        max_line = limits.max_header_line_bytes
        check_lines = block_end - pos > max_line
        version = self.version
        escaped = version != "1.0" and command not in RAW_COMMANDS
        trim = version == "1.0" and command not in RAW_COMMANDS
        headers: dict[str, str] = {}
        for i in range(1, len(lines)):
            line = lines[i]
            if check_lines and len(line) * 4 > max_line and len(line.encode()) > max_line:
                raise LimitExceeded(
                    f"Header too long: limit max_header_line_bytes={max_line}",
                    f"A header line may hold at most {max_line} bytes",
                )
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolError("Invalid header", f"Header line without a colon: {line[:64]!r}")
            if escaped:
                if "\\" in line:
                    name = unescape(name, version)
                    value = unescape(value, version)
            elif trim:
                value = value.strip(" \t")
            if not name:
                raise ProtocolError("Invalid header", "Empty header name")
            if name not in headers:
                headers[name] = value
        receipt = headers.get("receipt")
        length = -1
        cl = headers.get("content-length")
        if cl is not None:
            if not (cl.isascii() and cl.isdigit()):
                raise ProtocolError(
                    "Invalid header", f"content-length must be a non-negative integer, not {cl[:32]!r}", receipt_id=receipt
                )
            # more digits than any allowed body needs is too large (and int() refuses over 4300 digits)
            length = int(cl) if len(cl) <= 12 else self._body_limit + 1
            if length > self._body_limit:
                raise self._body_too_large(receipt)
            if self._whole and body_start - pos + length >= self._frame_limit:
                raise self._too_large(receipt)
        return command, headers, body_start - pos, length
