"""mongo-java-server with this repository's extension: a second MongoDB-protocol server for the tests, one that takes
the backend's real-MongoDB code paths (it is not FerretDB).

mongo-java-server 1.47.0 (in memory, BSD licence) plus ``tests/mongo_java_server/`` (Java: capped collections,
tailable awaitData cursors, ``hello`` with wire version 17, pipeline updates, copies taken under the collection lock,
commands off the network thread; its main class's header says what it does not emulate: transactions, sessions,
replica sets, write concern, authentication, ...). ``.ci/services.sh`` builds it into
``${XDG_CACHE_HOME:-~/.cache}/stompgate/mongo-java-server/<hash of the sources and pom.xml>/``: the jar plus
``lib/`` (its dependencies). Without that build, or without ``java``, ``require_java_server`` skips the test, or fails
it when ``CI=true``.

``JavaMongoServer`` runs one server process on 127.0.0.1. Its data lives in the process's memory only: ``kill`` or
``stop`` loses it, and ``start`` again (same port) begins with an empty server. Start-up to the first answered ping:
0.6-1.2 s measured here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Self

from tests.mongodb_server import _unavailable, end_server_process, free_port, start_server_process

__all__ = ["JavaMongoServer", "java_server_jar", "require_java_server"]

SOURCE_DIR = Path(__file__).resolve().parent / "mongo_java_server"
JAR_NAME = "stompgate-mongo-test-server.jar"
# small heap and the serial collector: a test server on a 2-core machine, started many times
JVM_OPTIONS = ["-XX:+UseSerialGC", "-Xms64m"]


def cache_dir() -> Path:
    """Where ``.ci/services.sh`` puts the builds, one directory per source hash."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stompgate" / "mongo-java-server"


def _source_hash() -> str:
    """``cd tests/mongo_java_server && find . -type f \\( -name pom.xml -o -name '*.java' \\) | LC_ALL=C sort | xargs
    sha256sum | sha256sum | cut -c1-16``, as ``.ci/services.sh`` computes it."""
    paths: list[str] = []
    for root, _dirs, files in os.walk(SOURCE_DIR):
        for name in files:
            if name == "pom.xml" or name.endswith(".java"):
                paths.append("./" + Path(root, name).relative_to(SOURCE_DIR).as_posix())
    listing = "".join(
        f"{hashlib.sha256((SOURCE_DIR / path).read_bytes()).hexdigest()}  {path}\n"
        for path in sorted(paths, key=lambda p: p.encode())
    )
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def java_server_jar() -> str | None:
    """The jar built for the current sources (its manifest names the main class and ``lib/*.jar``), or None."""
    jar = cache_dir() / _source_hash() / JAR_NAME
    return str(jar) if jar.is_file() else None


def require_java_server() -> str:
    jar = java_server_jar()
    if jar is None:
        _unavailable("mongo-java-server test server not built for the current sources (run .ci/services.sh, or set "
                     "MONGODB_URL)")
    if shutil.which("java") is None:
        _unavailable("java not found (Debian package openjdk-17-jre-headless; or set MONGODB_URL)")
    assert jar is not None
    return jar


class JavaMongoServer:
    """One mongo-java-server process listening on 127.0.0.1:``port`` (a free one by default). In memory: ``stop`` or
    ``kill`` and ``start`` again gives an empty server on the same port. Its output goes to ``log_path``."""

    def __init__(self, port: int | None = None, jar: str | None = None) -> None:
        self.jar = jar or require_java_server()
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="stompgate-mongo-java-")
        self.log_path = os.path.join(self._dir, "server.log")

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    def _output(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                return log.read()[-4000:].decode(errors="replace").strip()
        except OSError:
            return ""

    def start(self) -> None:
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("java not found")
        argv = [java, *JVM_OPTIONS, "-jar", self.jar, "127.0.0.1", str(self.port)]
        self.process = start_server_process(argv, self.log_path, self.port, "mongo-java-server", self._output)

    def stop(self) -> None:
        end_server_process(self.process, signal.SIGTERM)

    def kill(self) -> None:
        end_server_process(self.process, signal.SIGKILL)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
