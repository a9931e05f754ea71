"""The layers point one way (docs/interfaces.md, "Layers"): every import of a project module,
top-level or inside a function, goes to the same group or to a lower layer, there are no
import cycles, and every module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("dino_scale", "data_pipeline", "launch")

# Lowest layer first; a layer's groups may not import each other (models and data are
# siblings). A module belongs to the group of its longest matching prefix.
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"leaves": ("dino_scale.config", "dino_scale.errors", "dino_scale.io", "dino_scale.log", "dino_scale.ops",
                "dino_scale.hardware")},
    {"models": ("dino_scale.models",), "data": ("dino_scale.data",)},
    {"weights": ("dino_scale.weights",)},
    {"engine": ("dino_scale.engine", "dino_scale.metrics")},
    {"apps": ("dino_scale.checkpoint_convert", "dino_scale.preflight", "dino_scale.slurm", "dino_scale.export",
              "data_pipeline", "launch")},
]
# the package itself: its __init__ re-exports leaves only
PACKAGE_ROOT = {"dino_scale": "leaves"}


def _module_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


MODULES = _module_files()


def group_of(module: str) -> tuple[int, str] | None:
    if module in PACKAGE_ROOT:
        return 0, PACKAGE_ROOT[module]
    best: tuple[int, int, str] | None = None
    for rank, groups in enumerate(LAYERS):
        for group, prefixes in groups.items():
            for prefix in prefixes:
                if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), rank, group)
    return None if best is None else (best[1], best[2])


def _resolve(name: str) -> str | None:
    """The project module `name` refers to, else None; `from a.b import c` where c is a
    name inside a.b gives a.b. A compiled extension (`dino_scale.ops._C`) is itself."""
    while name:
        if name in MODULES or (name.endswith("._C") and name.split(".")[0] in ROOTS):
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, source: str) -> set[str]:
    """Project modules imported anywhere in `source` (function bodies included)."""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            # `from pkg import sub` imports the submodule when there is one
            names = [f"{base_name}.{a.name}" if f"{base_name}.{a.name}" in MODULES else base_name
                     for a in node.names]
        else:
            continue
        for name in names:
            if package == "launch" and name.split(".")[0] not in ROOTS:
                name = f"launch.{name}"  # scripts import their siblings (run as files)
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: imports_of(module, path.read_text()) for module, path in MODULES.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for src, targets in sorted(graph.items()):
        src_rank, src_group = group_of(src)  # type: ignore[misc]
        for dst in sorted(targets):
            dst_rank, dst_group = group_of(dst)  # type: ignore[misc]
            if dst_rank > src_rank or (dst_rank == src_rank and dst_group != src_group):
                problems.append(f"{src} ({src_group}) imports {dst} ({dst_group})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    assert [m for m in MODULES if group_of(m) is None] == []


def test_imports_point_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_there_are_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    graph = import_graph()
    graph["dino_scale.models.layers"] = graph["dino_scale.models.layers"] | {"dino_scale.engine.trainer"}
    assert upward_imports(graph) == [
        "dino_scale.models.layers (models) imports dino_scale.engine.trainer (engine)"]
    assert any("dino_scale.models.layers" in c for c in cycles(graph))
    planted = imports_of("dino_scale.models.layers", "def f():\n    from dino_scale.data import Batch\n")
    assert planted == {"dino_scale.data"}


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    # One interpreter for speed: project modules are dropped from sys.modules before each
    # import (the native op stays: its kernels register once per process).
    script = f"""
import importlib, json, sys, traceback
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "launch")!r}]
import dino_scale.ops
keep = {{m for m in sys.modules if m.startswith("dino_scale.ops")}}
failed = {{}}
for name in {sorted(MODULES)!r}:
    for m in [m for m in sys.modules if m.split(".")[0] in {ROOTS!r} + ("cli", "demo", "demo_data")
              and m not in keep]:
        del sys.modules[m]
    try:
        importlib.import_module(name if not name.startswith("launch.") else name[len("launch."):])
    except BaseException:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failed == {}, "\n".join(f"{k}:\n{v}" for k, v in failed.items())
