"""``stompgate serve`` refuses bad set-ups with one clear sentence and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.gateway_process import free_port


def serve(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "serve", *args],
        capture_output=True, text=True, timeout=30, cwd=cwd, env={**os.environ, **(env or {})},
    )  # fmt: skip


def assert_clear_failure(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    for phrase in phrases:
        assert phrase in result.stderr


def test_bad_store_url(tmp_path: Path) -> None:
    result = serve("--store", "oracle://db", "--stomp-port", str(free_port()), "--http-port", str(free_port()), cwd=tmp_path)
    assert_clear_failure(result, "oracle://db", "sqlite://")


def test_a_store_url_that_is_not_a_url_is_one_sentence_without_its_password(tmp_path: Path) -> None:
    for url in ("mongodb://user:secret@[::1/db", "nosuch://user:secret@host/db"):
        result = serve("--store", url, cwd=tmp_path)
        assert_clear_failure(result, "the store URL")
        assert "secret" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve("--stomp-port", str(port), "--http-port", str(free_port()), cwd=tmp_path)
    assert_clear_failure(result, f"127.0.0.1:{port}", "already in use")


def test_unusable_data_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data directory should be")
    result = serve(
        "--store", f"sqlite:///{blocker}/sub/db.sqlite", "--stomp-port", str(free_port()), "--http-port", str(free_port()),
        cwd=tmp_path,
    )  # fmt: skip
    assert_clear_failure(result, "data directory")


def test_a_file_that_is_not_a_sqlite_database(tmp_path: Path) -> None:
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("plain text where a SQLite database should be, long enough to fill a header page " * 4)
    result = serve(
        "--store", f"sqlite:///{not_a_database}", "--stomp-port", str(free_port()), "--http-port", str(free_port()),
        cwd=tmp_path,
    )  # fmt: skip
    assert_clear_failure(result, str(not_a_database), "not a SQLite database")
    assert "writable" not in result.stderr  # the cause, not a guess
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_unreachable_mongodb(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    result = serve(
        "--store", f"mongodb://127.0.0.1:{closed}/x?serverSelectionTimeoutMS=300", "--stomp-port", str(free_port()),
        "--http-port", str(free_port()), cwd=tmp_path,
    )  # fmt: skip
    assert_clear_failure(result, "MongoDB unreachable", f"127.0.0.1:{closed}")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_invalid_setting_value(tmp_path: Path) -> None:
    result = serve("--stomp-port", "70000", cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr


def test_environment_variables_configure_the_gateway(tmp_path: Path) -> None:
    """With no flags at all, STOMPGATE_... variables choose the ports and the store."""
    stomp_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "STOMPGATE_STORE": f"sqlite:///{tmp_path}/from-env.db",
        "STOMPGATE_STOMP_PORT": str(stomp_port),
        "STOMPGATE_HTTP_PORT": str(http_port),
    }
    process = subprocess.Popen(
        [sys.executable, "-c", "from app.cli import main; main()", "serve"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", stomp_port), timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the gateway did not listen on the port from the environment"
                time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{http_port}/health").status_code == 200
        assert (tmp_path / "from-env.db").exists()
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_settings_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    from app.settings import load_settings

    config = tmp_path / "stompgate.toml"
    config.write_text('[stompgate]\nmax_deliveries = 7\nheartbeat_ms = 1234\nlogin_timeout = 3.0\n')
    os.environ["STOMPGATE_HEARTBEAT_MS"] = "2222"
    try:
        settings = load_settings(config, login_timeout=9.0)
    finally:
        del os.environ["STOMPGATE_HEARTBEAT_MS"]
    assert settings.max_deliveries == 7  # from the file
    assert settings.heartbeat_ms == 2222  # the environment beats the file
    assert settings.login_timeout == 9.0  # a flag beats both


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    import json

    from tests.gateway_process import start_gateway

    gw = start_gateway(tmp_path, "memory://", ["--log-format", "json", "--log-level", "info"])
    gw.stop()
    lines = [line for line in gw.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert any("STOMP over TCP" in r["message"] for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert not any("color_message" in r for r in records)  # uvicorn's copy of the message with ANSI colours
    assert "\x1b[" not in gw.log()


def test_an_unknown_log_level_names_the_ones_there_are(tmp_path: Path) -> None:
    result = serve("--log-level", "bogus", cwd=tmp_path)
    assert_clear_failure(result, "log_level", "'debug', 'info', 'warning' or 'error'")
    assert "pattern" not in result.stderr


def hash_passcode(secret: bytes) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "hash-passcode", "--rounds", "4"],
        input=secret, capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def test_hash_passcode_refuses_a_secret_longer_than_bcrypt_takes() -> None:
    """bcrypt reads at most 72 bytes: a longer secret gets one line on stderr, never a traceback."""
    result = hash_passcode("é".encode() * 37 + b"\n")  # 74 bytes in UTF-8, 37 characters
    assert_clear_failure(result, "72 bytes")
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1


def test_hash_passcode_hashes_a_secret_of_72_bytes() -> None:
    import bcrypt

    secret = b"s" * 72
    result = hash_passcode(secret + b"\n")
    assert result.returncode == 0, result.stderr
    assert bcrypt.checkpw(secret, result.stdout.strip().encode())


def test_hash_passcode_refuses_bytes_that_are_not_utf8() -> None:
    result = hash_passcode(b"\xff\xfeabc\n")
    assert_clear_failure(result, "UTF-8")
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_at_80_columns_shows_every_flag_and_variable_whole(tmp_path: Path) -> None:
    from app.settings import Settings

    result = subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "serve", "--help"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path, env={**os.environ, "COLUMNS": "80", "TERM": "dumb"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in text, name
        assert f"STOMPGATE_{name.upper()}" in text, name



def test_the_server_freezes_what_start_up_made_and_collects_the_young_generation_less_often(tmp_path: Path) -> None:
    # ``serve`` up to the point where uvicorn would run, which reports the collector's settings instead; in a process
    # of its own, since frozen objects are never collected, which a test process must not do to itself
    probe = (
        "import gc, uvicorn; from app.cli import main; "
        "uvicorn.Server.run = lambda self: print(gc.get_freeze_count() > 10_000, gc.get_threshold()[0]); main()"
    )
    args = ["serve", "--store", "memory://", "--stomp-port", str(free_port()), "--http-port", str(free_port())]
    result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.stdout.split()[:2] == ["True", "10000"], result.stdout + result.stderr


FAULTS = """
import os, resource, sys
from app.cli import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
data = os.urandom(1 << 20)
for _ in range(5):
    x = bytearray(data); y = bytes(x); del x, y
before = faults()
for _ in range(100):
    x = bytearray(data)  # a 1 MiB body copied into fresh buffers, as a parser and a file read do
    y = bytes(x)
    del x, y
print((faults() - before) / 100)
"""


def test_tune_malloc_lets_freed_large_buffers_be_reused_without_page_faults() -> None:
    """``serve`` calls tune_malloc: on glibc a freed 1 MiB buffer was unmapped (or trimmed) and the next one faulted
    in 256 fresh pages; tuned, the allocator reuses it."""
    def faults_per_round(mode: str) -> float:
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": str(root)}
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=60, cwd=root, env=env)
        assert out.returncode == 0, out.stderr
        return float(out.stdout)

    tuned, default = faults_per_round("tuned"), faults_per_round("default")
    assert tuned < 5, f"{tuned} page faults per 1 MiB round with tune_malloc (glibc's default: {default})"
