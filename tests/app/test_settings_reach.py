"""Every datasource and broker option is reachable from a flag, a ``STOMPGATE_`` variable and the TOML file, and
``[[wrap]]`` tables become ``DatasourceOptions.wrapped`` (collections) or ``wrapped_tables`` (PostgreSQL tables); a
bad wrap is one line on stderr, exit code 2."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from app.broker.config import BrokerConfig
from app.cli import cli
from app.datasources.interface import DatasourceOptions, WrappedCollection, WrappedTable
from app.main import broker_config, datasource_options
from app.settings import Settings, load_settings

MONGO = "mongodb://127.0.0.1:27017/shop"
POSTGRES = "postgresql://127.0.0.1:5432/shop"

# Options made from settings of another name, and why they have no setting of their own.
DERIVED = {
    "limits": "built from max_frame_bytes, max_frame_bytes_before_connect, max_headers, max_header_line_bytes",
    "heartbeat_send_ms": "heartbeat_ms offers one period both ways",
    "heartbeat_receive_ms": "heartbeat_ms offers one period both ways",
    "wrapped": "the wrap setting ([[wrap]] tables)",
    "wrapped_tables": "the wrap setting ([[wrap]] tables with a table)",
}

# setting -> (a value unlike the default, as the TOML file gives it; where it lands)
NEW_VALUES: dict[str, tuple[Any, str]] = {
    "topic_retention_bytes": (1_048_576, "datasource"),
    "namespace": ("tenant_b", "datasource"),
    "claim_batch": (17, "broker"),
    "max_inflight_per_session": (321, "broker"),
    "max_inflight_bytes_per_session": (1_048_576, "broker"),
    "max_session_buffer": (2_097_152, "broker"),
    "shutdown_grace": (1.5, "broker"),
    "server_name": ("gateway-eu", "broker"),
}


def option_names() -> set[str]:
    return {f.name for f in dataclasses.fields(BrokerConfig)} | {f.name for f in dataclasses.fields(DatasourceOptions)}


def test_every_option_has_a_setting_or_a_reason() -> None:
    missing = sorted(option_names() - set(Settings.model_fields) - set(DERIVED))
    assert not missing, (
        f"options no flag, variable or file can set: {missing}; add a setting (app/settings.py, app/main.py) "
        "or say in DERIVED why there must be none"
    )


@pytest.fixture
def clean_env() -> Iterator[None]:
    """The tests set STOMPGATE_ variables; none may leak from the machine in or from a test out."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("STOMPGATE_")}
    for key in saved:
        del os.environ[key]
    yield
    for key in [k for k in os.environ if k.startswith("STOMPGATE_")]:
        del os.environ[key]
    os.environ.update(saved)


def from_flags(*args: str) -> Settings:
    """The serve command's own parser turns the flags into the values it passes to load_settings."""
    command = typer.main.get_command(cli)
    serve = command.commands["serve"]  # type: ignore[attr-defined]
    with serve.make_context("serve", list(args)) as ctx:
        params = dict(ctx.params)
    return load_settings(params.pop("config"), **params)


def landed(settings: Settings, name: str, where: str) -> object:
    target: object = broker_config(settings) if where == "broker" else datasource_options(settings)
    return getattr(target, name)


@pytest.mark.parametrize("name", sorted(NEW_VALUES))
def test_a_flag_reaches_the_option(name: str, clean_env: None) -> None:
    value, where = NEW_VALUES[name]
    assert landed(Settings(), name, where) != value
    settings = from_flags(f"--{name.replace('_', '-')}", str(value))
    assert landed(settings, name, where) == value


@pytest.mark.parametrize("name", sorted(NEW_VALUES))
def test_an_environment_variable_reaches_the_option(name: str, clean_env: None) -> None:
    value, where = NEW_VALUES[name]
    os.environ[f"STOMPGATE_{name.upper()}"] = str(value)
    assert landed(load_settings(), name, where) == value


