"""``stompgate bench`` end to end: it spawns a gateway, runs a small workload and reports 0 lost, 0 duplicated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


def run_bench(cwd: Path, *args: str) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--json", "--drain-timeout", "5", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )  # fmt: skip
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("kind", "ack"), [("queue", "client-individual"), ("topic", "auto")], ids=["queue-client-individual", "topic-auto"]
)
def test_memory_store(tmp_path: Path, kind: str, ack: str) -> None:
    code, report = run_bench(
        tmp_path, "--spawn", "memory://", "--destination-kind", kind, "--ack", ack, "--messages", "2000"
    )
    assert report["errors"] == []
    assert report["sent"] == report["receipted"] == 2000
    assert report["lost"] == 0
    assert report["duplicated"] == 0
    assert report["delivered"] == 2000
    assert report["deliveries"] == report["expected_deliveries"] == (2000 if kind == "queue" else 4000)
    assert report["latency_ms"]["samples"] == report["deliveries"]
    assert report["gateway_clean_exit"] is True
    assert code == 0


def test_sqlite_store_two_processes_client_ack_persistent(tmp_path: Path) -> None:
    code, report = run_bench(
        tmp_path, "--spawn", f"sqlite:///{tmp_path}/bench.db", "--ack", "client", "--messages", "2000",
        "--processes", "2", "--producers", "2", "--consumers", "2", "--persistent",
    )  # fmt: skip
    assert report["errors"] == []
    assert report["config"]["persistent"] is True
    assert (report["sent"], report["delivered"], report["lost"], report["duplicated"]) == (2000, 2000, 0, 0)
    assert code == 0


def test_no_receipts_topic_version_1_0(tmp_path: Path) -> None:
    code, report = run_bench(
        tmp_path, "--spawn", "memory://", "--destination-kind", "topic", "--no-receipts", "--version", "1.0",
        "--messages", "1000", "--consumers", "3",
    )  # fmt: skip
    assert report["receipted"] is None
    assert (report["sent"], report["deliveries"], report["lost"], report["duplicated"]) == (1000, 3000, 0, 0)
    assert code == 0


def test_idle_connections_report_rss(tmp_path: Path) -> None:
    code, report = run_bench(tmp_path, "--spawn", "memory://", "--idle-connections", "50", "--hold", "0.2")
    assert report["connected"] == report["alive_at_end"] == 50
    assert report["rss_held_kb"] > 0
    assert code == 0


def test_nothing_listening_is_an_error(tmp_path: Path) -> None:
    from app.bench.spawn import free_port

    code, report = run_bench(tmp_path, "--port", str(free_port()), "--messages", "10", "--connect-timeout", "1")
    assert report["errors"]
    assert code == 1


@pytest.mark.parametrize("mode", [["--messages", "100"], ["--idle-connections", "8", "--hold", "0.2"]], ids=["workload", "idle"])
def test_a_gateway_that_refuses_connections_is_reported_without_tracebacks(tmp_path: Path, mode: list[str]) -> None:
    # The gateway answers the connections past its limit with an ERROR frame before any CONNECT is sent.
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--json", "--drain-timeout", "5", "--spawn", "memory://",
         "--spawn-arg=--max-connections", "--spawn-arg=2", "--producers", "2", "--consumers", "2", *mode],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "max_connections" in json.dumps(report)
    assert "never retrieved" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "Cannot send CONNECT" not in json.dumps(report)
    assert proc.returncode == 1


# -- --compare ------------------------------------------------------------------------------------------------------


def test_compare_alternates_runs_sends_the_targets_headers_and_draws_a_chart(tmp_path: Path) -> None:
    """The other broker is a second gateway. Its SUBSCRIBEs carry a selector no message matches (header=), so its
    runs deliver nothing: that shows the target's headers reached it, and that a failed run makes the exit code 1."""
    from app.bench.spawn import spawn_gateway

    other = spawn_gateway("memory://")
    try:
        chart = tmp_path / "compare.png"
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", "bench", "--json", "--drain-timeout", "1", "--spawn", "memory://",
             "--messages", "200", "--ack", "client-individual", "--rounds", "2", "--chart", str(chart),
             "--compare", f"other=127.0.0.1:{other.stomp_port},header=selector:n = 'no such',pid={other.pid}",
             "--compare", f"twin=127.0.0.1:{other.stomp_port}"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
    finally:
        other.stop()
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [t["name"] for t in report["targets"]] == ["stompgate", "other", "twin"]
    assert report["targets"][1]["subscribe_headers"] == {"selector": "n = 'no such'"}
    for name, lost in (("stompgate", 0), ("other", 200), ("twin", 0)):
        runs = report["runs"][name]
        assert len(runs) == 2
        assert [r["lost"] for r in runs] == [lost, lost], name
        assert len({r["config"]["destination"] for r in runs}) == 2  # a fresh destination each run
    assert all(r.get("server_cpu_us_per_msg") is not None for r in report["runs"]["other"])  # from pid=
    assert proc.returncode == 1  # the selector's runs lost every message
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5_000


