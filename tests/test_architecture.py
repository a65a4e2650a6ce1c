"""The import graph of the package: integrations depend on the core, never the reverse, and there is no circle.

Every ``from .x import`` / ``from ..x import`` in peftlite, at module level or inside a function, is an edge.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peftlite"
INTEGRATIONS = {"peftlite.hf", "peftlite.trl", "peftlite.training", "peftlite.cli", "peftlite.__main__"}
SURFACE = {"peftlite"}  # __init__: the public names; it imports the integrations so they register their events


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules of peftlite that ``path`` imports (a package's ``__init__`` stands for the package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` may name a submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                          or (PACKAGE.parent / Path(*sub.split(".")) / "__init__.py").exists() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("peftlite")}
    return found - {name}


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("module", sorted(set(GRAPH) - INTEGRATIONS - SURFACE))
def test_the_core_never_imports_an_integration(module):
    assert not GRAPH[module] & INTEGRATIONS, f"{module} imports {sorted(GRAPH[module] & INTEGRATIONS)}"


def test_there_is_no_import_circle():
    edges = {m: {t for t in targets if t in GRAPH} for m, targets in GRAPH.items() if m not in SURFACE}
    state, circles = {}, []

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)
