"""The TypeScript client browsers and Node users generate from the committed OpenAPI document: openapi-typescript
writes the types, ``client_check.ts`` calls the API through openapi-fetch, ``tsc --strict`` checks that code against
the generated types, and Node runs it against a live gateway: publish text, JSON, bytes and an envelope, list
destinations, inspect one, peek at its backlog with a selector, and read a problem document.

The npm packages are pinned by package-lock.json here; ``.ci/services.sh`` installs them. In CI their absence fails
the test; elsewhere it is skipped with the command that would install them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway_process import Gateway, start_gateway

HERE = Path(__file__).resolve().parent
SPEC = HERE.parents[1] / "openapi" / "openapi.json"
NODE_MODULES = HERE / "node_modules"
TOOLS = {
    "openapi-typescript": NODE_MODULES / "openapi-typescript" / "bin" / "cli.js",
    "tsc": NODE_MODULES / "typescript" / "bin" / "tsc",
    "openapi-fetch": NODE_MODULES / "openapi-fetch" / "package.json",
}
TSCONFIG = {
    "compilerOptions": {
        "target": "ES2022", "module": "NodeNext", "moduleResolution": "NodeNext", "strict": True,
        "noUncheckedIndexedAccess": True, "skipLibCheck": False, "outDir": "out", "types": ["node"],
    },
    "files": ["client_check.ts"],
}  # fmt: skip


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    missing = [str(path) for path in TOOLS.values() if not path.exists()]
    if node is None or missing:
        message = f"TypeScript client prerequisites missing: {'node; ' if node is None else ''}{', '.join(missing)} " \
            "(cd tests/typescript_client && npm ci; bash .ci/services.sh installs them)"  # fmt: skip
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message)
        pytest.skip(message)
    return node


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("live"), "memory://")
    yield gateway
    gateway.stop()


def run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_generated_typescript_client_against_a_live_gateway(node: str, live: Gateway, tmp_path: Path) -> None:
    (tmp_path / "node_modules").symlink_to(NODE_MODULES)
    (tmp_path / "package.json").write_text(json.dumps({"type": "module"}))
    (tmp_path / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    shutil.copy(HERE / "client_check.ts", tmp_path)
    run([node, str(TOOLS["openapi-typescript"]), str(SPEC), "-o", str(tmp_path / "schema.d.ts")], tmp_path)
    run([node, str(TOOLS["tsc"]), "-p", str(tmp_path)], tmp_path)  # the user's code fits the generated types
    output = run([node, str(tmp_path / "out" / "client_check.js"), live.http_url], tmp_path)
    report: dict[str, Any] = json.loads(output.strip().splitlines()[-1])

    assert report["ok"], report
    assert report["health"] == "ok"
    assert report["published"] == [201, 201, 201, 201]
    assert report["publishedTo"] == "/queue/ts/eu.orders"
    assert "/queue/ts/eu.orders" in report["listed"]
    assert report["depth"] == 4
    text, json_message, raw, envelope = report["messages"]
    assert text == {"body": "from typescript", "encoding": "utf-8", "contentType": "text/plain", "priority": 8}
    assert json.loads(json_message["body"]) == {"order": 7, "lines": [1, 2]}
    assert json_message["contentType"] == "application/json"
    assert (raw["encoding"], raw["contentType"]) == ("base64", "application/octet-stream")
    assert base64.b64decode(raw["body"]) == b"\x00\xffraw"
    assert (envelope["encoding"], base64.b64decode(envelope["body"])) == ("base64", b"\xff\x01")
    assert report["firstMessageId"] == report["textMessageId"]
    assert report["selected"] == ["from typescript"]
    assert report["unknownStatus"] == 404
    assert report["unknownType"] == "urn:stompgate:problem:unknown-destination"
    assert report["unknownContentType"] == "application/problem+json"
