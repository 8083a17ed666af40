"""``stompgate bench``: the load generator.

It speaks STOMP through our own sans-I/O core (:mod:`stomp_core`) over asyncio Protocols (uvloop when available),
against a running gateway (``--host/--port``), a gateway it spawns (``--spawn STORE_URL``) or any STOMP broker
(RabbitMQ's STOMP plugin: ``--login guest --passcode guest``). See docs/benchmarks.md for the numbers.
"""

from __future__ import annotations

import json
import signal
import uuid
from enum import Enum
from typing import Any, Optional

import typer

__all__ = ["bench"]


class Kind(str, Enum):
    queue = "queue"
    topic = "topic"


class AckMode(str, Enum):
    auto = "auto"
    client = "client"
    client_individual = "client-individual"


class Version(str, Enum):
    v10 = "1.0"
    v11 = "1.1"
    v12 = "1.2"


class LoopKind(str, Enum):
    auto = "auto"
    uvloop = "uvloop"
    asyncio = "asyncio"


def _destination(kind: str, name: str | None) -> str:
    if name is None:
        name = f"bench-{uuid.uuid4().hex[:12]}"
    return name if name.startswith("/") else f"/{kind}/{name}"


def _own_cpu() -> float:
    """CPU seconds of this process and its reaped children (the --processes workers)."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}" if value >= 100 else f"{value:,.3f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def _print_text(summary: dict[str, Any]) -> None:
    if summary.get("mode") == "idle-connections":
        typer.echo(f"idle connections  {summary['connected']:,} of {summary['requested']:,} CONNECTed "
                   f"in {summary['connect_seconds']:.1f} s, {summary['alive_at_end']:,} alive after {summary['hold_seconds']} s")  # fmt: skip
        typer.echo(f"server pid        {_fmt(summary['pid'])}")
        typer.echo(f"RSS before        {_fmt(summary['rss_before_kb'], ' KiB')}")
        typer.echo(f"RSS held          {_fmt(summary['rss_held_kb'], ' KiB')} ({_fmt(summary['rss_held_mib'], ' MiB')})")
        typer.echo(f"RSS/connection    {_fmt(summary['rss_per_connection_kb'], ' KiB')}")
        for failure in summary["failures"]:
            typer.echo(f"failure           {failure}")
        return
    cfg = summary["config"]
    lat = summary["latency_ms"]
    typer.echo(
        f"{cfg['kind']} {cfg['destination']} on {cfg['host']}:{cfg['port']}: {cfg['producers']} producers, "
        f"{cfg['consumers']} consumers, {cfg['body_size']} B bodies, receipts {'on' if cfg['receipts'] else 'off'}, "
        f"ack {cfg['ack']}, STOMP {cfg['version']}, {cfg['processes']} process(es)"
    )
    typer.echo(f"sent              {_fmt(summary['sent'])}")
    typer.echo(f"receipted         {_fmt(summary['receipted'])}")
    typer.echo(f"delivered         {_fmt(summary['delivered'])} messages, {_fmt(summary['deliveries'])} deliveries "
               f"(expected {_fmt(summary['expected_deliveries'])})")  # fmt: skip
    typer.echo(f"elapsed           {_fmt(summary['seconds'], ' s')} (first send to last delivery)")
    typer.echo(f"msgs/s            {_fmt(summary['msgs_per_s'])}")
    if cfg["kind"] == "topic":
        typer.echo(f"deliveries/s      {_fmt(summary['deliveries_per_s'])}")
    typer.echo(f"send/s            {_fmt(summary['send_per_s'])}")
    typer.echo(f"latency ms        p50 {_fmt(lat['p50'])}  p99 {_fmt(lat['p99'])}  max {_fmt(lat['max'])}")
    if "server_cpu_s" in summary:
        typer.echo(f"server CPU        {_fmt(summary['server_cpu_s'], ' s')} (pid {summary['server_pid']}), "
                   f"{_fmt(summary.get('server_cpu_us_per_msg'), ' us')} per message sent")  # fmt: skip
    typer.echo(f"bench CPU         {_fmt(summary['bench_cpu_s'], ' s')}")
    typer.echo(f"LOST              {summary['lost']:,}")
    typer.echo(f"DUPLICATED        {summary['duplicated']:,}")
    if summary["drain_timed_out"]:
        typer.echo("note              the drain timeout expired before every expected delivery arrived")
    if summary.get("gateway_clean_exit") is False:
        typer.echo(f"note              the spawned gateway exited with {summary['gateway_exit_code']}")
    for error in summary["errors"][:10]:
        typer.echo(f"error             {error}")


def bench(
    host: str = typer.Option("127.0.0.1", "--host", help="Address of the STOMP server to load (ignored with --spawn)."),
    port: int = typer.Option(61613, "--port", help="STOMP TCP port of the server (ignored with --spawn)."),
    spawn: Optional[str] = typer.Option(
        None, "--spawn", metavar="STORE_URL",
        help="Start a gateway subprocess on free ports with this store (e.g. sqlite:///./data/bench.db or memory://), "
        "run against it and stop it (SIGTERM) afterwards.",
    ),  # fmt: skip
    spawn_arg: list[str] = typer.Option(
        [], "--spawn-arg", help="Extra argument for the spawned 'stompgate serve' (repeatable), e.g. --spawn-arg=--sqlite-synchronous=NORMAL."
    ),
    kind: Kind = typer.Option(Kind.queue, "--destination-kind", help="Load a queue (each message to one consumer) or a topic (to every subscriber)."),
    destination: Optional[str] = typer.Option(
        None, "--destination", help="Destination name (NAME, or a full /queue/NAME or /topic/NAME); default a fresh unique name per run."
    ),
    producers: int = typer.Option(2, "--producers", min=0, help="Producer connections."),
    consumers: int = typer.Option(2, "--consumers", min=0, help="Consumer connections (one subscription each)."),
    messages: int = typer.Option(100_000, "--messages", min=1, help="Messages to send in total, split over the producers."),
    duration: Optional[float] = typer.Option(None, "--duration", min=0.1, help="Send for this many seconds instead of a fixed --messages count."),
    body_size: int = typer.Option(256, "--body-size", min=16, help="Body size in bytes (producer id and sequence number, padded)."),
    receipts: bool = typer.Option(True, "--receipts/--no-receipts", help="Ask for a RECEIPT on every SEND (producers pipeline up to --window unreceipted SENDs)."),
    window: int = typer.Option(500, "--window", min=1, help="Most SENDs a producer has waiting for their RECEIPT."),
    ack: AckMode = typer.Option(AckMode.auto, "--ack", help="Subscription ack mode (client-individual ACKs every message; client ACKs the last of each read)."),
    prefetch: Optional[int] = typer.Option(None, "--prefetch", min=1, help="Sent as the SUBSCRIBE header prefetch-count (default: the server's)."),
    version: Version = typer.Option(Version.v12, "--version", help="STOMP version to ask for (accept-version)."),
    vhost: str = typer.Option("/", "--vhost", help="The CONNECT host header (RabbitMQ: a virtual host, '/')."),
    login: Optional[str] = typer.Option(None, "--login", help="CONNECT login (e.g. guest for RabbitMQ)."),
    passcode: Optional[str] = typer.Option(None, "--passcode", help="CONNECT passcode (e.g. guest for RabbitMQ)."),
    processes: int = typer.Option(1, "--processes", min=1, help="Spread the clients over this many OS processes (round-robin)."),
    drain_timeout: float = typer.Option(10.0, "--drain-timeout", min=0.1, help="Seconds without progress after which missing receipts and deliveries count as lost."),
    connect_timeout: float = typer.Option(10.0, "--connect-timeout", min=0.1, help="Seconds to connect, CONNECT and SUBSCRIBE."),
    idle_connections: Optional[int] = typer.Option(
        None, "--idle-connections", min=1,
        help="Instead of a workload, open this many CONNECTed connections, hold them and report the server's RSS.",
    ),  # fmt: skip
    hold: float = typer.Option(5.0, "--hold", min=0.0, help="Seconds to hold the idle connections while sampling RSS."),
    pid: Optional[int] = typer.Option(None, "--pid", help="PID of the server whose RSS --idle-connections reports (known with --spawn)."),
    loop: LoopKind = typer.Option(LoopKind.auto, "--loop", help="Event loop: uvloop when installed (auto), or force one."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Load-generate against a gateway and report msgs/s, latency, lost and duplicated messages.

    Exit code 0 when nothing was lost or duplicated (idle mode: every connection held), 1 otherwise.
    """
    from app.bench.client import run_loop
    from app.bench.spawn import SpawnedGateway, read_cpu_seconds, spawn_gateway

    gateway: SpawnedGateway | None = None
    if spawn is not None:
        try:
            gateway = spawn_gateway(spawn, extra=spawn_arg)
        except RuntimeError as exc:
            typer.echo(f"stompgate bench: {exc}", err=True)
            raise typer.Exit(2) from None
        host, port = gateway.host, gateway.stomp_port
        if pid is None:
            pid = gateway.pid
    summary: dict[str, Any]
    try:
        if idle_connections is not None:
            from app.bench.idle import run_idle

            summary = run_loop(
                run_idle(
                    host=host, port=port, count=idle_connections, hold=hold, pid=pid, version=version.value,
                    vhost=vhost, login=login, passcode=passcode, connect_timeout=connect_timeout,
                ),
                loop.value,
            )  # fmt: skip
        else:
            from app.bench.workload import BenchConfig, run_workload, summarize

            cfg = BenchConfig(
                host=host, port=port, kind=kind.value, destination=_destination(kind.value, destination),
                producers=producers, consumers=consumers, messages=None if duration is not None else messages,
                duration=duration, body_size=body_size, receipts=receipts, window=window, ack=ack.value,
                prefetch=prefetch, version=version.value, vhost=vhost, login=login, passcode=passcode,
                processes=processes, drain_timeout=drain_timeout, connect_timeout=connect_timeout, loop=loop.value,
            )  # fmt: skip
            cpu_before = read_cpu_seconds(pid) if pid else None
            own_before = _own_cpu()
            raw = run_workload(cfg)
            cpu_after = read_cpu_seconds(pid) if pid else None
            own = _own_cpu() - own_before
            summary = summarize(cfg, raw)
            summary["bench_cpu_s"] = round(own, 2)
            if cpu_before is not None and cpu_after is not None:
                used = cpu_after - cpu_before
                summary["server_pid"] = pid
                summary["server_cpu_s"] = round(used, 2)
                if summary["sent"]:
                    summary["server_cpu_us_per_msg"] = round(used / summary["sent"] * 1e6, 1)
    finally:
        if gateway is not None:
            code = gateway.stop()
            clean = code in (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM it handled once shut down
            gateway_log = "" if clean else gateway.log_tail(10)
            gateway.log_path.unlink(missing_ok=True)
    if gateway is not None:
        summary["spawned"] = {"store": spawn, "pid": gateway.pid, "stomp_port": gateway.stomp_port}
        summary["gateway_exit_code"] = code
        summary["gateway_clean_exit"] = clean
        if gateway_log:
            summary.setdefault("errors", []).append(f"gateway log: {gateway_log}")
    if json_output:
        typer.echo(json.dumps(summary))
    else:
        _print_text(summary)
    raise typer.Exit(0 if summary["ok"] else 1)
