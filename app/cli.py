"""The ``stompgate`` command: ``serve``, ``bench`` and ``openapi``.

Every setting of ``app.settings.Settings`` is a flag of ``serve`` (``--stomp-port``, ``--max-frame-bytes``, ...) with
its description as help, so the CLI, the environment (``STOMPGATE_...``) and the config file never drift apart.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import inspect
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import typer
from pydantic import ValidationError

from app.bench.command import bench
from app.datasources.registry import BACKENDS
from app.settings import ConfigFileError, Settings, load_settings

__all__ = ["main", "cli"]

# Allocations (less deallocations) of container objects between two collections of the youngest generation; Python's
# default is 700, a pass every ~1.4 ms of the gateway's work under load (see tune_gc).
GC_GEN0_THRESHOLD = 10_000

# glibc's allocator (see tune_malloc): blocks up to MALLOC_MMAP_THRESHOLD come from its heaps, not a mapping of their
# own, and up to MALLOC_TRIM_THRESHOLD bytes freed at the top of a heap stay there for the next allocation.
MALLOC_MMAP_THRESHOLD = 8 * 1024 * 1024
MALLOC_TRIM_THRESHOLD = 64 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)

# bcrypt hashes at most 72 bytes of secret (bcrypt 5 refuses longer ones with a ValueError instead of truncating).
BCRYPT_MAX_SECRET_BYTES = 72

# Plain click help, not rich's tables: at 80 columns rich cuts long flag and variable names with an ellipsis
# (--max-connections-p…), while click wraps the help text and keeps every name whole.
cli = typer.Typer(
    help="stompgate: a STOMP gateway that keeps its messages in a database you already run.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@cli.callback()
def _group() -> None:
    """stompgate: a STOMP gateway that keeps its messages in a database you already run."""


class StartupError(Exception):
    """One clear sentence for the operator; printed without a traceback."""


def _check_store(url: str) -> None:
    from app.main import redact_url

    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:  # e.g. an unclosed [IPv6] host
        raise StartupError(f"the store URL {redact_url(url)!r} is not a valid URL: {exc}") from None
    if scheme not in BACKENDS:
        known = ", ".join(f"{s}://" for s in sorted(BACKENDS))
        raise StartupError(f"the store URL {redact_url(url)!r} is not one stompgate knows; use one of {known}")
    if scheme == "sqlite":
        if not url.startswith("sqlite:///"):
            raise StartupError(f"a SQLite store URL looks like sqlite:///relative/path.db or sqlite:////abs/path.db, not {url!r}")
        path = Path(url[len("sqlite:///") :])
        directory = path.parent if str(path.parent) else Path(".")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create the data directory {directory}: {exc.strerror}") from None
        if not os.access(directory, os.W_OK):
            raise StartupError(f"the data directory {directory} is not writable by this user")


def _check_port(host: str, port: int, what: str) -> None:
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"the {what} port {host}:{port} is already in use; choose another with --{what}-port") from None
            raise StartupError(f"cannot listen on {host}:{port} for {what}: {exc.strerror}") from None


def _check_datasource(settings: Settings) -> None:
    """Open the store once and close it, so that one that cannot be opened (a file that is not a SQLite database, an
    unreachable MongoDB) is one sentence here rather than a traceback from the server's start-up."""
    import asyncio

    from app.datasources.interface import DatasourceError
    from app.datasources.registry import open_datasource
    from app.main import datasource_options

    async def check() -> None:
        datasource = await open_datasource(settings.store, datasource_options(settings))
        await datasource.close()

    try:
        asyncio.run(check())
    except DatasourceError as exc:
        raise StartupError(" ".join(str(exc).split())) from None


