"""The committed OpenAPI document: it matches the app, the live app honours it (schemathesis), and a client
generated from it (openapi-python-client) publishes and inspects as a user's SDK would."""

from __future__ import annotations

import base64
import importlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from app.api import install
from app.main import create_app
from app.settings import Settings
from tests.gateway_process import Gateway, start_gateway

ROOT = Path(__file__).resolve().parents[3]
SPEC = ROOT / "openapi" / "openapi.json"


def current_spec() -> dict[str, Any]:
    app = create_app(Settings())
    install(app)
    spec: dict[str, Any] = json.loads(json.dumps(app.openapi()))
    return spec


def test_committed_spec_matches_the_app() -> None:
    committed = json.loads(SPEC.read_text())
    assert committed == current_spec(), "openapi/openapi.json is stale: run `stompgate openapi` and commit the result"


def test_every_error_is_documented_as_problem_json() -> None:
    for path, item in current_spec()["paths"].items():
        for method, operation in item.items():
            assert operation.get("summary") and operation.get("tags"), f"{method} {path}"
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert list(response["content"]) == ["application/problem+json"], f"{method} {path} {status}"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A real ``stompgate serve`` (uvicorn and the TCP listener) on the memory store."""
    gateway = start_gateway(tmp_path_factory.mktemp("live"), "memory://")
    yield gateway
    gateway.stop()


schema = schemathesis.openapi.from_path(SPEC)


@schema.parametrize()
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
def test_live_app_honours_the_spec(case: schemathesis.Case, live: Gateway) -> None:
    case.call_and_validate(
        base_url=live.http_url,
        checks=[
            checks.not_a_server_error,
            checks.status_code_conformance,
            checks.content_type_conformance,
            checks.response_schema_conformance,
            checks.response_headers_conformance,
        ],
        timeout=10,
    )


OPERATIONS = {
    "connections": {"list_connections", "list_subscriptions"},
    "destinations": {"get_destination", "list_destinations", "peek_messages", "publish", "purge_messages"},
    "operations": {"health", "metrics", "ready"},
}


def test_generated_client_publishes_and_inspects(tmp_path: Path, live: Gateway) -> None:
    generator = Path(sys.executable).with_name("openapi-python-client")
    result = subprocess.run(
        [str(generator), "generate", "--path", str(SPEC), "--output-path", str(tmp_path / "sdk"), "--meta", "none"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # The one thing the generator leaves out: it has no text bodies (text goes in an envelope, below).
    output = result.stdout + result.stderr
    warnings = [line for line in output.splitlines() if line.startswith("WARNING") or "Unsupported" in line]
    assert warnings == ["WARNING parsing POST /destinations/{kind}/{name} within destinations.",
                        "Unsupported content type text/plain"], output  # fmt: skip
    package = tmp_path / "sdk"  # --meta none: the output is the package itself
    # Clean names: each operation a module named by its operationId, each answer a named model.
    for tag, operations in OPERATIONS.items():
        assert {p.stem for p in (package / "api" / tag).glob("*.py")} - {"__init__"} == operations
    models_made = {p.stem for p in (package / "models").glob("*.py")}
    assert not {m for m in models_made if "response" in m or m.endswith("_get") or m.endswith("_post")}, models_made
    sys.path.insert(0, str(package.parent))
    try:
        sdk = importlib.import_module(package.name)
        api = SimpleNamespace(
            **{name: importlib.import_module(f"{package.name}.api.{tag}.{name}") for tag, names in OPERATIONS.items() for name in names}
        )
        models = importlib.import_module(f"{package.name}.models")
        types = importlib.import_module(f"{package.name}.types")
        with sdk.Client(base_url=live.http_url) as client:
            use_sdk(client, models, types, api)
    finally:
        sys.path.remove(str(package.parent))
        for name in [m for m in sys.modules if m == package.name or m.startswith(package.name + ".")]:
            del sys.modules[name]


def use_sdk(client: Any, models: Any, types: Any, api: Any) -> None:
    queue = models.DestinationKind.QUEUE
    name = "sdk/eu.orders"  # a name holding '/' travels as %2F and arrives whole
    assert api.health.sync(client=client) == models.Liveness(status="ok")

    # Text, in an envelope (the generator has no text/plain bodies); headers travel in it too.
    envelope = models.PublishEnvelope.from_dict(
        {"headers": {"priority": "8", "app": "sdk", "content-type": "text/plain"}, "body": "from the sdk"}
    )
    published = api.publish.sync(kind=queue, name=name, client=client, body=envelope)
    assert isinstance(published, models.Published), published
    assert published.destination == "/queue/sdk/eu.orders"
    # JSON, raw: stored as sent, with content-type application/json.
    api.publish.sync(kind=queue, name=name, client=client, body=models.JsonObject.from_dict({"order": 7, "lines": [1, 2]}))
    # Bytes, raw: any byte, with content-type application/octet-stream.
    api.publish.sync(kind=queue, name=name, client=client, body=types.File(payload=io.BytesIO(b"\x00\xffraw")))

    info = api.get_destination.sync(kind=queue, name=name, client=client)
    assert isinstance(info, models.DestinationInfo) and info.depth == 3
    listed = api.list_destinations.sync(client=client)
    assert "/queue/sdk/eu.orders" in [d.destination for d in listed]

    text, json_message, raw = api.peek_messages.sync(kind=queue, name=name, client=client)
    assert (text.body, text.headers["content-type"], text.priority) == ("from the sdk", "text/plain", 8)
    assert text.message_id == published.message_id
    assert json.loads(json_message.body) == {"order": 7, "lines": [1, 2]}
    assert json_message.headers["content-type"] == "application/json"
    assert raw.body_encoding == models.QueuedMessageBodyEncoding.BASE64
    assert base64.b64decode(raw.body) == b"\x00\xffraw" and raw.headers["content-type"] == "application/octet-stream"
    selected = api.peek_messages.sync(kind=queue, name=name, client=client, selector="app = 'sdk'")
    assert [m.body for m in selected] == ["from the sdk"]

    problem = api.get_destination.sync_detailed(kind=queue, name="bad name", client=client)
    assert problem.status_code == 400
    assert isinstance(problem.parsed, models.Problem) and problem.parsed.status == 400
    unknown = api.get_destination.sync(kind=queue, name="sdk/never.used", client=client)
    assert isinstance(unknown, models.Problem) and unknown.status == 404
