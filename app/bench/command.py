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
from pathlib import Path
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


class TransportKind(str, Enum):
    tcp = "tcp"
    websocket = "websocket"


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


def _cpu_sum(pids: list[int]) -> float | None:
    from app.bench.spawn import read_cpu_seconds

    if not pids:
        return None
    values = [read_cpu_seconds(p) for p in pids]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _run_baseline(url: str, *, kind: str, producers: int, consumers: int, messages: int, body_size: int,
                  prefetch: int | None, drain_timeout: float, variants: list[str], gateways: int, batch: int,
                  loop: str, json_output: bool) -> None:  # fmt: skip
    from app.bench.baseline import VARIANTS, run_baseline
    from app.bench.client import run_loop
    from app.bench.workload import BenchConfig

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        typer.echo(f"stompgate bench: unknown --baseline-variant {unknown[0]!r} (one of {', '.join(VARIANTS)})", err=True)
        raise typer.Exit(2)
    if not url.startswith(("mongodb://", "mongodb+srv://", "postgresql://", "postgres://", "redis://", "rediss://")):
        typer.echo("stompgate bench: --baseline takes a mongodb://, postgresql:// or redis:// URL", err=True)
        raise typer.Exit(2)
    cfg = BenchConfig(
        host=url, port=0, kind=kind, destination=_destination(kind, None), producers=producers, consumers=consumers,
        messages=messages, duration=None, body_size=body_size, receipts=True, window=0, ack="client-individual",
        prefetch=prefetch, version="-", vhost="-", login=None, passcode=None, processes=1, drain_timeout=drain_timeout,
        connect_timeout=10.0, loop=loop,
    )  # fmt: skip
    try:
        report = run_loop(run_baseline(url, cfg, variants=list(variants) or None, gateways=gateways, batch=batch), loop)
    except Exception as exc:  # noqa: BLE001 - e.g. no server at the URL
        report = {"mode": "baseline", "url": url, "runs": [], "ok": False, "errors": [f"{type(exc).__name__}: {exc}"]}
    if json_output:
        typer.echo(json.dumps(report))
    else:
        server = report.get("server") or {}
        if server.get("postgresql"):
            name = f"PostgreSQL {server['postgresql']}"
        elif "redis" in server:  # its figures depend on the fsync setting most of all
            name = (f"Redis {server['redis'] or '?'} (appendonly {server['appendonly'] or '?'}, "
                    f"appendfsync {server['appendfsync'] or '?'})")  # fmt: skip
        elif server.get("ferretdb_version"):
            name = f"FerretDB {server['ferretdb_version']}"
        else:
            name = f"MongoDB {server.get('version', '?')}"
        for run in report["runs"]:
            typer.echo(f"baseline {run['variant']} (the backend, no gateway) on {name}: {run['insert_batch']} messages per store"
                       + (f", {run['cursors']} follower(s)" if run.get("cursors") else "")
                       + ("" if run["exactly_once"] else "; NOT exactly-once on FerretDB (reference only)"))  # fmt: skip
            _print_text(run)
            typer.echo("")
        for error in report.get("errors", []):
            typer.echo(f"error             {error}")
    raise typer.Exit(0 if report["ok"] else 1)


def _compare_targets(specs: list[str], chart: Path | None, *, idle: bool, gateways: int) -> list[Any]:
    from app.bench.compare import parse_target

    if not specs:
        if chart is not None:
            typer.echo("stompgate bench: --chart needs --compare", err=True)
            raise typer.Exit(2)
        return []
    if idle or gateways > 1:
        typer.echo("stompgate bench: --compare runs a workload against one gateway (not with --idle-connections or --gateways)", err=True)
        raise typer.Exit(2)
    if chart is not None and chart.suffix.lower() != ".png":
        typer.echo(f"stompgate bench: --chart writes a PNG: name it *.png, not {chart.name!r}", err=True)
        raise typer.Exit(2)
    try:
        targets = [parse_target(spec) for spec in specs]
    except ValueError as exc:
        typer.echo(f"stompgate bench: {exc}", err=True)
        raise typer.Exit(2) from None
    names = [t.name for t in targets]
    if len(set(names)) != len(names) or "stompgate" in names:
        typer.echo("stompgate bench: --compare names must differ from each other and from 'stompgate'", err=True)
        raise typer.Exit(2)
    return targets


