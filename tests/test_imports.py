"""Imports go one way: no cycle between modules, and each layer imports only the layers below it.

    model  <-  data  <-  prep
      ^         ^
      +-- train (recipes, trainer, engine, checkpoint, metrics, tracking)  <-  experiments  <-  cli

Every `import` counts, also those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vlbert_ds"
# What each part of the package may import from the rest of it (besides itself and the top-level helpers).
ALLOWED = {
    "model": set(),
    "data": {"model"},
    "prep": {"model", "data"},
    "train": {"model", "data"},
    "experiments": {"model", "data", "prep", "train"},
    "cli": {"model", "data", "prep", "train", "experiments"},
}
TOP_LEVEL = {"vlbert_ds", "vlbert_ds.bundled", "vlbert_ds.lifecycle"}
MODEL_MUST_NOT_IMPORT = ("deepspeed", "webdataset", "fsspec", "s3fs", "mlflow")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Imported names: a module of ours when the name is one, else the package it came from."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. import cycles."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_package_imports_itself_back():
    graph = _graph()
    package_inits = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()}
    # A package's __init__ re-exporting its modules is the one allowed way round (Python imports the
    # package before its module anyway): drop the edges into a package's own __init__ from inside it.
    pruned = {name: {t for t in targets if not (t in package_inits and name.startswith(t + "."))}
              for name, targets in graph.items()}
    assert _cycles(pruned) == []


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for name, targets in _graph().items():
        parts = name.split(".")
        if len(parts) < 2 or name in TOP_LEVEL:
            continue
        layer = parts[1]
        for target in targets:
            if not target.startswith("vlbert_ds") or target in TOP_LEVEL:
                continue
            other = target.split(".")[1]
            if other != layer and other not in ALLOWED[layer]:
                wrong.append(f"{name} imports {target}")
            if layer == "model" and target.startswith("vlbert_ds.bundled"):
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_the_model_library_imports_nothing_of_deepspeed_shards_fsspec_or_mlflow():
    wrong = [f"{name} imports {target}" for name, targets in _graph().items() if name.startswith("vlbert_ds.model")
             for target in targets if target.split(".")[0] in MODEL_MUST_NOT_IMPORT]
    assert wrong == []
