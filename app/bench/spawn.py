"""``--spawn STORE_URL``: start a ``stompgate serve`` subprocess on free loopback ports, and stop it cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SpawnedGateway", "free_port", "spawn_gateway", "read_rss_kb", "read_cpu_seconds"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def read_rss_kb(pid: int) -> int | None:
    """VmRSS of a process in KiB (from /proc/PID/status), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def read_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used (from /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class SpawnedGateway:
    process: subprocess.Popen[bytes]
    host: str
    stomp_port: int
    http_port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (the gateway's graceful shutdown), SIGKILL only if it does not exit within ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return self.process.returncode


def _stomp_ready(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"CONNECT\naccept-version:1.2\nhost:/\n\n\0")
            s.settimeout(1.0)
            reply = s.recv(4096)
            s.sendall(b"DISCONNECT\n\n\0")
            return reply.startswith(b"CONNECTED")
    except OSError:
        return False


def _http_ready(host: str, port: int) -> bool:
    """uvicorn listens on the HTTP port only after the app started (the STOMP port opens during start-up)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            s.settimeout(1.0)
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def spawn_gateway(store: str, *, host: str = "127.0.0.1", extra: Sequence[str] = (), timeout: float = 30.0) -> SpawnedGateway:
    stomp_port, http_port = free_port(host), free_port(host)
    fd, name = tempfile.mkstemp(prefix=f"stompgate-bench-{stomp_port}-", suffix=".log")
    os.close(fd)
    log_path = Path(name)
    args = [
        sys.executable, "-m", "app.cli", "serve",
        "--host", host, "--stomp-port", str(stomp_port), "--http-port", str(http_port), "--store", store,
        "--log-level", "warning", *extra,
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    gateway = SpawnedGateway(process, host, stomp_port, http_port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {process.returncode}:\n{gateway.log_tail()}")
        if _stomp_ready(host, stomp_port) and _http_ready(host, http_port):
            return gateway
        time.sleep(0.05)
    gateway.stop()
    raise RuntimeError(f"the gateway did not accept STOMP connections within {timeout:.0f} s:\n{gateway.log_tail()}")