def _run_compare(
    cfg: Any, others: list[Any], *, pids: list[int], rounds: int, chart: Path | None, fresh: bool, json_output: bool
) -> None:
    """The gateway (named ``stompgate``) and the other brokers, alternating; exits with the bench's code."""
    from app.bench.compare import ChartUnavailable, Target, format_table, run_compare, write_chart

    gateway = Target("stompgate", cfg.host, cfg.port, cfg.login, cfg.passcode, (), tuple(pids))
    result = run_compare(
        cfg, [gateway, *others], rounds=rounds, fresh_destination=(lambda: _destination(cfg.kind, None)) if fresh else None,
        progress=lambda line: None if json_output else typer.echo(line, err=True),
    )  # fmt: skip
    if chart is not None:
        try:
            write_chart(result, chart)
        except ChartUnavailable as exc:
            typer.echo(f"stompgate bench: {exc}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            typer.echo(f"stompgate bench: cannot write the chart {str(chart)!r}: {exc.strerror or exc}", err=True)
            raise typer.Exit(2) from None
        result["chart"] = str(chart)
    if json_output:
        typer.echo(json.dumps(result))
    else:
        typer.echo(format_table(result))
        if chart is not None:
            typer.echo(f"chart: {chart}")
    raise typer.Exit(0 if result["ok"] else 1)


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
        if summary["subscriptions"]:
            typer.echo(f"subscriptions     {summary['subscriptions']:,} (idle)")
        typer.echo(f"server CPU idle   {_fmt(summary['server_cpu_while_idle'])} core")
        for failure in summary["failures"]:
            typer.echo(f"failure           {failure}")
        return
    cfg = summary["config"]
    lat = summary["latency_ms"]
    where = f"{cfg['host']}:{cfg['port']}" if cfg["port"] else cfg["host"]
    if cfg.get("extra_endpoints"):
        where += "".join(f", {h}:{p}" for h, p in cfg["extra_endpoints"])
    typer.echo(
        f"{cfg['kind']} {cfg['destination']} on {where}: "
        f"{cfg['producers']} producers, "
        f"{cfg['consumers']} consumers, {cfg['body_size']} B bodies"
        + (f" (1 in {cfg['large_every']}: {cfg['large_body_size']} B)" if cfg.get("large_body_size") else "")
        + f", receipts {'on' if cfg['receipts'] else 'off'}, "
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
    large_body_size: Optional[int] = typer.Option(
        None, "--large-body-size", min=16, help="A mix: every --large-every'th message of each producer has this body size instead of --body-size."
    ),
    large_every: int = typer.Option(10, "--large-every", min=1, help="With --large-body-size: which share of the messages is large (1 in N)."),
    receipts: bool = typer.Option(True, "--receipts/--no-receipts", help="Ask for a RECEIPT on every SEND (producers pipeline up to --window unreceipted SENDs)."),
    rate: Optional[float] = typer.Option(
        None, "--rate", min=0.1, max=10_000_000, help="Send this many messages per second in all (spread over the producers, one "
        "at a time on a schedule), to measure latency at a given load rather than at saturation.",
    ),  # fmt: skip
    window: int = typer.Option(500, "--window", min=1, help="Most SENDs a producer has waiting for their RECEIPT."),
    persistent: bool = typer.Option(False, "--persistent", help="Send persistent:true on every SEND (RabbitMQ/ActiveMQ then store messages on disk; stompgate always does)."),
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
    subscriptions_per_connection: int = typer.Option(
        0, "--subscriptions-per-connection", min=0,
        help="With --idle-connections: each connection also subscribes to this many queues nobody sends to, and the "
        "report gives the server's CPU while they are held (idle subscriptions should cost nothing).",
    ),  # fmt: skip
    pid: Optional[int] = typer.Option(None, "--pid", help="PID of the server whose RSS --idle-connections reports (known with --spawn)."),
    gateways: int = typer.Option(
        1, "--gateways", min=1,
        help="With --spawn: start this many gateways on the same store and spread producers and consumers over them "
        "round-robin (client i on gateway i mod N). Server CPU is the sum over all of them. With --baseline: the "
        "number of shared topic cursors (one per gateway).",
    ),  # fmt: skip
    baseline: Optional[str] = typer.Option(
        None, "--baseline", metavar="DATABASE_URL",
        help="No gateway: drive the MongoDB, PostgreSQL or Redis backend directly with this workload (same producers, consumers and "
        "batch size, no STOMP) against this database, and report it in the same format: the database's own ceiling "
        "for the gateway's datastore operations. See app/bench/baseline.py.",
    ),  # fmt: skip
    baseline_variant: list[str] = typer.Option(
        [], "--baseline-variant",
        help="With --baseline (repeatable): queue-claim (the backend's claim), queue-fam-unsafe (plain "
        "find_one_and_update; not exactly-once on FerretDB), topic-blocks (FerretDB's topic path: batch and block "
        "reads), topic-shared-cursor (one tailable cursor per gateway, fanned out: what the gateway does on "
        "MongoDB), topic-cursor-per-subscriber, topic-log (PostgreSQL, Redis: the log followed once per gateway). Default: the "
        "ones that apply to the kind and the server.",
    ),  # fmt: skip
    baseline_batch: int = typer.Option(
        64, "--baseline-batch", min=1, help="With --baseline: messages per insert_many (default: the bench's SEND chunk)."
    ),
    compare: list[str] = typer.Option(
        [], "--compare", metavar="NAME=HOST:PORT[,login=U][,passcode=P][,header=K:V][,pid=N]",
        help="Also run the workload against this STOMP broker (repeatable), alternating with the gateway, and print "
        "one table: e.g. rabbitmq=127.0.0.1:61613,login=guest,passcode=guest or "
        "artemis=127.0.0.1:61616,header=consumer-window-size:-1. pid= adds its CPU per message. See app/bench/compare.py.",
    ),  # fmt: skip
    rounds: int = typer.Option(3, "--rounds", min=1, max=100, help="With --compare: alternating rounds (each target once per round)."),
    chart: Optional[Path] = typer.Option(
        None, "--chart", metavar="PATH.png", help="With --compare: also draw the table as a PNG bar chart (needs matplotlib: stompgate[bench])."
    ),
    transport: TransportKind = typer.Option(
        TransportKind.tcp, "--transport",
        help="tcp (the STOMP port), or websocket: STOMP over WebSocket on the HTTP port (--port is then the HTTP port; "
        "with --spawn the gateway's), one BINARY message per chunk.",
    ),  # fmt: skip
    ws_path: str = typer.Option("/stomp", "--ws-path", help="With --transport websocket: the path to upgrade."),
    loop: LoopKind = typer.Option(LoopKind.auto, "--loop", help="Event loop: uvloop when installed (auto), or force one."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
) -> None:
    """Load-generate against a gateway and report msgs/s, latency, lost and duplicated messages.

    Exit code 0 when nothing was lost or duplicated (idle mode: every connection held), 1 otherwise.
    """
    from app.bench.client import run_loop
    from app.bench.spawn import SpawnedGateway, spawn_gateway

    if baseline is not None:
        _run_baseline(
            baseline, kind=kind.value, producers=producers, consumers=consumers, messages=messages, body_size=body_size,
            prefetch=prefetch, drain_timeout=drain_timeout, variants=baseline_variant, gateways=gateways,
            batch=baseline_batch, loop=loop.value, json_output=json_output,
        )  # fmt: skip
    if gateways > 1 and spawn is None:
        typer.echo("stompgate bench: --gateways needs --spawn (or --baseline)", err=True)
        raise typer.Exit(2)
    targets = _compare_targets(compare, chart, idle=idle_connections is not None, gateways=gateways)
    websocket_path = ws_path if transport is TransportKind.websocket else None
    if websocket_path is not None and (not websocket_path.startswith("/") or any(c in websocket_path for c in " \r\n\0")):
        typer.echo(f"stompgate bench: --ws-path must be a path such as /stomp, not {websocket_path!r}", err=True)
        raise typer.Exit(2)
    gateway: SpawnedGateway | None = None
    spawned: list[SpawnedGateway] = []
    pids: list[int] = []
    if spawn is not None:
        try:
            for _ in range(gateways):
                spawned.append(spawn_gateway(spawn, extra=spawn_arg))
        except RuntimeError as exc:
            for g in spawned:
                g.stop()
                g.log_path.unlink(missing_ok=True)
            typer.echo(f"stompgate bench: {exc}", err=True)
            raise typer.Exit(2) from None
        gateway = spawned[0]
        host, port = gateway.host, (gateway.http_port if transport is TransportKind.websocket else gateway.stomp_port)
        if pid is None:
            pids = [g.pid for g in spawned]
            pid = gateway.pid
    if pid is not None and not pids:
        pids = [pid]
    summary: dict[str, Any]
    try:
        if idle_connections is not None:
            from app.bench.idle import run_idle

            summary = run_loop(
                run_idle(
                    host=host, port=port, count=idle_connections, hold=hold, pid=pid, version=version.value,
                    vhost=vhost, login=login, passcode=passcode, connect_timeout=connect_timeout,
                    subscriptions=subscriptions_per_connection, websocket_path=websocket_path,
                ),
                loop.value,
            )  # fmt: skip
        else:
            from app.bench.workload import BenchConfig, run_workload, summarize

            cfg = BenchConfig(
                host=host, port=port, kind=kind.value, destination=_destination(kind.value, destination),
                producers=producers, consumers=consumers, messages=None if duration is not None else messages,
                duration=duration, body_size=body_size, receipts=receipts, window=window, ack=ack.value,
                large_body_size=large_body_size, large_every=large_every, prefetch=prefetch, version=version.value, vhost=vhost, login=login, passcode=passcode,
                processes=processes, drain_timeout=drain_timeout, connect_timeout=connect_timeout, loop=loop.value,
                extra_endpoints=tuple(
                    (g.host, g.http_port if websocket_path is not None else g.stomp_port) for g in spawned[1:]
                ),
                persistent=persistent, websocket_path=websocket_path, rate=rate,
            )  # fmt: skip
            if targets:
                _run_compare(
                    cfg, targets, pids=pids, rounds=rounds, chart=chart, fresh=destination is None, json_output=json_output,
                )  # fmt: skip
            cpu_before = _cpu_sum(pids)
            own_before = _own_cpu()
            raw = run_workload(cfg)
            cpu_after = _cpu_sum(pids)
            own = _own_cpu() - own_before
            summary = summarize(cfg, raw)
            summary["bench_cpu_s"] = round(own, 2)
            if cpu_before is not None and cpu_after is not None:
                used = cpu_after - cpu_before
                summary["server_pid"] = pid
                if len(pids) > 1:
                    summary["server_pids"] = pids
                summary["server_cpu_s"] = round(used, 2)
                if summary["sent"]:
                    summary["server_cpu_us_per_msg"] = round(used / summary["sent"] * 1e6, 1)
    finally:
        codes: list[int] = []
        logs: list[str] = []
        for g in spawned:
            code = g.stop()
            codes.append(code)
            if code not in (0, -signal.SIGTERM):  # uvicorn re-raises the SIGTERM it handled once shut down
                logs.append(f"gateway {g.pid} log: {g.log_tail(10)}")
            g.log_path.unlink(missing_ok=True)
    if gateway is not None:
        summary["spawned"] = {"store": spawn, "pid": gateway.pid, "stomp_port": gateway.stomp_port}
        if len(spawned) > 1:
            summary["spawned"]["gateways"] = [{"pid": g.pid, "stomp_port": g.stomp_port} for g in spawned]
        summary["gateway_exit_code"] = codes[0] if len(codes) == 1 else codes
        summary["gateway_clean_exit"] = all(c in (0, -signal.SIGTERM) for c in codes)
        for entry in logs:
            summary.setdefault("errors", []).append(entry)
    if json_output:
        typer.echo(json.dumps(summary))
    else:
        _print_text(summary)
    raise typer.Exit(0 if summary["ok"] else 1)
