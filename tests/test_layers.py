"""The package's imports point one way (quant -> arch/data -> core -> train/export/analysis -> commands -> cli).

Reads every module's imports (function-level ones included) with `ast` and fails on an import of a
higher layer, an import between sibling packages of one layer, or a cycle.
"""

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vitqtool"
LAYERS = {  # top-level module or subpackage -> layer (imports may only point to the same or a lower layer)
    "errors": 0,
    "fileio": 1, "progress": 1,
    "recipe": 2,
    "quant": 3,
    "families": 4, "data": 4,
    "core": 5,
    "train": 6, "export": 6, "analysis": 6,
    "commands": 7,
    "demo": 8,
    "cli": 9,
    "__main__": 10,
}
LAZY_IMPORTERS = {"cli", "__main__"}  # the only places a function-level import may stand (keeps `--help` free of torch)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported vitqtool module, imported inside a function) for every import in `path`."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found += [(t, id(node) in nested) for t in targets if t == "vitqtool" or t.startswith("vitqtool.")]
    return found


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__version__" else None  # None: the package root (lazy public API)


@functools.cache
def _graph() -> dict[str, list[tuple[str, bool]]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    missing = sorted({_top(m) for m in _graph() if _top(m) is not None} - set(LAYERS))
    assert not missing, f"add these to LAYERS (and docs/architecture.md): {missing}"


def test_no_upward_or_sideways_import():
    bad = []
    for importer, imports in _graph().items():
        src = _top(importer)
        if src is None:
            continue
        for target, _ in imports:
            dst = _top(target)
            if dst is None or dst == src:
                continue
            if LAYERS[dst] > LAYERS[src] or (LAYERS[dst] == LAYERS[src] and dst != src):
                bad.append(f"{importer} -> {target}")
    assert not bad, "imports against the layer order: " + ", ".join(bad)


def test_function_level_imports_only_in_the_cli():
    bad = [f"{m} -> {t}" for m, imports in _graph().items() for t, nested in imports
           if nested and _top(m) not in LAZY_IMPORTERS and _top(t) is not None]
    assert not bad, "function-level imports of vitqtool modules outside the CLI: " + ", ".join(bad)


def test_no_import_cycle():
    names = set(_graph()) - {"vitqtool"}
    graph = {m: {t for t, _ in imports if t in names} for m, imports in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)
