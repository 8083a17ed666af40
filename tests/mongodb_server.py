"""A MongoDB-protocol server for the tests: ``MONGODB_URL`` when set, else a private FerretDB on PostgreSQL.

``mongodb_url`` (session fixture) yields a ``mongodb://127.0.0.1:PORT/`` URL. Without FerretDB (or without the
PostgreSQL binaries, ``postgresql`` Debian package) the MongoDB tests are skipped, or fail when ``CI=true``.
``FerretDBServer`` starts extra private servers (the failover tests kill one).

Backend: FerretDB's PostgreSQL handler, measured faster than its SQLite handler for the queue workload and free of
SQLite's "database is locked (517)" when writes meet a tailable cursor. One private PostgreSQL cluster per test
process (``initdb`` into a temp dir, TCP on 127.0.0.1 only, socket in the temp dir, run as the ``postgres`` OS user
when we are root; ``fsync=off``: the tests kill FerretDB, never PostgreSQL, so that costs no test any durability
it checks) is started on first use and removed at exit; every ``FerretDBServer`` gets its own database in it.
``STOMPGATE_FERRETDB_HANDLER=sqlite`` selects the SQLite handler instead.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["FerretDBServer", "PostgresCluster", "ferretdb_binary", "free_port", "mongodb_url", "require_ferretdb"]

START_TIMEOUT_S = 20.0


def ferretdb_binary() -> str | None:
    """``$(go env GOPATH)/bin/ferretdb``, ``~/go/bin/ferretdb`` or ``ferretdb`` on PATH."""
    candidates: list[Path] = []
    gopath = os.environ.get("GOPATH")
    if not gopath and shutil.which("go"):
        try:
            gopath = subprocess.run(
                ["go", "env", "GOPATH"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            gopath = None
    if gopath:
        candidates.append(Path(gopath.split(os.pathsep)[0]) / "bin" / "ferretdb")
    candidates.append(Path.home() / "go" / "bin" / "ferretdb")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which("ferretdb")


def require_ferretdb() -> str:
    binary = ferretdb_binary()
    if binary is None:
        message = "FerretDB not found (run .ci/services.sh, or set MONGODB_URL)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    """A bare OP_MSG ``{ping: 1, $db: "admin"}`` over a socket: no driver, no event loop needed."""
    import bson  # pymongo's; imported here so this module loads without it

    body = bson.encode({"ping": 1, "$db": "admin"})
    payload = (0).to_bytes(4, "little") + b"\x00" + body
    header = (16 + len(payload)).to_bytes(4, "little") + (1).to_bytes(4, "little") + (0).to_bytes(4, "little")
    header += (2013).to_bytes(4, "little")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(header + payload)
            data = b""
            while len(data) < 4 or len(data) < int.from_bytes(data[:4], "little"):
                chunk = sock.recv(65536)
                if not chunk:
                    return False
                data += chunk
        reply = bson.decode(data[21:])
        return bool(reply.get("ok"))
    except OSError:
        return False


class FerretDBServer:
    """One FerretDB process with the SQLite backend, on loopback, telemetry off. ``stop``/``kill`` and ``start``
    again reuse the same port and data directory."""

    def __init__(self, binary: str, data_dir: str | None = None, port: int | None = None) -> None:
        self.binary = binary
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="stompgate-ferretdb-")
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def start(self) -> None:
        os.makedirs(os.path.join(self.data_dir, "db"), exist_ok=True)
        log = open(os.path.join(self.data_dir, "ferretdb.log"), "ab")  # noqa: SIM115 - owned by the child
        try:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--handler=sqlite",
                    f"--sqlite-url=file:{os.path.join(self.data_dir, 'db')}/",
                    f"--listen-addr=127.0.0.1:{self.port}",
                    "--telemetry=disable",
                    "--debug-addr=-",
                    f"--state-dir={self.data_dir}",
                    "--log-level=error",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"FerretDB exited with {self.process.returncode}; see {self.data_dir}/ferretdb.log")
            if _ping(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"FerretDB did not answer ping on port {self.port} within {START_TIMEOUT_S}s")

    def _signal(self, sig: signal.Signals) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> FerretDBServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@pytest.fixture(scope="session")
def mongodb_url() -> Iterator[str]:
    url = os.environ.get("MONGODB_URL")
    if url:
        yield url
        return
    server = FerretDBServer(require_ferretdb())
    try:
        server.start()
    except RuntimeError as exc:
        server.cleanup()
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    try:
        yield server.url
    finally:
        server.cleanup()
