"""Settings from flags, ``STOMPGATE_...`` environment variables or a TOML file, in that order of precedence."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from app.datasources.registry import DEFAULT_URL
from app.wraps import WrapSetting, check_wraps, parse_wraps

__all__ = ["ConfigFileError", "Settings", "load_settings"]


class ConfigFileError(ValueError):
    """The TOML settings file cannot be read as settings; the message says where."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STOMPGATE_", extra="forbid")

    host: str = Field("127.0.0.1", description="Address both listeners bind to (loopback unless told otherwise).")
    stomp_port: int = Field(61613, ge=0, le=65535, description="STOMP over TCP port (0 picks a free one).")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port: WebSocket /stomp, REST, /health, /metrics.")
    store: str = Field(DEFAULT_URL, description="Datasource URL: sqlite:///path, mongodb://..., postgresql://..., redis://..., memory://")
    max_connections: int = Field(10_000, ge=1, description="Most STOMP connections at once (TCP + WebSocket).")
    max_connections_per_address: int = Field(
        256,
        ge=1,
        description="Most STOMP connections (TCP + WebSocket, logged in or not) from one client IP address, so one host "
        "cannot take every slot; 256 leaves room for many clients behind one NAT. Loopback counts too: raise it behind "
        "a local reverse proxy.",
    )
    max_frame_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest body of a frame a client may send (its headers have their own limits).")
    max_frame_bytes_before_connect: int = Field(64 * 1024, ge=256, description="Largest frame before CONNECTED.")
    max_headers: int = Field(100, ge=1, description="Most headers in one frame.")
    max_header_line_bytes: int = Field(8 * 1024, ge=64, description="Longest header line.")
    max_subscriptions_per_connection: int = Field(256, ge=1, description="Subscriptions one connection may hold.")
    max_transactions_per_connection: int = Field(16, ge=1, description="Open transactions per connection.")
    max_frames_per_transaction: int = Field(10_000, ge=1, description="SEND/ACK/NACK frames in one transaction.")
    max_transaction_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Bytes (bodies and headers) one connection's open transactions may hold in memory until COMMIT.",
    )
    max_transaction_bytes_per_address: int = Field(
        128 * 1024 * 1024,
        ge=1024,
        description="Bytes the open transactions of all connections from one client address may hold together.",
    )
    max_transaction_bytes_total: int = Field(
        512 * 1024 * 1024,
        ge=1024,
        description="Bytes all connections' open transactions together may hold; past it a transactional SEND gets "
        "an ERROR naming the limit.",
    )
    login_timeout: float = Field(10.0, gt=0, le=3600, description="Seconds a connection may wait before sending CONNECT.")
    heartbeat_ms: int = Field(10_000, ge=0, le=86_400_000, description="Heart-beat period the server offers both ways (ms, 0 = off).")
    default_prefetch: int = Field(100, ge=1, description="Unacked messages per subscription without prefetch-count.")
    max_prefetch: int = Field(10_000, ge=1, le=1_000_000, description="Upper bound on prefetch-count.")
    max_deliveries: int = Field(5, ge=1, le=1_000_000, description="Deliveries before a queue message moves to NAME.DLQ.")
    lease_ms: int = Field(60_000, ge=1000, le=30 * 86_400_000, description="Lease on a delivered message; a dead gateway's come back after it.")
    poll_interval: float = Field(0.25, ge=0.01, le=60, description="Seconds before work from another gateway is noticed.")
    metrics_max_destinations: int = Field(
        1_000,
        ge=0,
        description="Destinations with Prometheus series of their own (published, delivered, depth, unacked); traffic "
        "of any further destination is counted under `destination=\"_other\"`. A destination idle for "
        "metrics_idle_seconds with no subscriber and no stored message gives its slot back.",
    )
    metrics_idle_seconds: float = Field(
        600.0,
        ge=1,
        le=30 * 86_400,
        description="Seconds without a publish or delivery after which a destination's metric slot may be freed.",
    )
    topic_retention: int = Field(100_000, ge=10, description="Topic messages retained for durable subscribers.")
    write_concern: str = Field("majority", description="MongoDB write concern (w).")
    server_selection_timeout_ms: int = Field(5_000, ge=100, description="MongoDB server selection timeout.")
    failover_buffer: int = Field(
        10_000, ge=0, description="SENDs held in memory while the database (MongoDB, PostgreSQL, Redis) cannot be reached."
    )
    sqlite_synchronous: str = Field("FULL", pattern="^(FULL|NORMAL|EXTRA)$", description="SQLite PRAGMA synchronous.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="debug, info, warning or error.")
    log_format: Literal["text", "json"] = Field("text", description="text lines, or one JSON object per line.")
    users_file: str | None = Field(
        None, description="TOML file of users (bcrypt-hashed passcodes and tokens, roles) and per-role permissions."
    )
    allow_anonymous: bool = Field(
        False, description="Allow listening on a non-loopback address with no users configured (anyone may do anything)."
    )
    tls_certfile: str | None = Field(None, description="PEM certificate chain: the STOMP TCP listener speaks TLS.")
    tls_keyfile: str | None = Field(None, description="PEM private key for tls_certfile (omit when the chain file holds it).")
    login_failures_before_lockout: int = Field(
        5, ge=1, description="Failed logins (per login and client address; per client address for REST tokens) before a lockout."
    )
    login_lockout_seconds: float = Field(
        2.0, gt=0, description="First lockout after too many failed logins; each further failure doubles it (max 15 min)."
    )
    topic_retention_bytes: int = Field(
        256 * 1024 * 1024, ge=4096, description="MongoDB: bytes the topic log keeps (its capped collection's size)."
    )
    namespace: str = Field(
        "stompgate",
        pattern="^[A-Za-z_][A-Za-z0-9_]{0,63}$",
        description="Prefix of the gateway's own collections (MongoDB) or tables (SQLite, PostgreSQL) or keys (Redis): "
        "several gateways with different namespaces can share one database.",
    )
    claim_batch: int = Field(256, ge=1, le=10_000, description="Most messages one claim round trip takes for one subscription.")
    max_inflight_per_session: int = Field(
        2_000, ge=1, description="Receipted frames one connection may have in flight before the gateway stops reading it."
    )
    max_inflight_bytes_per_session: int = Field(
        8 * 1024 * 1024,
        ge=64 * 1024,
        description="Bytes of SENDs (bodies and headers, a COMMIT's included) one connection may have waiting for the "
        "datasource before the gateway stops reading it (the SEND that crosses the bound is still taken).",
    )
    max_session_buffer: int = Field(
        16 * 1024 * 1024, ge=64 * 1024, description="Bytes queued for a slow client before it is disconnected with an ERROR."
    )
    shutdown_grace: float = Field(5.0, ge=0, le=3600, description="Seconds a stopping gateway waits for receipts in flight.")
    server_name: str = Field(
        "stompgate/0.1.0",
        pattern="^[\\x21-\\x7e][\\x20-\\x7e]{0,199}$",
        description="The server header of CONNECTED (printable ASCII).",
    )
    # NoDecode: a flag and the environment give JSON text, which parse_wraps decodes with a clear error.
    wrap: Annotated[tuple[WrapSetting, ...], NoDecode] = Field(
        (),
        description="Existing MongoDB collections or PostgreSQL tables served as queues: the file's wrap tables "
        "(destination, collection or table, filter; for a table also key, ack_set), or a JSON array of them; an ACK "
        "deletes the document or row, or updates the row's ack_set columns.",
    )

    @field_validator("wrap", mode="before")
    @classmethod
    def _wraps_from_text(cls, value: object) -> object:
        return parse_wraps(value)

    @field_validator("wrap")
    @classmethod
    def _wraps_fit_the_store(cls, value: tuple[WrapSetting, ...], info: ValidationInfo) -> tuple[WrapSetting, ...]:
        # store and namespace are declared above, so they are validated (or missing, having failed) by now
        check_wraps(value, store=info.data.get("store"), namespace=info.data.get("namespace"))
        return value


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Flags (``overrides`` that are not None) beat the environment, which beats the file.

    The file holds a ``[stompgate]`` table of settings and ``[[wrap]]`` tables (or ``[[stompgate.wrap]]``)."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = _read_file(config_file)
    explicit = {k: v for k, v in overrides.items() if v is not None}
    # Raw environment values, validated only once merged: a setting that depends on another (a wrap on the store)
    # must be judged against the other's final value, whichever source gives it.
    env_values = EnvSettingsSource(Settings)()
    return Settings(**{**file_values, **env_values, **explicit})


def _read_file(config_file: Path) -> dict[str, Any]:
    try:
        with config_file.open("rb") as fh:
            document = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{config_file} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigFileError(f"cannot read {config_file}: {exc.strerror}") from None
    table = document.get("stompgate", {})
    if not isinstance(table, dict):
        raise ConfigFileError(f"{config_file}: 'stompgate' must be a table of settings")
    values = dict(table)
    if "wrap" in document:
        if "wrap" in values:
            raise ConfigFileError(f"{config_file}: give the wraps as [[wrap]] or as [[stompgate.wrap]], not both")
        values["wrap"] = document["wrap"]
    return values