def serve_with(settings: Settings) -> None:
    import uvicorn

    from app.logs import configure_logging

    from app.main import create_app
    from app.security import SecurityConfigError, load_authorizer, tls_context

    _check_store(settings.store)
    if settings.users_file is None and not settings.allow_anonymous and not _is_loopback(settings.host):
        raise StartupError(
            f"refusing to listen on {settings.host} with no users configured: set --users-file "
            "(STOMPGATE_USERS_FILE), or pass --allow-anonymous (STOMPGATE_ALLOW_ANONYMOUS=true) to let anyone in"
        )
    try:
        load_authorizer(settings)
        tls_context(settings)
    except SecurityConfigError as exc:
        raise StartupError(str(exc)) from None
    _check_port(settings.host, settings.stomp_port, "stomp")
    _check_port(settings.host, settings.http_port, "http")
    _check_datasource(settings)
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        lifespan="on",
        log_level=settings.log_level,
        log_config=None,
        timeout_graceful_shutdown=10,
        **server_options(settings),
    )
    server = uvicorn.Server(config)
    tune_gc()
    tune_malloc()
    server.run()
    if not server.started:
        raise StartupError("the gateway did not start; the log above says why")


def tune_gc() -> None:
    """The cyclic garbage collector for a long-running server, called once start-up has built the app. What exists now
    (modules, the app) lives as long as the process: frozen, it is left out of the full passes, which otherwise walked
    all of it (about 70 ms each, four in a 50,000-message queue run: pauses of the event loop). The youngest
    generation is collected every ``GC_GEN0_THRESHOLD`` allocations instead of 700: most of a message's objects are
    freed by reference counting before then. Measured: the collector's share of the gateway's CPU went from about
    8 % to under 1 %."""
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)


def tune_malloc() -> bool:
    """Keep freed buffers of large messages for reuse (glibc only; elsewhere nothing changes, and False is returned).
    By default glibc maps a block over 128 KiB of its own and unmaps it when freed, and gives a heap's free top back
    to the system past twice that; every 1 MiB body, socket read and file read then took fresh pages, each one a page
    fault that the kernel zeroes. Those faults were about 12 % of the gateway's CPU on 1 MiB messages (perf); with
    these settings its CPU per message fell 5-12 % (1 MiB queue, three alternating pairs). What may stay unreturned
    is bounded: MALLOC_TRIM_THRESHOLD per heap."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # not glibc (musl has no mallopt), or no dynamic linking
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def server_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn options the gateway's rules depend on, for every server that runs it (``serve``, tests).

    ``ws_max_size``: the websockets layer gathers every fragment of a WebSocket message, up to this size, before the
    app sees a byte, and holds one more whole message queued for the app. uvicorn's 16 MiB default let a client that
    never logs in make us hold that much per connection; the frame limit plus the pre-login limit as a margin (so a
    frame just over max_frame_bytes still gets a STOMP ERROR naming it, not a bare close 1009) bounds it to what a
    logged-in client may send anyway. Before CONNECTED the app refuses more than max_frame_bytes_before_connect.

    ``ws_per_message_deflate``: off. Browsers offer it on every connection, and its two zlib streams cost each
    connection about 40 KiB (an idle connection measured 89 KiB with it, 47 KiB without) for STOMP frames that are
    mostly small; RabbitMQ's Web STOMP leaves it off too.

    ``proxy_headers``: off. uvicorn otherwise believes ``X-Forwarded-For`` from loopback, so any local process could
    choose the address its connections and failed logins count against (per-address limits, login throttling).
    Behind a reverse proxy every client then counts as the proxy's address: raise the per-address limit there."""
    frame_limit = settings.max_frame_bytes
    margin = min(settings.max_frame_bytes_before_connect, frame_limit)
    return {
        "http": _http_protocol(),
        "ws": _websocket_protocol(),
        "ws_max_size": frame_limit + margin,
        "ws_per_message_deflate": False,
        "proxy_headers": False,
    }


