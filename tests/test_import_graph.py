"""The package's import graph: no module imports back up into a layer above it (no cycle), and
importing fused_pool stays cheap (no Triton, no torch._dynamo)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fused_pool"


def _module_files() -> dict[str, Path]:
    """module name -> file, for fused_pool/ and triton_kernels/ (installed as fused_pool.triton_kernels)."""
    trees = [(ROOT / "fused_pool", PACKAGE), (ROOT / "triton_kernels", f"{PACKAGE}.triton_kernels")]
    files = {}
    for top, top_name in trees:
        for folder, subfolders, names in os.walk(top):
            # A symlinked fused_pool/triton_kernels (a development checkout) is walked as its target.
            subfolders[:] = [d for d in subfolders if not (Path(folder) / d).is_symlink()]
            parts = Path(folder).relative_to(top).parts
            for name in names:
                if not name.endswith(".py"):
                    continue
                stem = [] if name == "__init__.py" else [name[:-3]]
                files[".".join([top_name, *parts, *stem])] = Path(folder) / name
    return files


def _imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `module` imports anywhere in its file (module level or in a function),
    and those it names in a string (`importlib.import_module("fused_pool.x")`, a table of them)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Constant) and node.value in known:
            targets = [node.value]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import fused_pool.x.y` names x.y's module
                target = target.rpartition(".")[0]
            if target and target != module:
                edges.add(target)
    return edges


def import_graph() -> dict[str, set[str]]:
    files = _module_files()
    return {module: _imported_modules(module, path, set(files)) for module, path in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) for every back edge a depth-first walk meets."""
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_graph_sees_the_package():
    graph = import_graph()
    assert {"fused_pool.ops", "fused_pool.contract", "fused_pool.triton_kernels.pool"} <= set(graph)
    assert "fused_pool.contract" in graph["fused_pool.torch_kernels"]
    assert "fused_pool.contract" in graph["fused_pool.triton_kernels.pool"]


def test_contract_is_a_leaf_and_specs_data_only():
    graph = import_graph()
    assert graph["fused_pool.contract"] == set()
    assert graph["fused_pool.specs"] == {"fused_pool.contract"}  # no kernel, no backend table


def test_contract_facts_have_one_home():
    import fused_pool.contract
    import fused_pool.specs

    facts = ("MEAN", "MAX", "MEAN_MAX", "STATES", "accumulation_dtype", "num_seqs")
    assert all(hasattr(fused_pool.contract, name) for name in facts)
    assert not [name for name in facts if hasattr(fused_pool.specs, name)]


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


def test_import_is_cheap():
    script = "import sys, fused_pool; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "False"]
