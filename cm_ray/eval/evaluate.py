"""Evaluation stage: every system on every culture and benchmark, with bootstrap 95% CIs.

    cm-ray evaluate configs/demo.yaml evaluate.data_dir=../shared/data

Paired bootstrap CIs of each system's difference against base and prompted on the same
questions (``eval.stats``) go into results.json and mark the tables. Loads the run's artifacts (adapters on ``evaluate.workers`` Ray actors, the router in the driver), runs the benchmarks (``eval.benchmarks``) and writes
the report (``eval.report``): ``eval/results.json`` (one row per benchmark × culture × system ×
metric), ``eval/results.md`` (one table per benchmark: culture × system) and PNG plots. Without
evaluation data the stage says so and writes nothing else; a system whose artifact is missing (no
joint adapter, no router) is skipped with the reason in the tables. The ablation
(``evaluate.ablation=true``) is a driver over the stages: ``cm_ray.eval.ablation``.
"""

from __future__ import annotations

from typing import Any

from cm_ray.artifacts import JOINT
from cm_ray.config import Config
from cm_ray.eval import data as D
from cm_ray.eval import systems as S
from cm_ray.eval.benchmarks import run_benchmarks
from cm_ray.eval.report import headline_summary, write_report
from cm_ray.eval.stats import significance_rows


def run_evaluate(cfg: Config, store: Any, force: bool = False, model: Any = None,
                 router: Any = None) -> dict:
    """Evaluate the run under ``store``; ``model``/``router`` are injectable (tests)."""
    ev = cfg.evaluate
    root = D.find_data_dir(ev.data_dir)
    if root is None:
        where = ev.data_dir or "../shared/data"
        return {"status": "no_data", "data_dir": where,
                "headline": f"no evaluation data found at {where} (set evaluate.data_dir)"}

    have = S.available_adapters(store, [*cfg.cultures, JOINT])
    router = router if router is not None else S.load_router_fn(store)
    skipped = {s: r for s in ev.systems
               if (r := S.missing_artifact(s, cfg.cultures, have, router))}
    active = [s for s in ev.systems if s not in skipped]
    own = model is None
    if own:  # evaluate.workers Ray actors, one model load each, where their resources are
        from cm_ray.eval.workers import start_eval_workers

        model = start_eval_workers(cfg, store, have)
    try:
        rows, confusion = run_benchmarks(cfg, root, model, active, router)
    finally:
        if own:
            model.close()
    sig = significance_rows(rows, ev.bootstrap, cfg.seed)  # paired, vs base and prompted
    rows = [{k: v for k, v in r.items() if k != "_stat"} for r in rows]
    summary = {"data_dir": str(root), "systems": active, "skipped_systems": skipped,
               "n_rows": len(rows), "adapters": sorted(have), "significance": sig}
    if own:
        summary["workers"] = model.workers
    write_report(store, summary, rows, confusion, cfg.cultures, ev.systems)
    summary.update(headline_summary(rows, active, confusion))
    summary.pop("significance")  # in results.json; the stage summary keeps the headline
    summary["significant_vs_base"] = sum(1 for x in sig if x["significant"] and x["vs"] == "base")
    return summary
