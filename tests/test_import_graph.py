"""No import circles anywhere in medserve (issue 26).

The graph is built from the source files with `ast`, never by importing them: every `import`
and `from ... import` statement counts, including those inside functions and under
`TYPE_CHECKING` (a lazy import that dodges a circle at run time still means two modules that
each need the other, which is what a newcomer cannot untangle). Relative imports are resolved
against the importing module's package; `from pkg import name` is an edge to `pkg.name` when
that is a module, else to the package. A package's `__init__` is not an implicit dependency of
its submodules (Python initialises a parent first, which is never a circle of ours).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The top-level folders are the subpackages of the `medserve` namespace (pyproject.toml's package-dir).
PACKAGES = {"protos": "medserve.protos", "server": "medserve.server", "exporters": "medserve.exporters",
            "clients": "medserve.clients", "perf": "medserve.perf"}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of every medserve package."""
    modules: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            if any(p.startswith(".") or p == "__pycache__" for p in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(name: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The medserve modules `name` (at `path`) imports, anywhere in its body."""
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        # The module itself or, for `import a.b.c` of something that is not a module, its nearest module.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("medserve."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if not source.startswith("medserve."):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in modules else source)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module (Tarjan), as one circle through
    it: the smallest cycle from its first module, so the failure names a path to cut."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(start: str) -> None:
        # Iterative Tarjan: no recursion limit however deep the graph.
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_shortest_circle(graph, set(c)) for c in sorted(components)]


def _shortest_circle(graph: Mapping[str, set[str]], members: set[str]) -> list[str]:
    start = min(members)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    return [*paths[node], start]
                if child not in paths:
                    paths[child] = [*paths[node], child]
                    following.append(child)
        frontier = following
    raise AssertionError(f"no circle through {start}")  # a component of >1 always has one


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in found)


# The test above is only as good as the graph: these check that the graph sees what it must.


def _tree(tmp_path: Path, files: Mapping[str, str]) -> dict[str, set[str]]:
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    for folder in PACKAGES:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "__init__.py").touch()
    return import_graph(tmp_path)


@pytest.mark.parametrize(
    ("files", "circle"),
    [
        pytest.param(  # relative `from .x import y`, both ways
            {"server/a.py": "from .b import f\n", "server/b.py": "from .a import g\n"},
            ["medserve.server.a", "medserve.server.b", "medserve.server.a"],
            id="relative",
        ),
        pytest.param(  # one side imports lazily inside a function (what gate.py did)
            {"server/a.py": "def f():\n    from .b import g\n", "server/b.py": "from medserve.server import a\n"},
            ["medserve.server.a", "medserve.server.b", "medserve.server.a"],
            id="inside-a-function",
        ),
        pytest.param(  # one side only for the type checker (what exporters/errors.py did)
            {"exporters/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import C\n",
             "exporters/b.py": "from . import a\n"},
            ["medserve.exporters.a", "medserve.exporters.b", "medserve.exporters.a"],
            id="type-checking",
        ),
        pytest.param(  # across packages, three long, `..` from a subpackage
            {"server/batching/__init__.py": "", "server/batching/p.py": "from ..errors import E\n",
             "server/errors.py": "import medserve.exporters.x\n", "exporters/x.py": "from medserve.server.batching import p\n"},
            ["medserve.exporters.x", "medserve.server.batching.p", "medserve.server.errors", "medserve.exporters.x"],
            id="three-packages",
        ),
    ],
)
def test_graph_finds_the_circle(tmp_path: Path, files: dict[str, str], circle: list[str]) -> None:
    assert cycles(_tree(tmp_path, files)) == [circle]


def test_graph_without_a_circle(tmp_path: Path) -> None:
    graph = _tree(tmp_path, {
        "server/batching/__init__.py": "from .driver import Batcher\n",
        "server/batching/driver.py": "from . import policy\nfrom .. import errors\n",
        "server/batching/policy.py": "import numpy\n",
        "server/errors.py": "",
    })
    assert graph["medserve.server.batching.driver"] == {"medserve.server.batching.policy", "medserve.server.errors"}
    assert graph["medserve.server.batching"] == {"medserve.server.batching.driver"}
    assert cycles(graph) == []


def test_graph_covers_the_packages() -> None:
    graph = import_graph()
    for module in ("medserve.server.gate", "medserve.server.status", "medserve.exporters.text",
                   "medserve.exporters.api", "medserve.protos.wire", "medserve.clients.client"):
        assert module in graph
    assert "medserve.server.errors" in graph["medserve.server.status"]
