"""``stompgate bench --compare NAME=HOST:PORT[,option...]``: the same workload against the gateway and other STOMP
brokers, in alternating runs (gateway, each other broker, gateway, ...), so that a slow minute of a shared machine
falls on all of them alike. Prints one table (median and every run) and, with ``--chart PATH.png``, draws it with
matplotlib (``pip install 'stompgate[bench]'``).

A target is ``NAME=HOST:PORT`` followed by comma-separated options:

* ``login=USER``, ``passcode=SECRET`` - the CONNECT credentials (RabbitMQ: guest/guest);
* ``header=KEY:VALUE`` (repeatable) - an extra SUBSCRIBE header, e.g. Artemis's ``consumer-window-size:-1``;
* ``pid=N`` - the broker's process, whose CPU seconds per message the table then reports.

Every run uses a fresh destination (unless ``--destination`` names one), so no run drains another's leftovers.
"""

from __future__ import annotations

import re
import statistics
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from app.bench.spawn import read_cpu_seconds
from app.bench.workload import BenchConfig, run_workload, summarize

__all__ = ["Target", "parse_target", "run_compare", "format_table", "write_chart", "ChartUnavailable"]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_HEADER_KEY = re.compile(r"[A-Za-z0-9_.-]{1,100}")
MAX_HEADERS = 20


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int
    login: str | None = None
    passcode: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    pids: tuple[int, ...] = field(default=())


def parse_target(spec: str) -> Target:
    """``NAME=HOST:PORT[,login=..][,passcode=..][,header=KEY:VALUE]...[,pid=N]``; ValueError with one sentence."""
    name, sep, rest = spec.partition("=")
    if not sep or not _NAME.fullmatch(name):
        raise ValueError(f"--compare {_show(spec)}: expected NAME=HOST:PORT (NAME of letters, digits, '.', '_', '-')")
    where, *options = rest.split(",")
    host, colon, port_text = where.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not _is_number(port_text, 5) or not 0 < int(port_text) < 65536:
        raise ValueError(f"--compare {name}: expected HOST:PORT after '{name}=', not {_show(where)}")
    login: str | None = None
    passcode: str | None = None
    headers: list[tuple[str, str]] = []
    pids: list[int] = []
    for option in options:
        key, eq, value = option.partition("=")
        if not eq:
            raise ValueError(f"--compare {name}: expected KEY=VALUE, not {_show(option)}")
        if key == "login":
            login = value
        elif key == "passcode":
            passcode = value
        elif key == "header":
            header, colon, header_value = value.partition(":")
            if not colon or not _HEADER_KEY.fullmatch(header) or any(c in header_value for c in "\r\n\0"):
                raise ValueError(f"--compare {name}: expected header=KEY:VALUE, not {_show(value)}")
            headers.append((header, header_value))
            if len(headers) > MAX_HEADERS:
                raise ValueError(f"--compare {name}: at most {MAX_HEADERS} headers")
        elif key == "pid":
            if not _is_number(value, 7) or not 0 < int(value) < 2**22:
                raise ValueError(f"--compare {name}: pid must be a process id, not {_show(value)}")
            pids.append(int(value))
        else:
            raise ValueError(f"--compare {name}: unknown option {_show(key)} (login, passcode, header, pid)")
    for text in (login, passcode):
        if text is not None and any(c in text for c in "\r\n\0"):
            raise ValueError(f"--compare {name}: login and passcode may not hold line breaks or NUL")
    return Target(name, host, int(port_text), login, passcode, tuple(headers), tuple(pids))


def _is_number(text: str, digits: int) -> bool:
    """ASCII digits, at most ``digits`` of them: str.isdigit() alone lets through '²', which int() refuses, and
    numbers too long for int() to convert."""
    return 0 < len(text) <= digits and text.isascii() and text.isdigit()


def _show(text: str) -> str:
    """A user's text in an error: quoted, and short."""
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _cpu(pids: Sequence[int]) -> float | None:
    values = [read_cpu_seconds(p) for p in pids]
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


