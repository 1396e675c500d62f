"""The package's layer order (DESIGN.md): each module imports only layers listed above it, no cycles.

Every ``import`` counts, those inside functions too (a function-level import hides a cycle, it
does not remove it). The package ``__init__`` (public re-exports) is the only exception.
"""

from __future__ import annotations

import ast
from pathlib import Path

import boft_diffusion

PACKAGE = Path(boft_diffusion.__file__).parent

LAYERS = [
    "atomic",  # utility: imports nothing from the package
    "functional",
    "config",
    "layers",
    "inject",
    "families",
    "pipeline",
    "control",
    "io",
    "export",
    "world",
    "tiny",
    "data",
    "metrics",
    "training",
    "recipes",
    "benchmark",
    "commands",
    "cli",
]
"""DESIGN.md's layers, top (imported by everything below) to bottom; a module's layer is its first name."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> list[str]:
    """Package-relative names imported by ``node`` (``from ..io import x`` -> ``io``, ``io.x``)."""
    if node.level == 0:
        if not (node.module or "").startswith("boft_diffusion"):
            return []
        base = node.module.split(".")[1:]
    else:
        here = module.split(".") if module else []
        keep = len(here) - node.level + (1 if is_package else 0)
        base = here[:keep] + (node.module.split(".") if node.module else [])
    names = [".".join(base)] if base else []
    names += [".".join([*base, alias.name]) for alias in node.names]
    return names


def import_graph() -> dict[str, set[str]]:
    """``{module: package modules it imports}`` for every module of the package (``__init__`` aside)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        if not module:
            continue
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                found.update(_resolve(module, node, path.name == "__init__.py"))
            elif isinstance(node, ast.Import):
                found.update(
                    a.name.split(".", 1)[1] for a in node.names if a.name.startswith("boft_diffusion.")
                )
        graph[module] = {m for m in found if m in files and m and m != module}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[0]
    assert top in LAYERS, f"{module}: not in DESIGN.md's layer list; add its layer to DESIGN.md and here"
    return LAYERS.index(top)


def test_no_module_imports_a_layer_below_it():
    upward = [
        f"{module} -> {imported}"
        for module, imports in import_graph().items()
        for imported in imports
        if _layer(imported) > _layer(module)
    ]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = import_graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            # A package imports its own submodules (re-exports); those edges are not dependencies.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert graph, "no module found"
    assert "io.format" in graph["io.load"]  # a module-level relative import is resolved
