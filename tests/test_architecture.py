"""The harness's layering (docs/ARCHITECTURE.md), read from the source: every import, function-local ones
included, points down the layers; no import circle between modules; no private name crosses a module."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top (`harness` is its empty package file): a module may import from its own layer (no circle) or from a layer below.
LAYERS = ["harness", "harness.errors", "harness.data", "harness.core", "methods", "harness.config", "harness.tracking",
          "harness.run", "harness.sweep"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = list((ROOT / "harness").rglob("*.py")) + list((ROOT / "methods").rglob("*.py"))
    return {_module_name(p): p for p in files}


MODULES = _modules()


def _layer(module: str) -> int:
    for i, prefix in reversed(list(enumerate(LAYERS))):
        if module == prefix or module.startswith(prefix + "."):
            return i
    raise AssertionError(f"{module} is in no layer of {LAYERS}: add it to one")


def _resolve(name: str) -> str | None:
    """The project module `name` refers to (a package's attribute import resolves to the package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported project module, names taken from it, line) for every import statement of `module`."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:     # `from pkg import module` imports the module itself
                sub = f"{node.module}.{alias.name}"
                found.append((sub, [], node.lineno) if sub in MODULES else (node.module, [alias.name], node.lineno))
    out = []
    for name, names, line in found:
        target = _resolve(name)
        if target is not None and target != module:
            out.append((target, names, line))
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        _layer(module)


def test_imports_only_point_down_the_layers() -> None:
    upward = [f"{m}:{line} imports {target}" for m, edges in GRAPH.items() for target, _, line in edges
              if _layer(target) > _layer(m)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_circle() -> None:
    # Packages' __init__ re-exports are edges too; a cycle through them is still a cycle.
    edges = {m: sorted({t for t, _, _ in es}) for m, es in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)


def test_no_private_name_crosses_a_module() -> None:
    crossing = [f"{m}:{line} takes {name} from {target}" for m, edges in GRAPH.items()
                for target, names, line in edges for name in names
                if name.startswith("_") and not name.startswith("__")]
    assert not crossing, "private names used outside their module:\n" + "\n".join(crossing)


def test_the_checker_sees_a_function_local_import() -> None:
    """The rule covers imports inside functions (they used to hide circles): the loop's lazy imports are seen."""
    targets = {t for t, _, _ in GRAPH["harness.run.launch"]}
    assert "harness.run.ray_grid" in targets       # imported inside launch() so that `local` never loads Ray
