"""MongoDB-protocol servers for the tests: ``MONGODB_URL`` when set, else two test servers in turn, a private FerretDB on
PostgreSQL and mongo-java-server with our extension (``tests/mongo_java_server.py``).

``mongodb_url`` (session fixture, one parameter per server) yields a ``mongodb://127.0.0.1:PORT/`` URL. Without FerretDB (or without the
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.mongo_java_server import JavaMongoServer

__all__ = ["FerretDBServer", "PostgresCluster", "ferretdb_binary", "free_port", "SERVER_FIXTURES", "env_mongodb_url", "ferretdb_url", "mongo_java_server_url", "mongodb_servers", "mongodb_url", "require_ferretdb"]

START_TIMEOUT_S = 20.0
HANDLER = os.environ.get("STOMPGATE_FERRETDB_HANDLER", "postgresql")


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


def _unavailable(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def require_ferretdb() -> str:
    binary = ferretdb_binary()
    if binary is None:
        _unavailable("FerretDB not found (run .ci/services.sh, or set MONGODB_URL)")
    assert binary is not None
    if HANDLER == "postgresql" and postgres_bin_dir() is None:
        _unavailable("PostgreSQL binaries not found (run .ci/services.sh: Debian package postgresql, or set MONGODB_URL)")
    return binary


def postgres_bin_dir() -> str | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` with ``initdb`` and ``pg_ctl``, or the ones on PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name or 0)
    )
    if found:
        return str(Path(found[-1]).parent)
    initdb = shutil.which("initdb")
    return str(Path(initdb).parent) if initdb and shutil.which("pg_ctl") else None


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


def start_server_process(
    argv: list[str], log_path: str, port: int, name: str, where_to_look: Callable[[], str]
) -> subprocess.Popen[bytes]:
    """Start a test server whose output goes to ``log_path``, and return once it answers a MongoDB ping on ``port``
    (a RuntimeError naming ``where_to_look()`` if it exits or stays silent for START_TIMEOUT_S)."""
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the child
    try:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:  # a server process gives no event for "listening": ask it
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} at start-up: {where_to_look()}")
        if _ping(port):
            return process
        time.sleep(0.02)
    end_server_process(process, signal.SIGTERM)
    raise RuntimeError(f"{name} did not answer ping on port {port} within {START_TIMEOUT_S}s: {where_to_look()}")


def end_server_process(process: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    """Send ``sig`` (SIGTERM to stop, SIGKILL to crash it) and wait; a process that ignores SIGTERM is killed."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class PostgresCluster:
    """A private PostgreSQL cluster: temp data dir, 127.0.0.1 only, trust auth. For FerretDB and most tests without
    fsync; ``durable`` ones with PostgreSQL's own defaults (fsync, synchronous_commit, full_page_writes), for the
    tests that kill the server and count what survived. ``kill()`` crashes it (SIGKILL to every process of the
    cluster), ``start()`` brings it back on the same port and data."""

    def __init__(self, durable: bool = False) -> None:
        self.durable = durable
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL binaries not found")
        self.bin_dir = bin_dir
        self.base_dir = tempfile.mkdtemp(prefix="stompgate-pg-")
        self.data_dir = os.path.join(self.base_dir, "data")
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0  # initdb/postgres refuse to run as root
        if self._as_postgres:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(self.base_dir, entry.pw_uid, entry.pw_gid)
        self._lock = threading.Lock()
        self.started = False

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        cmd = [os.path.join(self.bin_dir, args[0]), *args[1:]]
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
            user="postgres" if self._as_postgres else None, cwd=self.base_dir,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({result.returncode}): {result.stderr or result.stdout}")

    def start(self) -> None:
        first = not os.path.isdir(self.data_dir)
        if first:
            self._run("initdb", "-D", self.data_dir, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync",
                      "--no-instructions")
        unsafe = "" if self.durable else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        options = (
            f"-k {self.base_dir} -h 127.0.0.1 -p {self.port} {unsafe}-c max_connections=200 -c shared_buffers=64MB"
        )
        self._run("pg_ctl", "-D", self.data_dir, "-l", os.path.join(self.base_dir, "postgres.log"), "-w",
                  "-t", str(int(START_TIMEOUT_S)), "-o", options, "start")
        self.started = True
        if not first:
            return
        # pg_ctl daemonizes the server: if this process dies without running atexit (SIGKILL, a timeout), a small
        # watchdog stops the cluster and removes its directory.
        stop = " ".join(
            [os.path.join(self.bin_dir, "pg_ctl"), "-D", self.data_dir, "-m", "immediate", "-w", "stop"]
        )
        if self._as_postgres:
            stop = f"su postgres -s /bin/sh -c '{stop}'"
        watchdog = (
            f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; "
            f"[ -d {self.data_dir} ] && {{ {stop} >/dev/null 2>&1; rm -rf {self.base_dir}; }}"
        )
        # the outer shell exits at once (nothing left for Python to reap); the loop runs on, detached
        subprocess.run(  # noqa: S602 - fixed command built from our own paths
            ["sh", "-c", f"( {watchdog} ) </dev/null >/dev/null 2>&1 &"],
            start_new_session=True, check=True, timeout=10,
        )

    def new_database(self, prefix: str) -> str:
        """A new empty database; returns its name."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._run("psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                      "-c", f"CREATE DATABASE {name}")
        return name

    def create_database(self) -> str:
        """A new empty database; returns the URL FerretDB's ``--postgresql-url`` takes."""
        name = self.new_database("ferretdb")
        # FerretDB's default pool (50) deadlocks under ~50 concurrent updates (see the backend's _common); the backend
        # stays under it by itself, and several test processes share one server, so give it room
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}?pool_max_conns=150"

    def kill(self) -> None:
        """Crash the server: SIGKILL to the postmaster and every process it started, as a power cut would leave it
        (with fsync on, what was committed is on disk)."""
        with open(os.path.join(self.data_dir, "postmaster.pid")) as pid_file:
            postmaster = int(pid_file.readline())
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == postmaster:
                    children.append(int(entry))
        for pid in [postmaster, *children]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in [postmaster, *children]:  # gone (zombies of an exited parent are reaped by init)
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                try:
                    with open(f"/proc/{pid}/stat") as stat:
                        if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                            break
                except OSError:
                    break
                time.sleep(0.02)
        # The postmaster may linger as a zombie where nothing reaps it (a container's PID 1): its PID still answers,
        # so the restarted server would take it for a live one. After a real crash that PID is gone; so are the lock
        # files naming it.
        for lock in ("data/postmaster.pid", f".s.PGSQL.{self.port}.lock", f".s.PGSQL.{self.port}"):
            try:
                os.unlink(os.path.join(self.base_dir, lock))
            except FileNotFoundError:
                pass
        self.started = False

    def stop(self) -> None:
        if self.started:
            try:
                self._run("pg_ctl", "-D", self.data_dir, "-m", "immediate", "-w", "stop")
            except (RuntimeError, OSError, subprocess.SubprocessError):
                pass
            self.started = False
        shutil.rmtree(self.base_dir, ignore_errors=True)