@pytest.mark.parametrize("name", sorted(NEW_VALUES))
def test_the_file_reaches_the_option(name: str, tmp_path: Path, clean_env: None) -> None:
    value, where = NEW_VALUES[name]
    config = tmp_path / "stompgate.toml"
    config.write_text(f"[stompgate]\n{name} = {json.dumps(value)}\n")
    assert landed(load_settings(config), name, where) == value


WRAP_TOML = f"""
[stompgate]
store = "{MONGO}"

[[wrap]]
destination = "/queue/jobs.video"
collection = "jobs"
filter = {{ kind = "video", size = {{ "$lt" = 100 }} }}

[[wrap]]
destination = "/queue/invoices"
collection = "invoices"
"""
WRAPPED = (
    WrappedCollection("/queue/jobs.video", "jobs", {"kind": "video", "size": {"$lt": 100}}),
    WrappedCollection("/queue/invoices", "invoices", {}),
)
WRAP_JSON = json.dumps([{"destination": w.destination, "collection": w.collection, "filter": w.filter} for w in WRAPPED])


def test_wrap_tables_in_the_file_reach_the_datasource(tmp_path: Path, clean_env: None) -> None:
    config = tmp_path / "stompgate.toml"
    config.write_text(WRAP_TOML)
    assert datasource_options(load_settings(config)).wrapped == WRAPPED


def test_wrap_as_json_from_a_flag_or_the_environment(clean_env: None) -> None:
    assert datasource_options(from_flags("--store", MONGO, "--wrap", WRAP_JSON)).wrapped == WRAPPED
    os.environ["STOMPGATE_WRAP"] = WRAP_JSON
    os.environ["STOMPGATE_STORE"] = MONGO
    assert datasource_options(load_settings()).wrapped == WRAPPED


def test_a_wrap_is_judged_against_the_store_from_another_source(tmp_path: Path, clean_env: None) -> None:
    """The wraps from the environment, the MongoDB store from the file: valid once merged."""
    config = tmp_path / "stompgate.toml"
    config.write_text(f'[stompgate]\nstore = "{MONGO}"\n')
    os.environ["STOMPGATE_WRAP"] = WRAP_JSON
    assert datasource_options(load_settings(config)).wrapped == WRAPPED


PG_WRAP_TOML = f"""
[stompgate]
store = "{POSTGRES}"

[[wrap]]
destination = "/queue/orders.new"
table = "shop.orders"
key = ["region", "id"]
filter = {{ status = "new", amount = {{ "$gte" = 10 }} }}
ack_set = {{ status = "done" }}

[[wrap]]
destination = "/queue/invoices"
table = "invoices"
"""
WRAPPED_TABLES = (
    WrappedTable("/queue/orders.new", "shop.orders", ("region", "id"), {"status": "new", "amount": {"$gte": 10}},
                 {"status": "done"}),
    WrappedTable("/queue/invoices", "invoices"),
)  # fmt: skip


def test_table_wraps_reach_the_datasource(tmp_path: Path, clean_env: None) -> None:
    config = tmp_path / "stompgate.toml"
    config.write_text(PG_WRAP_TOML)
    options = datasource_options(load_settings(config))
    assert options.wrapped_tables == WRAPPED_TABLES and options.wrapped == ()
    as_json = json.dumps([{"destination": "/queue/invoices", "table": "invoices"}])
    options = datasource_options(from_flags("--store", POSTGRES.replace("postgresql", "postgres"), "--wrap", as_json))
    assert options.wrapped_tables == WRAPPED_TABLES[1:]


