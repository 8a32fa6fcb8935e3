"""The package's shape: every module imports (scripts no test runs included), no import cycle
between saeens modules, no module over MAX_LINES lines."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREES = ("saeens", "experiments", "benchmarks")
MAX_LINES = 350

# Run in a fresh interpreter: imports have side effects (jax config, 8 simulated devices) that must
# not leak into this test process. A module that exits on import (a __main__) passes with --help.
_IMPORT_ALL = """
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    sys.argv[1:] = ["--help"]
    try:
        importlib.import_module(name)
    except SystemExit as e:
        if e.code not in (0, None):
            failed[name] = f"SystemExit({e.code})"
    except BaseException:
        failed[name] = traceback.format_exc(limit=3)
print("RESULT" + json.dumps(failed))
"""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(tree: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / tree).rglob("*.py"))}


def test_every_module_imports(tmp_path):
    names = [n for tree in TREES for n in modules(tree)]
    assert "experiments.common" in names and "benchmarks.harness" in names and "saeens.cli" in names
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL, json.dumps(names)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert "RESULT" in proc.stdout, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.rsplit("RESULT", 1)[1])
    assert not failed, "\n".join(f"{name}:\n{err}" for name, err in failed.items())


def import_graph() -> dict[str, set[str]]:
    """saeens module -> the saeens modules it imports, at module level or inside functions.

    `from saeens.a import b` is an edge to saeens.a.b when that is a module, else to saeens.a. The
    implicit import of a module's own parent packages is left out: a package's __init__ that
    re-exports its submodules is not a cycle, while an explicit import of another package (which
    runs its __init__ and so its submodules) is an edge to that package."""
    mods = modules("saeens")
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            for t in targets:
                if t in mods and t != name and not name.startswith(t + "."):
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_sees_a_cycle_through_a_package():
    g = {"p": {"p.a"}, "p.a": {"q"}, "q": {"p"}, "r": {"p.a"}}
    assert find_cycles(g) == [["p", "p.a", "q"]]
    assert find_cycles({"p": {"p.a"}, "p.a": set()}) == []


def test_no_import_cycle_between_saeens_modules():
    graph = import_graph()
    assert "saeens.metrics.batch" in graph["saeens.metrics"]  # re-exports are edges ...
    assert "saeens.metrics" not in graph["saeens.metrics.stream"]  # ... implicit parents are not
    assert find_cycles(graph) == []


def test_no_module_is_too_long():
    long = {name: n for name, p in modules("saeens").items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