def _http_protocol() -> Any:
    """uvicorn's httptools protocol, answering a request its parser refuses (bad header bytes, a bad Content-Length,
    ...) with problem JSON like the app's other 400s instead of uvicorn's text/plain. That answer is written in
    ``send_400_response``, not a public hook: tests/app/api/test_http_layer_errors.py notices if uvicorn changes it.
    Without httptools (PyPy) uvicorn picks h11 and answers text/plain."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    from app.api.errors import invalid_http_response

    class ProblemHttpToolsProtocol(HttpToolsProtocol):
        def send_400_response(self, msg: str) -> None:
            target: bytes = getattr(self, "url", b"")  # unset when the request line itself was refused
            self.transport.write(invalid_http_response(target, self.server_state.default_headers))
            self.transport.close()

    return ProblemHttpToolsProtocol


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def _websocket_protocol() -> Any:
    """STOMP's WebSocket paths on the connection's own Protocol (app/transports/websocket.py); any other
    WebSocket path on uvicorn's sans-I/O websockets implementation (or what uvicorn picks where it has none)."""
    from app.transports.websocket import stomp_websocket_protocol

    fallback: Any
    try:
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol as fallback
    except ImportError:
        from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol as fallback
    return stomp_websocket_protocol(fallback)


def _serve(config: Path | None = None, **values: Any) -> None:
    """Run the gateway: STOMP over TCP, STOMP over WebSocket and REST, on one broker and one datasource."""
    try:
        settings = load_settings(config, **values)
        serve_with(settings)
    except ValidationError as exc:
        first = exc.errors()[0]
        typer.echo(f"stompgate: invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}", err=True)
        raise typer.Exit(2) from None
    except ConfigFileError as exc:
        typer.echo(f"stompgate: {exc}", err=True)
        raise typer.Exit(2) from None
    except StartupError as exc:
        typer.echo(f"stompgate: {exc}", err=True)
        raise typer.Exit(1) from None


def _serve_signature() -> inspect.Signature:
    """One ``--flag`` per setting, generated from the Settings model so help, env and file never drift apart."""
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None, "--config", help="TOML file: a 'stompgate' table of settings, and 'wrap' tables.", dir_okay=False, exists=True
            ),
            annotation=Optional[Path],
        )
    ]
    for name, field in Settings.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        kind: Any
        if field.annotation is bool:  # a switch: --allow-anonymous / --no-allow-anonymous
            flags, kind = f"{flag}/--no-{name.replace('_', '-')}", bool
        else:
            flags, kind = flag, field.annotation if field.annotation in (int, float) else str
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(
                    None,
                    flags,
                    help=f"{field.description} (env STOMPGATE_{name.upper()}, default {field.default!r})",
                    show_default=False,
                ),
                annotation=Optional[kind],
            )
        )
    return inspect.Signature(params)


_serve.__signature__ = _serve_signature()  # type: ignore[attr-defined]
cli.command("serve")(_serve)


@cli.command()
def openapi(
    output: Path = typer.Option(Path("openapi/openapi.json"), help="Where to write the OpenAPI document."),
) -> None:
    """Regenerate the committed OpenAPI document from the app."""
    import json

    from app.main import create_app

    spec = create_app(Settings()).openapi()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    typer.echo(f"wrote {output}")


cli.command("bench")(bench)


@cli.command("hash-passcode")
def hash_passcode(
    rounds: int = typer.Option(12, min=4, max=16, help="bcrypt cost: each step doubles the work of a check."),
) -> None:
    """Read a passcode (or REST token) without echo and print its bcrypt hash for the users file."""
    from app.security import hash_secret

    if sys.stdin.isatty():
        secret = typer.prompt("Passcode", hide_input=True, confirmation_prompt=True)
    else:
        secret = sys.stdin.readline().rstrip("\r\n")
    if not secret:
        typer.echo("stompgate: an empty passcode cannot be hashed", err=True)
        raise typer.Exit(2)
    try:
        size = len(secret.encode())
    except UnicodeEncodeError:  # stdin decodes with surrogateescape: bytes that are not UTF-8 end up here
        typer.echo("stompgate: the passcode is not valid UTF-8", err=True)
        raise typer.Exit(2) from None
    if size > BCRYPT_MAX_SECRET_BYTES:
        typer.echo(
            f"stompgate: the passcode is {size} bytes in UTF-8; bcrypt takes at most {BCRYPT_MAX_SECRET_BYTES} bytes",
            err=True,
        )
        raise typer.Exit(2)
    typer.echo(hash_secret(secret, rounds))


def main() -> None:
    cli(prog_name="stompgate")


if __name__ == "__main__":
    main()
