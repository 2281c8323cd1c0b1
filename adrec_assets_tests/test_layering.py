"""The house's rules, read from the code's own imports: no import loops, Dagster only in the
shell, and no layer importing one above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adrec_assets"
#: The plain core: never Dagster (the shell and the asset modules are its only users).
PLAIN = ("ml", "sources", "online", "abtest", "settings", "privacy", "storage", "artifacts", "snapshots", "recommender")
#: layer -> what it must never import (a lower layer importing a higher one).
NEVER = {
    "settings": ("adrec_assets",),
    "ml": ("adrec_assets.online", "adrec_assets.assets", "adrec_assets.abtest", "adrec_assets.sources",
           "adrec_assets.snapshots", "adrec_assets.recommender", "adrec_assets.resources"),
    "sources": ("adrec_assets.online", "adrec_assets.assets", "adrec_assets.abtest", "adrec_assets.snapshots"),
    "abtest": ("adrec_assets.online", "adrec_assets.assets"),
    "online": ("adrec_assets.assets", "adrec_assets.resources", "adrec_assets.definitions"),
    "snapshots": ("adrec_assets.online", "adrec_assets.assets", "adrec_assets.ml.evaluation", "adrec_assets.recommender"),
    "artifacts": ("adrec_assets.online", "adrec_assets.assets", "adrec_assets.abtest", "adrec_assets.snapshots"),
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules ``path`` imports; ``top_level_only``: those run at import time (not inside a
    function, not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    nodes: list[ast.AST] = []
    if top_level_only:
        stack = list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                stack.extend(node.orelse)
            elif isinstance(node, ast.If | ast.Try | ast.With):
                stack.extend(ast.iter_child_nodes(node))
            elif isinstance(node, ast.Import | ast.ImportFrom):
                nodes.append(node)
    else:
        nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    """module -> the modules it imports; an import of a module's own ancestor package (``from
    adrec_assets.online.api import deps`` inside ``api/app.py``) names a sibling, not a loop."""
    return {name: {m for m in _imports(path, top_level_only) if m in MODULES and m != name
                   and not name.startswith(m + ".")}
            for name, path in MODULES.items()}  # fmt: skip


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_loops():
    """Not even through imports made inside functions: a loop is a loop for the reader."""
    assert _cycles(_graph(top_level_only=False)) == []


@pytest.mark.parametrize("layer", PLAIN)
def test_the_plain_core_never_imports_dagster(layer):
    for name, path in MODULES.items():
        if name == f"adrec_assets.{layer}" or name.startswith(f"adrec_assets.{layer}."):
            assert not any(m == "dagster" or m.startswith("dagster.") for m in _imports(path, False)), name


@pytest.mark.parametrize("layer", sorted(NEVER))
def test_no_layer_imports_one_above_it(layer):
    offenders = {}
    for name, path in MODULES.items():
        if name == f"adrec_assets.{layer}" or name.startswith(f"adrec_assets.{layer}."):
            bad = sorted(m for m in _imports(path, False) if any(m == f or m.startswith(f + ".") for f in NEVER[layer]))
            if bad:
                offenders[name] = bad
    assert not offenders, offenders
