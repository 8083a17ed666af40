"""Redis for the Redis datasource's tests: private ``redis-server`` processes on 127.0.0.1, each on a free port in a
temp dir, with an fsynced append-only file (``--appendonly yes --appendfsync always --save ''``), stopped at exit.
Without the ``redis-server`` binary (Debian package redis-server, installed by .ci/services.sh) the tests are
skipped, or fail when ``CI=true``.

``redis_url`` (session) is one server for a whole run (each test keeps apart by key namespace). Set ``REDIS_URL`` to
run the same tests against a server of your own instead. ``RedisServer`` starts extra servers (a password, other
persistence settings, a restart under load).

``redis_cluster_url`` (session) is a Redis Cluster of three masters (no replicas) made with ``redis-cli --cluster
create`` on loopback ports; its URL names the first node (the datasource finds the others). ``REDIS_CLUSTER_URL``
names a cluster of your own instead.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from tests.mongodb_server import _unavailable, free_port

__all__ = [
    "RedisServer", "ClusterOfThree", "redis_server_binary", "require_redis_server", "redis_url", "new_redis_url",
    "redis_cluster_url",
]  # fmt: skip

START_TIMEOUT_S = 10.0


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )


def require_redis_server() -> str:
    binary = redis_server_binary()
    if binary is None:
        _unavailable("redis-server not found (run .ci/services.sh: Debian package redis-server, or set REDIS_URL)")
    assert binary is not None
    return binary


class RedisServer:
    """A private redis-server: ``start()``, ``stop()`` (SIGTERM, or SIGKILL with ``kill=True``), ``start()`` again on
    the same port and data directory (its append-only file is read back)."""

    def __init__(
        self,
        *,
        appendfsync: str = "always",
        password: str | None = None,
        port: int | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.binary = require_redis_server()
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="stompgate-redis-")
        self.appendfsync = appendfsync
        self.password = password
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None
        atexit.register(self.cleanup)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = [
            self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir, "--appendonly", "yes",
            "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no", "--protected-mode", "no",
            "--logfile", os.path.join(self.dir, "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}; see {self.dir}/redis.log")
            if self._answers():
                return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {START_TIMEOUT_S} s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
                return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")
        except OSError:
            return False

    def stop(self, *, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def cleanup(self) -> None:
        self.stop(kill=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _port_with_bus() -> int:
    """A free port whose cluster bus port (the port + 10,000) is a port too, and free."""
    while True:
        port = free_port()
        if port + 10_000 > 65_535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port


class ClusterOfThree:
    """Three cluster-enabled redis-servers joined by ``redis-cli --cluster create`` into one cluster of three masters,
    each serving a third of the slots."""

    def __init__(self) -> None:
        cluster = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self.nodes = [RedisServer(port=_port_with_bus(), extra=cluster) for _ in range(3)]
        cli = shutil.which("redis-cli")
        if cli is None:
            _unavailable("redis-cli not found (Debian package redis-tools, a dependency of redis-server)")
        assert cli is not None
        self.cli = cli

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> ClusterOfThree:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(self._state_ok(node) for node in self.nodes):  # every node has learned every slot's owner
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster on {addresses} did not reach cluster_state:ok")
            time.sleep(0.05)
        return self

    def _state_ok(self, node: RedisServer) -> bool:
        info = subprocess.run(
            [self.cli, "-p", str(node.port), "cluster", "info"], capture_output=True, text=True, timeout=10
        ).stdout
        return "cluster_state:ok" in info

    def stop(self) -> None:
        for node in self.nodes:
            node.cleanup()


_shared: RedisServer | None = None
_shared_cluster: ClusterOfThree | None = None


def new_redis_url() -> str:
    global _shared
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    if _shared is None:
        _shared = RedisServer().start()
    return _shared.url


@pytest.fixture(scope="session")
def redis_url() -> str:
    return new_redis_url()


@pytest.fixture(scope="session")
def redis_cluster_url() -> str:
    global _shared_cluster
    if os.environ.get("REDIS_CLUSTER_URL"):
        return os.environ["REDIS_CLUSTER_URL"]
    if _shared_cluster is None:
        _shared_cluster = ClusterOfThree().start()
    return _shared_cluster.url
