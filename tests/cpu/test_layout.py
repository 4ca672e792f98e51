"""The package's architecture, checked from its source: no import cycle, no stage importing a later
stage, stage paths spelled only by the artifact contract, modules of a readable size.

python -m pytest tests/cpu/test_layout.py -v
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "cm_ray"

# Pipeline order. A module may import modules of its own rank or lower; rank 0 is shared code
# that every stage uses and that imports no stage. The orchestration layer (the stage registry,
# the CLI and the ablation runner, which reruns stages) sits above every stage.
RANKS = [
    ("cm_ray.data.queries", 1),
    ("cm_ray.data.search", 2), ("cm_ray.data.searcher", 2), ("cm_ray.data.search_cache", 2),
    ("cm_ray.data.providers", 2),
    ("cm_ray.data.fetch", 2),
    ("cm_ray.data.synthesize", 3), ("cm_ray.data.synth_prompts", 3), ("cm_ray.data.synth_parse", 3), ("cm_ray.recipes", 3),
    ("cm_ray.train", 4),
    ("cm_ray.router", 5),
    ("cm_ray.serve", 6),
    ("cm_ray.eval.ablation", 9),
    ("cm_ray.eval.data", 0),  # readers of the public evaluation data (CultureSPA's few-shot WVS)
    ("cm_ray.eval", 7),
    ("cm_ray.rehearsal", 9),  # runs every stage's job on a local cluster and reads what they left
    ("cm_ray.stages", 9), ("cm_ray.fingerprints", 9), ("cm_ray.status", 9), ("cm_ray.cli", 9), ("cm_ray.__main__", 9), ("cm_ray.plan", 9),
]


def rank(module: str) -> int:
    for prefix, r in RANKS:
        if module == prefix or module.startswith(prefix + "."):
            return r
    return 0


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """cm_ray modules imported anywhere in a file (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n.startswith("cm_ray"):
                found.add(n)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    # Importing a package runs its __init__: an edge to a module implies its parent packages'.
    return {m: {i for i in imports(p, known) if i != m and not m.startswith(i + ".")}
            for m, p in mods.items()}


def test_no_import_cycle(graph):
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            visit(n)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_stage_imports_a_later_stage(graph):
    bad = [f"{m} (rank {rank(m)}) imports {i} (rank {rank(i)})"
           for m, deps in sorted(graph.items()) for i in sorted(deps) if rank(i) > rank(m)]
    assert not bad, "\n".join(bad)


def test_stage_paths_are_spelled_only_by_the_contract():
    store_call = r"\.(exists|listdir|files|delete|write_\w+|read_\w+|upload_dir|download_dir|local_path|uri|fs_path)"
    spelled = re.compile(r"""["']culture=|["']task=|""" + store_call
                         + r"""\(\s*["'](adapters|synth|queries|search|router|manifests|checkpoints|eval)["']""")
    bad = [f"{p.relative_to(PKG.parent)}:{i}: {line.strip()}"
           for p in PKG.rglob("*.py") if p.name != "artifacts.py"
           for i, line in enumerate(p.read_text().splitlines(), 1) if spelled.search(line)]
    assert not bad, "stage paths built by hand:\n" + "\n".join(bad)


def test_modules_stay_readable():
    big = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 320}
    assert not big, f"modules over 320 lines: {big}"


def test_layout_check_sees_real_edges(graph):
    """The checks above would pass on an empty graph: make sure they read the real imports."""
    assert "cm_ray.artifacts" in graph["cm_ray.stages"] | set().union(*graph.values())
    assert "cm_ray.data.queries" in graph["cm_ray.stages"]
    assert rank("cm_ray.serve.app") == 6 and rank("cm_ray.artifacts") == 0
