"""``cm-ray run`` end to end on a tiny config, as a user runs it: one command, every stage in order.

queries -> search (BM25) -> synthesize (SmolLM2 on the demo's engine) -> train (the tiny Llama, Ray
Train + DeepSpeed, packed as in the demo) -> route -> serve (one routed request over HTTP), in a
fresh process that starts its own local Ray cluster; then the same command with one more culture
computes that culture's partitions, its adapter and the router, and nothing else (every finished
partition is skipped, every other adapter keeps its published version).

python -m pytest tests/cpu/test_run_e2e.py -v
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(overrides: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", "cm_ray.cli", "run", "configs/demo.yaml", *overrides, "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(r.stdout[r.stdout.index("{"):])


def test_cm_ray_run_goes_from_nothing_to_a_served_answer(tmp_path, smollm2_dir, tiny_model_dir):
    root = tmp_path / "run"
    overrides = [f"root={root}", "cultures=[GB,MX]", "tasks=[offensive]", f"models.generator={smollm2_dir}",
                 f"models.base={tiny_model_dir}", "queries.n_specific=1", "queries.n_agnostic=1",
                 "queries.max_new_tokens=48", "synthesis.prompts_per_pair=1", "synthesis.samples_per_prompt=3",
                 "synthesis.max_new_tokens=120", "synthesis.relevance_filter=none",
                 "synthesis.require_sources=false", "synthesis.validation_fraction=0",
                 "train.joint_baseline=false", "train.max_steps=2", "train.batch_size=2", "train.max_seq_len=256",
                 f"serve.port={free_port()}", "serve.max_new_tokens=8", "serve.demo_prompt=Fancy a cuppa, mate?"]
    out = _run(overrides)
    s = out["summaries"]
    assert list(s) == ["queries", "search", "synthesize", "train", "route", "serve"]
    assert not any(v.get("skipped") for v in s.values())
    from cm_ray import artifacts
    from cm_ray.storage import ArtifactStore

    store = ArtifactStore(str(root))
    with_rows = sorted({r["culture"] for r in artifacts.read_synth(store, columns=["culture"]).to_pylist()})
    assert with_rows, "synthesis kept no sample for any culture"
    assert s["train"]["trained"] == with_rows and not s["train"]["failed"]
    for c in with_rows:
        assert artifacts.published_adapter(store, c) is not None
    assert artifacts.published_router(store) is not None
    assert s["serve"]["culture"] in {"GB", "MX", "none", "base"} and s["serve"]["answer"] is not None
    assert s["serve"]["adapters"] == len(with_rows)

    # One more culture: its data, its adapter and the router; every finished partition of the others
    # is skipped (a rerun of the same config skips every stage: tests/cpu/test_incremental.py).
    before = {c: artifacts.published_adapter(store, c) for c in with_rows}
    grown = _run([o if not o.startswith("cultures=") else "cultures=[GB,MX,CN]" for o in overrides])["summaries"]
    assert grown["queries"]["recomputed"] == ["CN"] and grown["search"]["recomputed"] == ["CN"]
    assert grown["synthesize"]["recomputed"] == ["CN/offensive"]
    assert grown["train"]["recomputed"] == ["CN"] and set(grown["train"]["trained"]) <= {"CN"}
    assert grown["route"]["recomputed"] == ["router"] and not grown["route"].get("skipped")
    assert {c: artifacts.published_adapter(store, c) for c in with_rows} == before
