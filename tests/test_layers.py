"""The package's imports only point down: each file imports files of its own layer or below,
never in a loop, and never from inside a function (an import hidden there to dodge a cycle is a
layering smell). The layers, from the ground up: errors, ui, metrics, checkpoint, flops and
provenance (no pipemlaan imports of their own); models; config; data; local; engine; profile
and train.

Run: .venv/bin/python -m pytest tests/test_layers.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipemlaan"
LAYERS = [("pipemlaan.errors", "pipemlaan.ui", "pipemlaan.metrics",
           "pipemlaan.checkpoint_files", "pipemlaan.flops", "pipemlaan.provenance", "pipemlaan.trackers"),
          ("pipemlaan.models",), ("pipemlaan.config",), ("pipemlaan.data",),
          ("pipemlaan.local",), ("pipemlaan.engine",), ("pipemlaan.profile", "pipemlaan.train",
                                                       "pipemlaan.timeline")]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def imports(tree: ast.Module) -> tuple[list[str], list[tuple[str, int]]]:
    """pipemlaan modules imported at the top of a file, and those imported inside functions
    (with their line)."""
    top, nested = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "pipemlaan":
            names = [f"pipemlaan.{a.name}" for a in node.names]     # from pipemlaan import x
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("pipemlaan."):
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("pipemlaan")]
        else:
            continue
        if not names:
            continue
        (top if node in tree.body else nested).extend(
            names if node in tree.body else [(n, node.lineno) for n in names])
    return top, nested


def graph() -> dict[str, tuple[list[str], list[tuple[str, int]]]]:
    return {module_name(p): imports(ast.parse(p.read_text()))
            for p in sorted(PACKAGE.rglob("*.py"))}


def test_imports_point_down_and_never_hide_in_functions():
    up, hidden = [], []
    for mod, (top, nested) in graph().items():
        up += [f"{mod} -> {t}" for t in top if layer(t) > layer(mod)]
        hidden += [f"{mod} line {line}: {t}" for t, line in nested]
    assert not up, f"imports that run back up: {up}"
    assert not hidden, f"imports inside functions: {hidden}"


def test_no_import_cycle():
    g = {m: [t for t in top if t != m] for m, (top, _) in graph().items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in g.get(m, []):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [m, t]))
            if t in g and not state.get(t):
                visit(t, path + [m])
        state[m] = 2
    for m in g:
        if not state.get(m):
            visit(m, [])


def test_the_check_sees_an_upward_import():
    """Negative control: config importing the engine would run back up."""
    assert layer("pipemlaan.engine.trainer") > layer("pipemlaan.config")
    top, nested = imports(ast.parse("import os\nfrom pipemlaan.engine import trainer\n"
                                    "def f():\n    from pipemlaan.data import load\n"))
    assert top == ["pipemlaan.engine"] and nested == [("pipemlaan.data", 4)]
