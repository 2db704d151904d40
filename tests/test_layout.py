"""The layout keeps its promises: no import cycle, the client side never imports the
worker side, and only ``green`` knows which hub runs.

Imports are read with :mod:`ast` from every module of the package: at module level
and inside functions (a lazy import is still a run-time edge), but not under
``if TYPE_CHECKING:``.  Importing ``greenworker.backends.base`` also runs
``greenworker/backends/__init__.py``, so an import is an edge to every package
``__init__`` on the way to its module too.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "greenworker"


#: The client side's only run-time imports of the worker side, each inside a function:
#: ``App.Worker()`` builds a worker, the App publishes through the native Redis
#: publisher (client-side publishing that lives with the Redis transport code), and
#: the embedded default's connection names the LMDB transport to kombu.
ALLOWED_CLIENT_EDGES = {
    ("greenworker.client.app", "greenworker.worker.worker"),
    ("greenworker.client.app", "greenworker.transport.redis_publisher"),
    ("greenworker.client.app", "greenworker.transport.lmdb_transport"),
}
CLIENT_SIDE = ("greenworker.client", "greenworker.backends")
WORKER_SIDE = ("greenworker.worker", "greenworker.control", "greenworker.transport")

#: The only modules that may import a hub (``import gevent``, ``from eventlet import``...).
HUB_MODULES = {"greenworker.green", "greenworker.gevent_resolver"}
HUBS = ("gevent", "eventlet")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    lineno: int
    lazy: bool  # inside a function


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str, known: dict[str, Path]) -> bool:
    """A package, with an ``__init__`` or without (a directory of modules)."""
    return any(other.startswith(name + ".") for other in known)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(tree: ast.Module, *, type_checking: bool) -> Iterator[tuple[ast.stmt, bool]]:
    """Every import statement and whether it is inside a function; with ``type_checking``
    False, not those under ``if TYPE_CHECKING:`` (its ``else:`` branch counts)."""

    def walk(nodes: list[ast.stmt], lazy: bool) -> Iterator[tuple[ast.stmt, bool]]:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node, lazy
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                if type_checking:
                    yield from walk(node.body, lazy)
                yield from walk(node.orelse, lazy)
            else:
                inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        stmts = [c for c in children if isinstance(c, ast.stmt)]
                        for child in children:  # except handlers and match cases hold bodies
                            if isinstance(child, ast.ExceptHandler | ast.match_case):
                                stmts.extend(child.body)
                        yield from walk(stmts, inner)

    yield from walk(tree.body, False)


def imported_names(node: ast.stmt, source: str, source_is_package: bool) -> list[str]:
    """The absolute dotted names an import statement names (module or module.attr)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        package = source.split(".") if source_is_package else source.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        prefix = ".".join([*base, *([node.module] if node.module else [])])
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" if alias.name != "*" else prefix for alias in node.names]


def _with_packages(name: str, source: str) -> list[str]:
    """``name`` and the packages whose ``__init__`` runs before it, except the source's
    own packages (they are initialised before the source itself runs)."""
    parts = name.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    own = {".".join(source.split(".")[:i]) for i in range(1, source.count(".") + 2)}
    return [n for n in chain[:-1] if n not in own] + [name]


def edges(known: dict[str, Path] | None = None) -> list[Edge]:
    """Every run-time import edge between the package's modules."""
    known = modules() if known is None else known
    found: list[Edge] = []
    for source, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        source_is_package = path.name == "__init__.py"
        for node, lazy in imports(tree, type_checking=False):
            for name in imported_names(node, source, source_is_package):
                if not name.startswith("greenworker"):
                    continue
                # ``from pkg import thing``: the module pkg.thing, else a name of pkg
                module = name
                from_a_package = isinstance(node, ast.ImportFrom) and name not in known
                if from_a_package and not is_package(name, known):
                    module = name.rpartition(".")[0]
                for target in _with_packages(module, source):
                    if target in known and target != source:
                        found.append(Edge(source, target, node.lineno, lazy))
    return found


def cycles(found: list[Edge]) -> list[list[str]]:
    """One cycle path per strongly connected component of more than one module."""
    graph: dict[str, set[str]] = {}
    for edge in found:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan; the package is small enough to recurse
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_path(component, graph) for component in components]


