"""Browser fixtures: headless Chromium and the npm packages (@stomp/stompjs, playwright-core) the tests drive.

In CI (``CI=true``) a missing piece fails the test: ``.ci/services.sh`` installs them, so their absence is a bug.
Elsewhere the tests are skipped with the command that would install what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["BrowserKit"]

HERE = Path(__file__).resolve().parent
CHROMIUM = Path(os.environ.get("STOMPGATE_CHROMIUM", "/usr/bin/chromium"))
NODE_MODULES = HERE / "node_modules"
STOMPJS_BUNDLE = NODE_MODULES / "@stomp" / "stompjs" / "bundles" / "stomp.umd.min.js"


@dataclass
class BrowserKit:
    node: str
    chromium: Path
    stompjs_bundle: Path

    def run(self, script: str, *args: str, timeout: float = 45) -> dict[str, Any]:
        """Run a Node script from this folder; its last stdout line is a JSON report."""
        env = {**os.environ, "CHROMIUM": str(self.chromium)}
        proc = subprocess.run(
            [self.node, str(HERE / script), *args],
            cwd=HERE,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        assert lines, f"{script} printed nothing (exit {proc.returncode}):\n{proc.stderr}"
        try:
            report: dict[str, Any] = json.loads(lines[-1])
        except json.JSONDecodeError:
            raise AssertionError(f"{script} did not end with a JSON report:\n{proc.stdout}\n{proc.stderr}") from None
        report["_exit"] = proc.returncode
        report["_stderr"] = proc.stderr
        return report


def _missing() -> list[str]:
    missing = []
    if shutil.which("node") is None:
        missing.append("node (apt-get install -y nodejs npm)")
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if not STOMPJS_BUNDLE.exists() or not (NODE_MODULES / "playwright-core").exists():
        missing.append(f"{NODE_MODULES} (cd tests/browser && npm ci)")
    return missing


@pytest.fixture(scope="session")
def browser_kit() -> BrowserKit:
    missing = _missing()
    if missing:
        message = "browser test prerequisites missing: " + "; ".join(missing) + " (bash .ci/services.sh installs them)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message)
        pytest.skip(message)
    node = shutil.which("node")
    assert node is not None
    return BrowserKit(node, CHROMIUM, STOMPJS_BUNDLE)