_cluster: PostgresCluster | None = None
_cluster_lock = threading.Lock()


def shared_postgres() -> PostgresCluster:
    """This process's cluster, started on first use and stopped at exit."""
    global _cluster
    with _cluster_lock:
        if _cluster is None:
            cluster = PostgresCluster()
            try:
                cluster.start()
            except BaseException:
                cluster.stop()
                raise
            atexit.register(cluster.stop)
            _cluster = cluster
        return _cluster


class FerretDBServer:
    """One FerretDB process on loopback, telemetry off, with its own PostgreSQL database in the shared cluster (or
    SQLite files in its own directory). ``stop``/``kill`` and ``start`` again reuse the same port and data."""

    def __init__(
        self, binary: str, data_dir: str | None = None, port: int | None = None, handler: str | None = None
    ) -> None:
        self.binary = binary
        self.handler = handler or HANDLER
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="stompgate-ferretdb-")
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._postgresql_url: str | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def _backend_args(self) -> list[str]:
        if self.handler == "sqlite":
            os.makedirs(os.path.join(self.data_dir, "db"), exist_ok=True)
            return ["--handler=sqlite", f"--sqlite-url=file:{os.path.join(self.data_dir, 'db')}/"]
        if self._postgresql_url is None:
            self._postgresql_url = shared_postgres().create_database()
        return ["--handler=postgresql", f"--postgresql-url={self._postgresql_url}"]

    def start(self) -> None:
        argv = [
            self.binary,
            *self._backend_args(),
            f"--listen-addr=127.0.0.1:{self.port}",
            "--telemetry=disable",
            "--debug-addr=-",
            f"--state-dir={self.data_dir}",
            "--log-level=error",
        ]
        log_path = os.path.join(self.data_dir, "ferretdb.log")
        self.process = start_server_process(argv, log_path, self.port, "FerretDB", lambda: f"see {log_path}")

    def stop(self) -> None:
        end_server_process(self.process, signal.SIGTERM)

    def kill(self) -> None:
        end_server_process(self.process, signal.SIGKILL)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> FerretDBServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def mongodb_servers() -> list[str]:
    """The servers the MongoDB tests run against: the one ``MONGODB_URL`` names, else both test servers. FerretDB
    takes the backend's FerretDB paths (claim tokens, block reads of the log); mongo-java-server with this
    repository's extension (``tests/mongo_java_server/``) takes MongoDB's own (atomic ``find_one_and_update``, a
    tailable awaitData cursor, pipeline updates, capped trimming)."""
    if os.environ.get("MONGODB_URL"):
        return ["env"]
    return ["ferretdb", "mongo-java-server"]


# The session fixture of each server, by the name ``mongodb_servers`` gives it. A test that needs one server asks
# for its fixture; ``mongodb_url`` runs a test once per server (pytest cannot hand out a parametrized fixture through
# ``request.getfixturevalue``, so parametrized tests and helpers look these up instead).
SERVER_FIXTURES = {"env": "env_mongodb_url", "ferretdb": "ferretdb_url", "mongo-java-server": "mongo_java_server_url"}


def _serve(server: FerretDBServer | JavaMongoServer) -> Iterator[str]:
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        server.cleanup()
        _unavailable(str(exc))
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def env_mongodb_url() -> str:
    url = os.environ.get("MONGODB_URL")
    if not url:
        pytest.skip("MONGODB_URL is not set")
    return url


@pytest.fixture(scope="session")
def ferretdb_url() -> Iterator[str]:
    yield from _serve(FerretDBServer(require_ferretdb()))


@pytest.fixture(scope="session")
def mongo_java_server_url() -> Iterator[str]:
    from tests.mongo_java_server import JavaMongoServer, require_java_server  # it imports this module's helpers

    require_java_server()
    yield from _serve(JavaMongoServer())


@pytest.fixture(scope="session", params=mongodb_servers())
def mongodb_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(SERVER_FIXTURES[request.param])
    return url
