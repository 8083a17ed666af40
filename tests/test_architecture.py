"""The dependency rules of DESIGN §1, checked by walking every module's imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("app.datasources.memory", "app.datasources.sqlite", "app.datasources.mongodb")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


def _under(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", modules("stomp_core"), ids=lambda p: p.name)
def test_stomp_core_is_sans_io_and_standalone(path: Path) -> None:
    for name in imports_of(path):
        top = name.split(".")[0]
        assert top in sys.stdlib_module_names or top == "stomp_core" or top == "__future__", f"{path.name} imports {name}"
        assert top not in {"asyncio", "socket", "time", "selectors", "ssl", "app"}, f"{path.name} imports {name}"


@pytest.mark.parametrize("path", modules("app.broker"), ids=lambda p: p.name)
def test_broker_never_imports_a_backend_a_route_or_a_transport(path: Path) -> None:
    for name in imports_of(path):
        assert not _under(name, BACKENDS + ("app.api", "app.transports", "app.main", "app.cli")), f"{path.name} imports {name}"


@pytest.mark.parametrize("path", [*modules("app.api"), *modules("app.transports")], ids=lambda p: p.name)
def test_routes_and_transports_never_import_a_backend(path: Path) -> None:
    for name in imports_of(path):
        assert not _under(name, BACKENDS), f"{path.name} imports {name}"


@pytest.mark.parametrize(
    "path",
    [p for p in modules("app.datasources") if p.stem not in {"interface", "registry", "__init__"} or p.parent.name == "mongodb"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_a_backend_imports_only_the_interface_and_its_driver(path: Path) -> None:
    own = module_name(path).rpartition(".")[0] if path.parent.name == "mongodb" else module_name(path)
    for name in imports_of(path):
        if _under(name, "app"):
            assert name == "app.datasources.interface" or _under(name, own) or _under(name, "app.datasources.mongodb") and _under(own, "app.datasources.mongodb"), f"{path} imports {name}"


# The MongoDB baseline benchmark measures the backend's own datastore operations without the gateway, so it reuses the
# backend's document shape on purpose: the one module outside the datasources allowed to name a backend.
BACKEND_BENCHMARKS = {ROOT / "app" / "bench" / "baseline.py"}


def test_only_the_registry_names_backends() -> None:
    for path in ROOT.joinpath("app").rglob("*.py"):
        if path.parent.name == "datasources" and path.stem in {"registry", "memory", "sqlite"} or "mongodb" in path.parts:
            continue
        if path in BACKEND_BENCHMARKS:
            continue
        for name in imports_of(path):
            assert not _under(name, BACKENDS), f"{path} imports {name}"
