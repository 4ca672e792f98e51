"""Ablation command: config variants, stage reuse through run_stage, the comparison table.

python -m pytest tests/cpu/test_eval_ablation.py -q
"""

import pytest

from cm_ray.config import load_config
from cm_ray.eval import ablation as A
from cm_ray.storage import ArtifactStore


@pytest.fixture
def cfg(tmp_path):
    return load_config("configs/demo.yaml", [f"root={tmp_path}", f"evaluate.data_dir={tmp_path / 'none'}",
                                             "evaluate.ablation=true"])


def test_variants_change_only_their_knob(cfg, tmp_path):
    spec = A.variant_config(cfg, "specific_only", str(tmp_path / "v"))
    assert spec.queries.kinds == ["specific"] and spec.train.mode == cfg.train.mode
    assert spec.root == str(tmp_path / "v") and spec.name == "demo-specific_only" and not spec.evaluate.ablation
    assert A.variant_config(cfg, "agnostic_only", "x").queries.kinds == ["agnostic"]
    assert A.variant_config(cfg, "all_culture", "x").train.mode == "joint"
    cont = A.variant_config(cfg, "sft_adaptation", "x")
    assert cont.train.mode == "continual" and cont.train.continual_first == ["survey"]
    assert A.variant_config(cfg, "both", "x").queries.kinds == ["specific", "agnostic"]


def _finish(store, cfg, stages, marker, tmp_path):
    """Make ``stages`` done in ``store`` the way run_stage leaves them: fingerprints recorded,
    every partition's output, the partitions marked complete, the manifest."""
    from cm_ray import artifacts as AR
    from cm_ray import fingerprints as FP

    for stage in stages:
        todo = FP.prepare(stage, cfg, store, log=lambda _: None)
        for p in todo:
            if stage in ("queries", "search"):
                f = AR.queries_file if stage == "queries" else AR.search_results_file
                store.write_table([{"query_id": "q", "culture": p.key}], *f(p.key))
            elif stage == "synthesize":
                c, t = p.key.split("/")
                store.write_table([{"id": "1", "culture": c, "input": "x"}], *AR.synth_file(c, t))
            else:
                src = tmp_path / f"{marker}-{p.key}"
                src.mkdir()
                for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.json", "router.json"):
                    (src / name).write_text("{}")
                store.publish_dir(src, *(AR.router_dir() if stage == "route" else AR.adapter_dir(p.key)))
        FP.finish(stage, store, todo, {})
        store.write_manifest(stage, {"complete": True, "marker": f"{marker}-{stage}"})


def test_ablation_reuses_stages_and_copies_data_to_train_only_variants(cfg, tmp_path):
    """Stages whose partitions are all done are skipped by run_stage; the joint variant gets both's data."""
    store = ArtifactStore(cfg.root)
    both = ArtifactStore(store.uri("ablation", "both"))
    data = ["queries", "search", "synthesize"]
    _finish(both, A.variant_config(cfg, "both", both.root), [*data, "train", "route"], "both", tmp_path)
    joint = ArtifactStore(store.uri("ablation", "all_culture"))
    A._copy_data(both, joint, data)
    _finish(joint, A.variant_config(cfg, "all_culture", joint.root), ["train", "route"], "joint", tmp_path)
    cfg.evaluate.ablation_variants = ["all_culture", "both"]
    out = A.run_ablation(cfg, store)
    assert out["variants"] == ["both", "all_culture"]  # data-changing variants run first
    assert joint.exists("synth", "culture=GB", "task=offensive", "part-0.parquet")
    assert both.read_manifest("train")["marker"] == "both-train"  # skipped: nothing recomputed
    assert both.read_manifest("route")["marker"] == "both-route"
    assert joint.read_manifest("synthesize")["marker"] == "both-synthesize"
    assert joint.read_manifest("train")["marker"] == "joint-train"  # its own, not both's
    assert joint.read_manifest("evaluate")["status"] == "no_data"
    md = (tmp_path / "ablation" / "comparison.md").read_text()
    assert "| both | culturemanager |" in md and "| all_culture | joint |" in md


def test_comparison_uses_each_variants_system(tmp_path):
    store = ArtifactStore(str(tmp_path))
    rows = lambda system, v: [{"benchmark": "wvs", "metric": "alignment_score", "culture": c, "system": s,
                               "value": v if s == system else 0.0} for c in ["GB", "CN"] for s in ["joint", "culturemanager"]]
    store.write_json({"rows": rows("culturemanager", 70.0), "confusion": {"accuracy": 0.9}},
                     "ablation", "both", "eval", "results.json")
    store.write_json({"rows": rows("joint", 60.0), "confusion": None}, "ablation", "all_culture", "eval", "results.json")
    table = A.comparison(store, ["both", "all_culture", "specific_only"])
    got = {r["variant"]: r for r in table["rows"]}
    assert got["both"]["wvs/alignment_score"] == 70.0 and got["both"]["router_accuracy"] == 0.9
    assert got["all_culture"]["wvs/alignment_score"] == 60.0
    assert got["specific_only"]["wvs/alignment_score"] is None  # not run: shown as "-"
    assert "| specific_only | culturemanager | - |" in table["markdown"]