GOOD_WRAP = '[[wrap]]\ndestination = "/queue/jobs"\ncollection = "jobs"\n'
GOOD_TABLE_WRAP = '[[wrap]]\ndestination = "/queue/jobs"\ntable = "jobs"\n'
BAD_CONFIGS = {
    "sqlite store": ('[stompgate]\nstore = "sqlite:///./x.db"\n' + GOOD_WRAP, "needs a MongoDB store"),
    "filter not a table": (f'[stompgate]\nstore = "{MONGO}"\n' + GOOD_WRAP + 'filter = "kind=video"\n', "filter must be a table"),
    "unknown operator": (
        f'[stompgate]\nstore = "{MONGO}"\n' + GOOD_WRAP + 'filter = { "$where" = "this.a > 1" }\n',
        "$where is not a query operator",
    ),
    "topic destination": (
        f'[stompgate]\nstore = "{MONGO}"\n[[wrap]]\ndestination = "/topic/jobs"\ncollection = "jobs"\n',
        "must be a queue",
    ),
    "duplicate destination": (
        f'[stompgate]\nstore = "{MONGO}"\n' + GOOD_WRAP + '[[wrap]]\ndestination = "/queue/jobs"\ncollection = "other"\n',
        "wrapped twice",
    ),
    "unknown key": (f'[stompgate]\nstore = "{MONGO}"\n' + GOOD_WRAP + 'on_ack = "update"\n', "wrap.0.on_ack"),
    "not TOML": ('[stompgate\nstore = "x"\n', "is not valid TOML"),
    "collection and table": (
        f'[stompgate]\nstore = "{POSTGRES}"\n' + GOOD_TABLE_WRAP + 'collection = "jobs"\n',
        "give exactly one of collection (MongoDB) or table (PostgreSQL)",
    ),
    "neither collection nor table": (
        f'[stompgate]\nstore = "{POSTGRES}"\n[[wrap]]\ndestination = "/queue/jobs"\n', "give exactly one of collection"
    ),
    "table on a MongoDB store": (f'[stompgate]\nstore = "{MONGO}"\n' + GOOD_TABLE_WRAP, "a MongoDB store wraps a collection"),
    "collection on a PostgreSQL store": (
        f'[stompgate]\nstore = "{POSTGRES}"\n' + GOOD_WRAP, "a PostgreSQL store wraps a table, not a collection"
    ),
    "lease field in a collection's filter": (
        f'[stompgate]\nstore = "{MONGO}"\n' + GOOD_WRAP + 'filter = { "$or" = [{ _sg_state = "leased" }] }\n',
        "filter.$or[0]._sg_state: fields starting with _sg_ hold the gateway's lease",
    ),
    "key on a collection": (f'[stompgate]\nstore = "{MONGO}"\n' + GOOD_WRAP + 'key = ["_id"]\n', "key and ack_set are for"),
    "unsupported operator on PostgreSQL": (
        f'[stompgate]\nstore = "{POSTGRES}"\n' + GOOD_TABLE_WRAP + 'filter = { tags = { "$size" = 2 } }\n',
        "$size is not an operator a PostgreSQL wrap's filter may use",
    ),
    "operator instead of a column": (
        f'[stompgate]\nstore = "{POSTGRES}"\n' + GOOD_TABLE_WRAP + 'filter = { "$exists" = true }\n',
        "$exists cannot stand for a column",
    ),
    "table named with three parts": (
        f'[stompgate]\nstore = "{POSTGRES}"\n[[wrap]]\ndestination = "/queue/jobs"\ntable = "a.b.c"\n',
        "is not a PostgreSQL table name",
    ),
    "ack_set with an operator": (
        f'[stompgate]\nstore = "{POSTGRES}"\n' + GOOD_TABLE_WRAP + 'ack_set = { n = { "$inc" = 1 } }\n',
        "a column is set to a plain value",
    ),
    "table wrapped twice": (
        f'[stompgate]\nstore = "{POSTGRES}"\n' + GOOD_TABLE_WRAP + '[[wrap]]\ndestination = "/queue/b"\ntable = "jobs"\n',
        "the table 'jobs' is wrapped twice",
    ),
    "the gateway's own table": (
        f'[stompgate]\nstore = "{POSTGRES}"\n[[wrap]]\ndestination = "/queue/jobs"\ntable = "stompgate_messages"\n',
        "one of the gateway's own",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_wrap_is_one_line_on_stderr(case: str, tmp_path: Path) -> None:
    text, phrase = BAD_CONFIGS[case]
    config = tmp_path / "stompgate.toml"
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-c", "from app.cli import main; main()", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("STOMPGATE_")},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stompgate: "), result.stderr
    assert phrase in lines[0]