def _cycle_path(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                return [*paths[node], start]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover


def _describe(path: list[str], found: list[Edge]) -> str:
    lines = {(e.source, e.target): e for e in found}
    steps = []
    for source, target in itertools.pairwise(path):
        edge = lines[(source, target)]
        where = f"{source.replace('.', '/')}.py:{edge.lineno}{' (lazy)' if edge.lazy else ''}"
        steps.append(f"  {source} -> {target}   [{where}]")
    return "\n".join(steps)


# ---------------------------------------------------------------------------- tests


def test_there_is_no_import_cycle() -> None:
    found = edges()
    found_cycles = list(cycles(found))
    assert not found_cycles, "import cycle(s):\n" + "\n\n".join(
        " -> ".join(path) + "\n" + _describe(path, found) for path in found_cycles
    )


def _allowed(edge: Edge) -> bool:
    """An allowed edge, or the edge to a package ``__init__`` on the way to one."""
    return any(
        source == edge.source and (target == edge.target or target.startswith(edge.target + "."))
        for source, target in ALLOWED_CLIENT_EDGES
    )


def test_the_client_side_never_imports_the_worker_side() -> None:
    wrong = []
    for edge in edges():
        if not edge.source.startswith(CLIENT_SIDE) or not edge.target.startswith(WORKER_SIDE):
            continue
        if edge.lazy and _allowed(edge):
            continue
        where = "in a function" if edge.lazy else "at module level"
        wrong.append(f"{edge.source} imports {edge.target} {where} (line {edge.lineno})")
    assert not wrong, "\n".join(wrong)


def test_the_allowed_client_edges_are_still_there() -> None:
    # if one goes away, take it out of ALLOWED_CLIENT_EDGES: the list stays exact
    present = {(e.source, e.target) for e in edges() if e.lazy}
    assert present >= ALLOWED_CLIENT_EDGES, ALLOWED_CLIENT_EDGES - present


def test_only_green_imports_a_hub() -> None:
    wrong = []
    for name, path in modules().items():
        if name in HUB_MODULES:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node, _ in imports(tree, type_checking=True):  # a type-only import counts too
            if isinstance(node, ast.ImportFrom) and node.level:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                assert isinstance(node, ast.ImportFrom)
                targets = [node.module or ""]
            for target in targets:
                if target.split(".")[0] in HUBS:
                    wrong.append(f"{name} imports {target} (line {node.lineno})")
    assert not wrong, "only greenworker.green may import a hub:\n" + "\n".join(wrong)


def test_every_package_directory_has_an_init() -> None:
    # setuptools' ``packages = find:`` leaves a directory without one out of the wheel
    missing = {
        str(directory.relative_to(PACKAGE.parent))
        for directory in [PACKAGE, *PACKAGE.rglob("*")]
        if directory.is_dir()
        and directory.name != "__pycache__"
        and any(directory.glob("*.py"))
        and not (directory / "__init__.py").exists()
    }
    assert not missing, f"no __init__.py in {sorted(missing)}"


# ------------------------------------------------------------- the checker itself


def _fake_package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    known = {}
    for relative, text in files.items():
        path = tmp_path / "greenworker" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        parts = ["greenworker", *Path(relative).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        known[".".join(parts)] = path
    return known


def test_the_checker_finds_a_lazy_cycle_through_a_package_init(tmp_path: Path) -> None:
    known = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from .pkg.b import thing\n",
            "pkg/__init__.py": "from .c import other\n",
            "pkg/b.py": "thing = 1\n",
            "pkg/c.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from ..d import ignored\n"
                "def f():\n    from .. import a\n"
            ),
            "d.py": "from .pkg import c\n",
        },
    )
    found = edges(known)
    pairs = {(e.source, e.target) for e in found}
    assert ("greenworker.a", "greenworker.pkg") in pairs  # the package __init__ runs first
    assert ("greenworker.pkg.c", "greenworker.a") in pairs  # lazy, and a module of ``..``
    assert ("greenworker.pkg.c", "greenworker.d") not in pairs  # type-only
    found_cycles = cycles(found)
    assert [set(path) for path in found_cycles] == [
        {"greenworker.a", "greenworker.pkg", "greenworker.pkg.c"}
    ]
    assert found_cycles[0][0] == found_cycles[0][-1]
