"""The dependency rules of docs/architecture.md, checked by walking every module's imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = (
    "app.datasources.memory", "app.datasources.sqlite", "app.datasources.mongodb", "app.datasources.postgresql",
    "app.datasources.redis",
)  # fmt: skip


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
                # ``from app.datasources import rules`` imports the module app.datasources.rules
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                if all(_is_module(m) for m in submodules):
                    found.update(submodules)
                else:
                    found.add(node.module)
    return found


def _is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


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


# The shared layer every backend builds on: the contract, the delivery rules with their store forms, wake-ups, and
# selector scans. It imports nothing but the contract, so a new backend is its storage primitives on top of it.
SHARED = (
    "app.datasources.interface", "app.datasources.rules", "app.datasources.wakeups", "app.datasources.scanning",
    "app.datasources.failover", "app.datasources.sql_rows",
)
BACKEND_PACKAGES = ("app.datasources.sqlite", "app.datasources.mongodb", "app.datasources.postgresql", "app.datasources.redis")


@pytest.mark.parametrize("path", [ROOT / (m.replace(".", "/") + ".py") for m in SHARED], ids=lambda p: p.name)
def test_the_shared_layer_imports_only_the_contract(path: Path) -> None:
    for name in imports_of(path):
        if _under(name, "app"):
            assert name == "app.datasources.interface", f"{path.name} imports {name}"


@pytest.mark.parametrize(
    "path",
    [p for p in modules("app.datasources") if module_name(p) not in {*SHARED, "app.datasources.registry", "app.datasources"}],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_a_backend_imports_only_the_shared_layer_and_its_driver(path: Path) -> None:
    name_of = module_name(path)
    own = next((pkg for pkg in BACKEND_PACKAGES if _under(name_of, pkg)), name_of)
    for name in imports_of(path):
        if _under(name, "app"):
            assert name in SHARED or _under(name, own), f"{path} imports {name}"


# The MongoDB baseline benchmark measures the backend's own datastore operations without the gateway, so it reuses the
# backend's document shape on purpose: the one module outside the datasources allowed to name a backend.
BACKEND_BENCHMARKS = {ROOT / "app" / "bench" / "baseline.py"}


def test_only_the_registry_names_backends() -> None:
    for path in ROOT.joinpath("app").rglob("*.py"):
        if path.parent.name == "datasources" and path.stem in {"registry", "memory"} or {"mongodb", "sqlite", "postgresql", "redis"} & set(path.parts):
            continue
        if path in BACKEND_BENCHMARKS:
            continue
        for name in imports_of(path):
            assert not _under(name, BACKENDS), f"{path} imports {name}"


# ---- the import graph of app/ has no cycle ----
#
# Every import between two modules of app/ is an edge, wherever it stands: at the top, inside a function, or under
# ``if TYPE_CHECKING:`` (a cycle hidden from the interpreter is still a cycle in the design). The broker's layers are
# one-way: broker -> session -> subscriptions -> ports (docs/architecture.md).

# Cycles known and accepted, each as the set of modules of its strongly connected component, with the reason. Empty.
ALLOWED_CYCLES: dict[frozenset[str], str] = {}


def app_modules() -> dict[str, Path]:
    return {module_name(path): path for path in modules("app")}


def app_imports(path: Path, known: set[str]) -> set[str]:
    """The app modules ``path`` imports: ``from a.b import c`` names ``a.b.c`` when that is a module, else ``a.b``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in candidates:
            while name and name not in known:  # ``import app.x.y`` of a name that is not a module: its package
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    found.discard(module_name(path))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = app_modules()
    known = set(paths)
    return {name: app_imports(path, known) for name, path in paths.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of more than one module (an import cycle each)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest cycle through the first module of ``component``, as the path of imports back to it."""
    members = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a component always has one


def test_the_import_graph_of_app_has_no_cycle() -> None:
    graph = import_graph()
    cycles = [c for c in strongly_connected(graph) if frozenset(c) not in ALLOWED_CYCLES]
    report = "\n".join(
        " -> ".join(a_cycle(graph, c))
        + "\n    every import inside that cycle: "
        + ", ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a] & set(c)))
        for c in cycles
    )
    assert not cycles, f"import cycles in app/ (TYPE_CHECKING imports included):\n{report}"


def test_the_broker_layers_import_one_way() -> None:
    """broker -> session -> subscriptions -> ports: no module imports one above it, not even for type checking."""
    graph = import_graph()
    layers = ["app.broker.broker", "app.broker.session", "app.broker.subscriptions", "app.broker.ports"]
    for i, lower in enumerate(layers):
        for higher in layers[:i]:
            assert higher not in graph.get(lower, set()), f"{lower} imports {higher}"


def test_the_cycle_check_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert a_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
