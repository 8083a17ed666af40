"""The committed OpenAPI document: it matches the app, the live app honours it (schemathesis), and a client
generated from it (openapi-python-client) publishes and inspects as a user's SDK would."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
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


def test_generated_client_publishes_and_inspects(tmp_path: Path, live: Gateway) -> None:
    generator = Path(sys.executable).with_name("openapi-python-client")
    result = subprocess.run(
        [str(generator), "generate", "--path", str(SPEC), "--output-path", str(tmp_path / "sdk"), "--meta", "none"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    package = tmp_path / "sdk"  # --meta none: the output is the package itself
    sys.path.insert(0, str(package.parent))
    try:
        sdk = importlib.import_module(package.name)
        publish = importlib.import_module(f"{package.name}.api.destinations.publish")
        get_destination = importlib.import_module(f"{package.name}.api.destinations.get_destination")
        peek = importlib.import_module(f"{package.name}.api.destinations.peek_messages")
        models = importlib.import_module(f"{package.name}.models")

        with sdk.Client(base_url=live.http_url) as client:
            use_sdk(client, models, publish, get_destination, peek)
    finally:
        sys.path.remove(str(package.parent))
        for name in [m for m in sys.modules if m == package.name or m.startswith(package.name + ".")]:
            del sys.modules[name]


def use_sdk(client: Any, models: Any, publish: Any, get_destination: Any, peek: Any) -> None:
    envelope = models.PublishEnvelope.from_dict({"headers": {"priority": "8", "app": "sdk"}, "body": "from the sdk"})
    published = publish.sync(kind=models.DestinationKind.QUEUE, name="sdk.orders", client=client, body=envelope)
    assert isinstance(published, models.Published), published
    assert published.destination == "/queue/sdk.orders"

    info = get_destination.sync(kind=models.DestinationKind.QUEUE, name="sdk.orders", client=client)
    assert info is not None and info.depth == 1

    messages = peek.sync(kind=models.DestinationKind.QUEUE, name="sdk.orders", client=client, selector="app = 'sdk'")
    assert isinstance(messages, list) and [m.body for m in messages] == ["from the sdk"]
    assert messages[0].message_id == published.message_id

    problem = get_destination.sync_detailed(kind=models.DestinationKind.QUEUE, name="bad name", client=client)
    assert problem.status_code == 400
    assert isinstance(problem.parsed, models.Problem) and problem.parsed.status == 400
