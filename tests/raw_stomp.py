"""A deliberately plain STOMP socket client for tests: write exact bytes, read frames back."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

__all__ = ["RawFrame", "RawClient"]


@dataclass
class RawFrame:
    command: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class RawClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, command: str, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        lines = [command] + [f"{k}:{v}" for k, v in (headers or {}).items()]
        self.send(("\n".join(lines) + "\n\n").encode() + body + b"\x00")

    def connect(self, version: str = "1.2", **headers: str) -> RawFrame:
        self.frame("CONNECT", {"accept-version": version, "host": "/", **headers})
        reply = self.read()
        assert reply.command == "CONNECTED", reply
        return reply

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return False
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def read(self, timeout: float = 5.0) -> RawFrame:
        """The next frame, skipping heart-beat EOLs."""
        deadline = time.monotonic() + timeout
        while True:
            self.buffer = self.buffer.lstrip(b"\r\n")
            head_end = self.buffer.find(b"\n\n")
            if head_end >= 0:
                head = self.buffer[:head_end].decode()
                lines = head.replace("\r\n", "\n").split("\n")
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    key, _, value = line.partition(":")
                    headers.setdefault(key, value)
                start = head_end + 2
                if "content-length" in headers:
                    end = start + int(headers["content-length"])
                    if len(self.buffer) > end:
                        body = self.buffer[start:end]
                        self.buffer = self.buffer[end + 1 :]
                        return RawFrame(lines[0], headers, body)
                else:
                    nul = self.buffer.find(b"\x00", start)
                    if nul >= 0:
                        body = self.buffer[start:nul]
                        self.buffer = self.buffer[nul + 1 :]
                        return RawFrame(lines[0], headers, body)
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            if time.monotonic() > deadline or not self._fill():
                raise EOFError(f"no complete frame; buffer={self.buffer[:200]!r}")

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the socket (after any frames still buffered)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except (TimeoutError, socket.timeout):
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()
