"""A deliberately plain HTTP socket client for tests: send exact request bytes, read the whole answer."""

from __future__ import annotations

import socket

__all__ = ["raw_http"]


def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send exact request bytes (no client-side normalisation), read until the server closes, split the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body
