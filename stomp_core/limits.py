"""Named limits: every bound the parser and the connection enforce, with the reason for its value."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits", "DEFAULT_LIMITS"]


@dataclass(frozen=True, slots=True)
class Limits:
    # A logged-in peer's frame, counted by its body: a body of exactly this size fits, whatever headers come with
    # it (they are bounded by max_headers and max_header_line_bytes below, so a frame holds at most this plus about
    # 800 KiB). 4 MiB is RabbitMQ's default ceiling, large enough for documents and small enough that one client
    # cannot make the gateway buffer an unbounded amount of memory.
    max_frame_bytes: int = 4 * 1024 * 1024
    # Before CONNECTED the peer is unauthenticated: it gets 64 KiB (RabbitMQ's pre-auth limit) for a whole frame
    # (command, headers and body), enough for any CONNECT frame, so a stranger cannot make us hold megabytes.
    max_frame_bytes_before_connect: int = 64 * 1024
    # Headers per frame. Real clients send fewer than 20; 100 leaves room for application headers while bounding
    # the per-frame dictionary work.
    max_headers: int = 100
    # One header line ("name:value"), in bytes. 8 KiB is the common HTTP server default for a single header line.
    max_header_line_bytes: int = 8 * 1024
    # The body alone, before and after CONNECTED (the gateway sets it to max_frame_bytes).
    max_body_bytes: int = 4 * 1024 * 1024


DEFAULT_LIMITS = Limits()
