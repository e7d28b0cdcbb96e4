"""No import cycles in delivery_executor: runtime, lazy and TYPE_CHECKING imports alike."""

from __future__ import annotations

import ast
from pathlib import Path

import delivery_executor

PACKAGE = Path(delivery_executor.__file__).parent


def _module_names(root: Path) -> dict[str, Path]:
    """Dotted name → file for every module under the package directory ``root``.

    A compiled module counts by its stub (``.pyi``), which imports nothing.
    """
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out.setdefault(".".join(parts), path)  # a .py (sorted first) wins over its stub
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that the module ``name`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()

    def add(target: str, names: list[str]) -> None:
        for sub in names:  # `from pkg import module` imports that module
            if f"{target}.{sub}" in known:
                found.add(f"{target}.{sub}")
                continue
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, [""])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            add(target, [a.name for a in node.names])
    found.discard(name)
    return found


def _graph(root: Path) -> dict[str, set[str]]:
    modules = _module_names(root)
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path back to its start) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_around(graph, group) for group in groups]


def _path_around(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A concrete cycle inside ``group``: start → ... → start."""
    start = min(group)
    seen = {start: [start]}
    todo = [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & group):
            if w == start:
                return [*seen[v], start]
            if w not in seen:
                seen[w] = [*seen[v], w]
                todo.append(w)
    raise AssertionError(f"no cycle through {start}")


def test_the_package_has_no_import_cycle() -> None:
    """No module of delivery_executor imports, through any chain, a module that imports it."""
    graph = _graph(PACKAGE)
    assert len(graph) > 50 and "delivery_executor.server.core" in graph
    assert "delivery_executor.executor" in graph["delivery_executor.server.core"]
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_check_finds_cycles_of_every_import_kind(tmp_path: Path) -> None:
    """A TYPE_CHECKING, lazy, absolute or relative import closing a loop is reported, named."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
    )
    (pkg / "b.py").write_text("def f():\n    import pkg.sub.c\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    (pkg / "d.py").write_text("from .sub import c\n")
    cycles = _cycles(_graph(pkg))
    assert cycles == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