def test_compare_prints_one_table(tmp_path: Path) -> None:
    from app.bench.spawn import spawn_gateway

    other = spawn_gateway("memory://")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", "bench", "--spawn", "memory://", "--messages", "200", "--rounds", "1",
             "--destination-kind", "topic", "--compare", f"peer=127.0.0.1:{other.stomp_port}"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )  # fmt: skip
    finally:
        other.stop()
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| target | median deliveries/s |")
    assert [row.split("|")[1].strip() for row in table[1:]] == ["stompgate", "peer"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compare", "rabbit"], "expected NAME=HOST:PORT"),
        (["--compare", "rabbit=localhost"], "expected HOST:PORT after 'rabbit='"),
        (["--compare", "rabbit=localhost:99999"], "expected HOST:PORT"),
        (["--compare", "rabbit=localhost:61613,colour=blue"], "unknown option 'colour'"),
        (["--compare", "rabbit=localhost:61613,header=novalue"], "expected header=KEY:VALUE"),
        (["--compare", "rabbit=localhost:61613,pid=x"], "pid must be a process id"),
        # str.isdigit() holds for '²' (int() refuses it) and for 5,000 digits (past int()'s 4,300): each was int()'s
        # own message, naming neither the option nor the value
        (["--compare", "rabbit=localhost:\u00b2"], "expected HOST:PORT after 'rabbit='"),
        (["--compare", "rabbit=localhost:61613,pid=\u00b2"], "pid must be a process id"),
        (["--compare", "rabbit=localhost:61613,pid=" + "9" * 5000], "pid must be a process id"),
        (["--compare", "rabbit=localhost:" + "9" * 5000], "expected HOST:PORT after 'rabbit='"),
        (["--compare", "stompgate=localhost:61613"], "must differ"),
        (["--compare", "a=localhost:1", "--compare", "a=localhost:2"], "must differ"),
        (["--chart", "x.png"], "--chart needs --compare"),
        (["--compare", "a=localhost:1", "--chart", "x.svg"], "name it *.png"),
        (["--compare", "a=localhost:1", "--idle-connections", "3"], "not with --idle-connections"),
    ],
)
def test_bad_compare_arguments_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--port", "1", *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.parametrize("kind", ["queue", "topic"])
def test_over_websocket(tmp_path: Path, kind: str) -> None:
    """--transport websocket: the same workload as STOMP over WebSocket on the gateway's HTTP port."""
    code, report = run_bench(
        tmp_path, "--spawn", "memory://", "--transport", "websocket", "--destination-kind", kind, "--messages", "2000",
        "--ack", "client-individual",
    )  # fmt: skip
    assert report["errors"] == []
    assert (report["sent"], report["lost"], report["duplicated"]) == (2000, 0, 0)
    assert report["deliveries"] == (2000 if kind == "queue" else 4000)
    assert code == 0


def test_idle_websocket_connections(tmp_path: Path) -> None:
    code, report = run_bench(
        tmp_path, "--spawn", "memory://", "--transport", "websocket", "--idle-connections", "50", "--hold", "0.2"
    )
    assert report["connected"] == report["alive_at_end"] == 50
    assert code == 0


def test_rate_paces_the_producers(tmp_path: Path) -> None:
    code, report = run_bench(tmp_path, "--spawn", "memory://", "--messages", "200", "--rate", "400", "--producers", "2")
    assert (report["sent"], report["lost"]) == (200, 0)
    assert report["send_per_s"] <= 440  # the schedule spaces the sends; without --rate this workload sends >10,000/s
    assert code == 0
