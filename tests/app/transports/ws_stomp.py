"""A plain STOMP-over-WebSocket test client on the real ``websockets`` library: send exact messages, read frames."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect

__all__ = ["WsFrame", "WsStomp", "frame_bytes"]


@dataclass
class WsFrame:
    command: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    binary: bool = False  # arrived in a BINARY WebSocket message


def frame_bytes(command: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [command] + [f"{k}:{v}" for k, v in (headers or {}).items()]
    return ("\n".join(lines) + "\n\n").encode() + body + b"\x00"


class WsStomp:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buffer = b""
        self.last_binary = False
        self.messages: list[str | bytes] = []  # every WebSocket message received, as received

    @classmethod
    async def open(cls, url: str, subprotocols: list[str] | None = None, source: str | None = None) -> WsStomp:
        """``source``: the local address to connect from (e.g. 127.0.0.2, a second loopback address on Linux)."""
        offered = ["v12.stomp", "v11.stomp", "v10.stomp"] if subprotocols is None else subprotocols
        extra = {} if source is None else {"local_addr": (source, 0)}
        ws = await connect(url, subprotocols=offered or None, open_timeout=5, **extra)  # type: ignore[arg-type]
        return cls(ws)

    async def close(self) -> None:
        await self.ws.close()

    async def send(self, data: bytes | str) -> None:
        await self.ws.send(data)

    async def frame(self, command: str, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        data = frame_bytes(command, headers, body)
        try:
            await self.ws.send(data.decode())
        except UnicodeDecodeError:
            await self.ws.send(data)

    async def connect(self, version: str = "1.2", **headers: str) -> WsFrame:
        await self.frame("CONNECT", {"accept-version": version, "host": "/", "heart-beat": "0,0", **headers})
        reply = await self.read()
        assert reply.command == "CONNECTED", reply
        return reply

    async def _fill(self, timeout: float) -> None:
        message = await asyncio.wait_for(self.ws.recv(), timeout)
        self.messages.append(message)
        self.last_binary = isinstance(message, bytes)
        self.buffer += message if isinstance(message, bytes) else message.encode()

    async def read(self, timeout: float = 5.0) -> WsFrame:
        """The next frame, skipping heart-beat EOLs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.buffer = self.buffer.lstrip(b"\r\n")
            head_end = self.buffer.find(b"\n\n")
            if head_end >= 0:
                lines = self.buffer[:head_end].decode().split("\n")
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    key, _, value = line.partition(":")
                    headers.setdefault(key, value)
                start = head_end + 2
                if "content-length" in headers:
                    end = start + int(headers["content-length"])
                    complete = len(self.buffer) > end
                else:
                    end = self.buffer.find(b"\x00", start)
                    complete = end >= 0
                if complete:
                    body = self.buffer[start:end]
                    self.buffer = self.buffer[end + 1 :]
                    return WsFrame(lines[0], headers, body, self.last_binary)
            await self._fill(max(0.01, deadline - loop.time()))
