"""stomp.py, the most used Python STOMP client, wrapped just enough for assertions."""

from __future__ import annotations

import queue
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import stomp
from stomp.utils import Frame

__all__ = ["Received", "Client", "connect"]

CONNECTIONS = {"1.0": stomp.Connection10, "1.1": stomp.Connection11, "1.2": stomp.Connection12}


@dataclass
class Received:
    headers: dict[str, str]
    body: str


class Client(stomp.ConnectionListener):  # type: ignore[misc]
    # Every client made during a test, so the ``close_stomp_clients`` fixture can close what a test left open (a
    # socket closed by the garbage collector instead raises a ResourceWarning, an error under our pytest settings).
    opened: list[Client] = []

    def __init__(self, port: int, version: str, heartbeats: tuple[int, int] = (0, 0)) -> None:
        Client.opened.append(self)
        kwargs: dict[str, Any] = {"heartbeats": heartbeats} if version != "1.0" else {}
        self.version = version
        self.conn = CONNECTIONS[version]([("127.0.0.1", port)], **kwargs)
        self.conn.set_listener("test", self)
        self.messages: queue.Queue[Received] = queue.Queue()
        self.errors: list[Frame] = []
        self.receipts: set[str] = set()
        self._receipt_cv = threading.Condition()

    def on_message(self, frame: Frame) -> None:
        self.messages.put(Received(dict(frame.headers), frame.body))

    def on_error(self, frame: Frame) -> None:
        self.errors.append(frame)

    def on_receipt(self, frame: Frame) -> None:
        with self._receipt_cv:
            self.receipts.add(frame.headers["receipt-id"])
            self._receipt_cv.notify_all()

    def connect(self, **headers: str) -> Client:
        self.conn.connect(wait=True, headers=headers or None)
        return self

    def receipt(self) -> str:
        return uuid.uuid4().hex

    def wait_receipt(self, receipt: str, timeout: float = 10.0) -> None:
        with self._receipt_cv:
            assert self._receipt_cv.wait_for(lambda: receipt in self.receipts, timeout), f"no RECEIPT {receipt}"

    def send(self, destination: str, body: str, *, receipt: bool = True, **headers: str) -> None:
        rid = self.receipt() if receipt else None
        if rid is not None:
            headers["receipt"] = rid
        self.conn.send(destination=destination, body=body, headers=headers)
        if rid is not None:
            self.wait_receipt(rid)

    def get(self, timeout: float = 5.0) -> Received:
        return self.messages.get(timeout=timeout)

    def nothing(self, timeout: float = 0.5) -> bool:
        try:
            extra = self.messages.get(timeout=timeout)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected message {extra}")

    def ack(self, message: Received, **kwargs: Any) -> None:
        h = message.headers
        if self.version == "1.2":
            self.conn.ack(h["ack"], **kwargs)
        elif self.version == "1.1":
            self.conn.ack(h["message-id"], h["subscription"], **kwargs)
        else:
            self.conn.ack(h["message-id"], **kwargs)

    def nack(self, message: Received, **kwargs: Any) -> None:
        h = message.headers
        if self.version == "1.2":
            self.conn.nack(h["ack"], **kwargs)
        else:
            self.conn.nack(h["message-id"], h["subscription"], **kwargs)

    def disconnect(self) -> None:
        if self.conn.is_connected():
            self.conn.disconnect(receipt=self.receipt())

    def force_close(self) -> None:
        try:
            if self.conn.is_connected():
                self.conn.disconnect()
        except Exception:  # already gone: only the socket matters now
            pass
        self.conn.transport.stop()
        self.conn.transport.disconnect_socket()


def connect(port: int, version: str = "1.2", **headers: str) -> Client:
    return Client(port, version).connect(**headers)
