"""The package's layers as docs/architecture.md lists them: each module imports only the layers its row
names (all above it), no cycles, nothing from the package root.

Every ``import`` counts, those inside functions too (a function-level import hides a cycle, it
does not remove it). The package ``__init__`` (public re-exports) is the only exception.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import boft_diffusion

PACKAGE = Path(boft_diffusion.__file__).parent
DOCUMENT = PACKAGE.parent / "docs" / "architecture.md"


def _documented_layers() -> dict[str, set[str]]:
    """``{layer: layers it may import}`` from the document's table, in its order (ground floor first)."""
    rows = {}
    for line in DOCUMENT.read_text(encoding="utf-8").splitlines():
        found = re.match(r"\| `(\w+)` \|.*\| ([^|]*) \|$", line)
        if found:
            layer, allowed = found.groups()
            rows[layer] = set(re.findall(r"`(\w+)`", allowed))
    return rows


DOCUMENTED = _documented_layers()
LAYERS = list(DOCUMENTED)
"""The document's layers, ground floor (imported by everything above it) first."""


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package).with_suffix("").parts)
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
    assert top in LAYERS, f"{module}: not in docs/architecture.md; add a row for its layer"
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


def test_the_document_lists_every_layer_and_only_names_layers_below():
    assert LAYERS, f"no layer rows found in {DOCUMENT}"
    here = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    here |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert here == set(LAYERS), (
        f"in the package, not the document: {sorted(here - set(LAYERS))}; "
        f"in the document, not the package: {sorted(set(LAYERS) - here)}"
    )
    wrong = {
        layer: sorted(a for a in allowed if a not in LAYERS[: LAYERS.index(layer)])
        for layer, allowed in DOCUMENTED.items()
    }
    assert not any(wrong.values()), f"rows naming layers that are not below them: {wrong}"


def test_every_import_is_one_the_document_allows():
    found = [
        f"{module} -> {imported}"
        for module, imports in import_graph().items()
        for imported in imports
        if (top := imported.split(".")[0]) != module.split(".")[0]
        and top not in DOCUMENTED[module.split(".")[0]]
    ]
    assert not found, (
        "imports docs/architecture.md does not allow (add them to the row, or remove them):\n"
        + ("\n".join(sorted(found)))
    )


def root_imports(package: Path = PACKAGE) -> list[str]:
    """Imports of the package root's own names inside the package (``from boft_diffusion import x``,
    ``from .. import x`` reaching the root, ``import boft_diffusion``), submodules aside."""
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    found = []
    for module, path in files.items():
        if not module:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [f"{module}: import {a.name}" for a in node.names if a.name == "boft_diffusion"]
            elif isinstance(node, ast.ImportFrom):
                is_package = path.name == "__init__.py"
                depth = len(module.split(".")) - (1 if is_package else 0)
                at_root = (node.level == 0 and node.module == "boft_diffusion") or (
                    node.level > 0 and node.module is None and node.level - (1 if is_package else 0) >= depth
                )
                if at_root:
                    found += [
                        f"{module}: from the root import {a.name}" for a in node.names if a.name not in files
                    ]
    return found


def test_nothing_in_the_package_imports_from_its_root():
    found = root_imports()
    assert not found, "import from the module that owns the name, not the package root:\n" + "\n".join(found)


def test_root_imports_are_seen(tmp_path):
    """The check above finds the three spellings (in a copy of the package with one of each added)."""
    import shutil

    copy = tmp_path / "boft_diffusion"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("weights", "__pycache__"))
    (copy / "commands" / "zz_probe.py").write_text(
        "from .. import load_boft_weights\nfrom boft_diffusion import merge_boft\nimport boft_diffusion\n"
        "from .. import tiny\nfrom ..io import read_adapter\n"
    )
    assert sorted(root_imports(copy)) == [
        "commands.zz_probe: from the root import load_boft_weights",
        "commands.zz_probe: from the root import merge_boft",
        "commands.zz_probe: import boft_diffusion",
    ]
