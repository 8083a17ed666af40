"""Start a real ``stompgate serve`` process on free loopback ports, for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["Gateway", "free_port", "run_gateway"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    stomp_port: int
    http_port: int
    store: str
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return self.process.returncode


def start_gateway(tmp_path: Path, store: str, extra: Sequence[str] = (), env: dict[str, str] | None = None) -> Gateway:
    stomp_port, http_port = free_port(), free_port()
    log_path = tmp_path / f"gateway-{stomp_port}.log"
    args = [
        sys.executable, "-c", "from app.cli import main; main()", "serve",
        "--host", "127.0.0.1", "--stomp-port", str(stomp_port), "--http-port", str(http_port), "--store", store,
        "--log-level", "warning", *extra,
    ]  # fmt: skip
    full_env = {**os.environ, **(env or {})}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=tmp_path)
    gateway = Gateway(process, stomp_port, http_port, store, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gateway.log()}")
        try:
            if httpx.get(f"{gateway.http_url}/health", timeout=0.5).status_code == 200:
                with socket.create_connection(("127.0.0.1", stomp_port), timeout=0.5):
                    return gateway
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.05)
    gateway.stop()
    raise RuntimeError(f"gateway did not start in time:\n{gateway.log()}")


@contextmanager
def run_gateway(tmp_path: Path, store: str | None = None, extra: Sequence[str] = ()) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path, store or f"sqlite:///{tmp_path}/gw.db", extra)
    try:
        yield gateway
    finally:
        gateway.stop()