def run_compare(
    base: BenchConfig,
    targets: Sequence[Target],
    *,
    rounds: int,
    fresh_destination: Callable[[], str] | None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run ``base`` against every target, round after round in the targets' order; returns the runs by target."""
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for round_no in range(1, rounds + 1):
        for target in targets:
            cfg = replace(
                base, host=target.host, port=target.port, login=target.login, passcode=target.passcode,
                subscribe_headers=target.headers, extra_endpoints=(),
                destination=fresh_destination() if fresh_destination is not None else base.destination,
            )  # fmt: skip
            before = _cpu(target.pids)
            summary = summarize(cfg, run_workload(cfg))
            after = _cpu(target.pids)
            if before is not None and after is not None and summary["sent"]:
                summary["server_cpu_us_per_msg"] = round((after - before) / summary["sent"] * 1e6, 1)
            runs[target.name].append(summary)
            progress(f"round {round_no}/{rounds} {target.name}: {_rate(base, summary):,.0f} {_unit(base)}")
    return {
        "mode": "compare",
        "kind": base.kind,
        "workload": describe(base),
        "rounds": rounds,
        "targets": [
            {"name": t.name, "host": t.host, "port": t.port, "subscribe_headers": dict(t.headers)} for t in targets
        ],
        "runs": runs,
        "ok": all(r["ok"] for rs in runs.values() for r in rs),
    }


def describe(cfg: BenchConfig) -> str:
    amount = f"{cfg.messages:,} messages" if cfg.messages is not None else f"{cfg.duration} s"
    return (
        f"{cfg.kind}, {cfg.producers} producers / {cfg.consumers} consumers, {cfg.body_size:,} B bodies, "
        f"receipts {'on' if cfg.receipts else 'off'}, ack {cfg.ack}{', persistent' if cfg.persistent else ''}, {amount}"
    )


def _unit(cfg: BenchConfig) -> str:
    return "deliveries/s" if cfg.kind == "topic" else "msgs/s"


def _rate(cfg: BenchConfig, summary: dict[str, Any]) -> float:
    value = summary["deliveries_per_s"] if cfg.kind == "topic" else summary["msgs_per_s"]
    return float(value or 0.0)


def _rates(result: dict[str, Any], name: str) -> list[float]:
    key = "deliveries_per_s" if result["kind"] == "topic" else "msgs_per_s"
    return [float(r[key] or 0.0) for r in result["runs"][name]]


def format_table(result: dict[str, Any]) -> str:
    unit = "deliveries/s" if result["kind"] == "topic" else "msgs/s"
    lines = [
        f"{result['workload']}; {result['rounds']} alternating rounds",
        f"| target | median {unit} | runs | p99 latency ms (median) | server CPU us/msg (median) | lost | duplicated |",
        "|---|---|---|---|---|---|---|",
    ]
    for target in result["targets"]:
        name = target["name"]
        runs = result["runs"][name]
        rates = _rates(result, name)
        p99s = [r["latency_ms"]["p99"] for r in runs if r["latency_ms"]["p99"] is not None]
        cpus = [r["server_cpu_us_per_msg"] for r in runs if r.get("server_cpu_us_per_msg") is not None]
        lines.append(
            f"| {name} | {statistics.median(rates):,.0f} | {' / '.join(f'{v:,.0f}' for v in rates)} | "
            f"{_median_text(p99s)} | {_median_text(cpus)} | {sum(r['lost'] for r in runs):,} | "
            f"{sum(r['duplicated'] for r in runs):,} |"
        )
    for target in result["targets"]:  # a run that failed says why, under the table
        for number, run in enumerate(result["runs"][target["name"]], 1):
            if run["errors"]:
                lines.append(f"{target['name']}, run {number}: {run['errors'][0]}")
    return "\n".join(lines)


def _median_text(values: Sequence[float]) -> str:
    return f"{statistics.median(values):,.1f}" if values else "-"


class ChartUnavailable(RuntimeError):
    """matplotlib is not installed."""


def write_chart(result: dict[str, Any], path: Path, title: str | None = None) -> None:
    """A bar per target at its median rate, every run as a dot on it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write files only
        import matplotlib.pyplot as plt
    except ImportError:
        raise ChartUnavailable("--chart needs matplotlib: pip install 'stompgate[bench]'") from None
    unit = "deliveries/s" if result["kind"] == "topic" else "msgs/s"
    names = [t["name"] for t in result["targets"]]
    medians = [statistics.median(_rates(result, n)) for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    try:
        bars = ax.bar(names, medians, color=["#2b6cb0" if i == 0 else "#a0aec0" for i in range(len(names))])
        for i, name in enumerate(names):
            rates = _rates(result, name)
            ax.scatter([i] * len(rates), rates, color="#1a202c", s=14, zorder=3)
        ax.bar_label(bars, labels=[f"{m:,.0f}" for m in medians], padding=3)
        ax.set_ylabel(f"{unit} (bar: median; dots: runs)")
        ax.set_title("\n".join(textwrap.wrap(title or result["workload"], 90)), fontsize=9)
        ax.set_ylim(0, max([*medians, *(max(_rates(result, n)) for n in names)]) * 1.15 or 1)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
