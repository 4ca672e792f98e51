"""The paper's ablations as config variants, each run into its own root, then one comparison table.

    python -m cm_ray.eval.ablation configs/demo.yaml evaluate.data_dir=../shared/data
    cm-ray evaluate configs/demo.yaml evaluate.ablation=true      (the same, through the CLI)

This is a driver over the pipeline (it runs stages through ``cm_ray.stages``), not a stage: the
``evaluate`` stage never calls it.

Variants (``evaluate.ablation_variants``):

| variant | change | compared system |
|---|---|---|
| both | queries.kinds = [specific, agnostic], per-culture adapters (TaskSFT) | culturemanager |
| specific_only | queries.kinds = [specific] | culturemanager |
| agnostic_only | queries.kinds = [agnostic] | culturemanager |
| all_culture | train.mode = joint (one adapter on every culture's data) | joint |
| sft_adaptation | train.mode = continual (culture SFT, then the task data) | culturemanager |

Each variant runs the config's data stages, ``train`` and ``route`` through ``cm_ray.stages.run_stage``
into ``<root>/ablation/<variant>``, then ``evaluate``. Variants that only change training reuse the
``both`` variant's data artifacts (copied, so every root is self-contained and resumable).
"""

from __future__ import annotations

import copy
import sys
import tempfile
from typing import Any

from cm_ray import artifacts
from cm_ray.config import Config
from cm_ray.eval.report import HEADLINE
from cm_ray.stages import DATA_STAGES, run_stage

VARIANTS = {
    "both": ({"queries.kinds": ["specific", "agnostic"]}, "culturemanager"),
    "specific_only": ({"queries.kinds": ["specific"]}, "culturemanager"),
    "agnostic_only": ({"queries.kinds": ["agnostic"]}, "culturemanager"),
    "all_culture": ({"train.mode": "joint", "train.joint_baseline": True}, "joint"),
    "sft_adaptation": ({"train.mode": "continual"}, "culturemanager"),
}
TRAIN_ONLY = {"all_culture", "sft_adaptation"}


def variant_config(cfg: Config, variant: str, root: str) -> Config:
    """``cfg`` with the variant's changes, rooted at ``root``, evaluation of the variant itself."""
    from cm_ray.config import config_from_dict

    d = copy.deepcopy(cfg.to_dict())
    changes, _ = VARIANTS[variant]
    for key, value in changes.items():
        section, name = key.split(".")
        d[section][name] = value
    if variant == "sft_adaptation" and not d["train"].get("continual_first"):
        # Culture SFT first (the values survey when the run has it), then the task data.
        d["train"]["continual_first"] = ["survey"] if "survey" in cfg.tasks else list(cfg.tasks[:1])
    d["root"] = root
    d["name"] = f"{cfg.name}-{variant}"
    d["evaluate"]["ablation"] = False
    return config_from_dict(d)


def _copy_data(src: Any, dst: Any, stages: list[str]) -> None:
    """Copy the data stages' outputs, manifests and fingerprints so run_stage skips them in ``dst``."""
    with tempfile.TemporaryDirectory(prefix="cm_ray_ablation_") as tmp:
        for prefix in artifacts.DATA_PREFIXES:
            if src.exists(prefix) and not dst.exists(prefix):
                dst.upload_dir(src.download_dir(f"{tmp}/{prefix}", prefix), prefix)
    for stage in stages:
        m = src.read_manifest(stage)
        if m and not dst.read_manifest(stage):
            dst.write_manifest(stage, m)
        fp = artifacts.fingerprints_file(stage)
        if src.exists(*fp) and not dst.exists(*fp):
            dst.write_json(src.read_json(*fp), *fp)


def run_ablation(cfg: Config, store: Any, force: bool = False) -> dict:
    """Run every variant's stages and evaluation; write ``ablation/comparison.{md,json}``."""
    from cm_ray.storage import ArtifactStore

    data_stages = DATA_STAGES[cfg.recipe]
    results: dict[str, dict] = {}
    base_store = None
    variants = list(cfg.evaluate.ablation_variants)
    # Data-changing variants first, so the train-only ones can reuse `both`'s data.
    variants.sort(key=lambda v: v in TRAIN_ONLY)
    for variant in variants:
        vstore = ArtifactStore(store.uri(*artifacts.ablation_dir(variant)))
        vcfg = variant_config(cfg, variant, vstore.root)
        print(f"==> ablation {variant}", file=sys.stderr, flush=True)
        if variant in TRAIN_ONLY and base_store is not None:
            _copy_data(base_store, vstore, data_stages)
        for stage in [*data_stages, "train", "route", "evaluate"]:
            results.setdefault(variant, {})[stage] = run_stage(stage, vcfg, vstore, force=force)
        if variant == "both":
            base_store = vstore
    table = comparison(store, variants)
    store.write_bytes(table["markdown"].encode(), *artifacts.ablation_dir("comparison.md"))
    store.write_json(table["rows"], *artifacts.ablation_dir("comparison.json"))
    print(table["markdown"])
    return {"variants": variants, "rows": len(table["rows"]),
            "headline": f"{len(variants)} variants -> ablation/comparison.md"}


def comparison(store: Any, variants: list[str]) -> dict:
    """One row per variant: the compared system's mean headline metrics over cultures."""
    rows = []
    for v in variants:
        sub = (*artifacts.ablation_dir(v), *artifacts.eval_dir("results.json"))
        res = store.read_json(*sub) if store.exists(*sub) else {"rows": []}
        system = VARIANTS[v][1]
        row: dict[str, Any] = {"variant": v, "system": system}
        for bench, metric in [*HEADLINE.items(), ("wvs", "one_minus_jsd")]:
            vals = [r["value"] for r in res["rows"] if r["benchmark"] == bench and r["metric"] == metric
                    and r["system"] == system and r["value"] is not None]
            row[f"{bench}/{metric}"] = sum(vals) / len(vals) if vals else None
        row["router_accuracy"] = (res.get("confusion") or {}).get("accuracy")
        rows.append(row)
    cols = [k for k in rows[0] if k not in ("variant", "system")] if rows else []
    md = ["| variant | system | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rows:
        md.append(f"| {r['variant']} | {r['system']} | "
                  + " | ".join("-" if r[c] is None else f"{r[c]:.3f}" for c in cols) + " |")
    return {"rows": rows, "markdown": "\n".join(md) + "\n"}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from cm_ray.config import load_config
    from cm_ray.storage import ArtifactStore, ensure_bucket

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    ensure_bucket(cfg.root)
    print(run_ablation(cfg, ArtifactStore(cfg.root), force=args.force)["headline"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
