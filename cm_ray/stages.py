"""The pipeline's stages, in order, and how each recipe strings them together.

Every stage is a function ``run(cfg, store, force=False, **kw) -> dict`` in its own module. It
writes its outputs under the artifact root (``cm_ray.artifacts`` names them) and returns a summary
(counts) that is also saved as ``manifests/<stage>.json``. ``run_stage`` computes only the partitions
that are missing or whose fingerprint changed (``cm_ray.fingerprints``), and skips a stage whose
partitions are all done; ``force`` redoes every partition. Stage modules import their heavy libraries (ray, torch, vllm) inside
their functions, so importing this registry stays cheap.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from cm_ray import checks
from cm_ray.config import Config
from cm_ray.data.queries import run_queries
from cm_ray.data.search import run_search
from cm_ray.data.synthesize import run_synthesis
from cm_ray.eval.evaluate import run_evaluate
from cm_ray.recipes.clca import run_clca_data
from cm_ray.recipes.culturespa import run_culturespa_data
from cm_ray.router.stage import run_router_training
from cm_ray.serve.stage import run_serve
from cm_ray.train.tune import run_training

STAGES: dict[str, Callable[..., dict]] = {
    "queries": run_queries,
    "search": run_search,
    "synthesize": run_synthesis,
    "culturespa": run_culturespa_data,
    "clca": run_clca_data,
    "train": run_training,
    "route": run_router_training,
    "serve": run_serve,
    "evaluate": run_evaluate,
}
"""Stage name -> stage function, in pipeline order."""

DESCRIPTIONS = {
    "queries": "LLM writes task-specific and task-agnostic search queries",
    "search": "async web search on Ray Data",
    "synthesize": "task-format samples grounded in search results",
    "culturespa": "CultureSPA survey questions + disagreement pairs",
    "clca": "CLCA role-play dialogues, judge, intents",
    "train": "one LoRA adapter per culture (Ray Train + DeepSpeed trials)",
    "route": "culture router: encoder + linear head",
    "serve": "Ray Serve app: router + multiplexed adapters",
    "evaluate": "evaluation on real data",
}

ALWAYS_RUN = frozenset({"serve"})
"""Stages that produce no reusable artifact to skip on (serving)."""
WARN_STALE = frozenset({"serve", "evaluate"})
"""Stages that warn about every stale adapter or router they would use."""

DATA_STAGES = {
    "culturemanager": ["queries", "search", "synthesize"],
    "culturespa": ["culturespa"],
    "clca": ["clca"],
}
"""The data stages of each recipe."""


def pipeline(cfg: Config, command: str) -> list[str]:
    """Stage names a CLI command runs for this config's recipe."""
    data = DATA_STAGES[cfg.recipe]
    return {
        "synthesize": data,
        "train": ["train"],
        "route": ["route"],
        "serve": ["route", "serve"],
        "evaluate": ["evaluate"],
        "run": [*data, "train", "route", "serve"],
    }[command]


def run_stage(name: str, cfg: Config, store: Any, force: bool = False, **kwargs) -> dict:
    """Run one stage on the partitions that are missing, failed or stale (``cm_ray.fingerprints``),
    or skip it when every partition is done; return its summary. Serving always runs; serving and
    evaluation warn, naming every stale adapter or router they would use. Degradations past their
    ``checks`` threshold mark their partitions failed and, with ``checks.fail``, raise
    ``checks.DegradedError`` once the outputs and the summary are saved."""
    from cm_ray import fingerprints

    stale: list[str] = []
    if name in WARN_STALE:
        stale = fingerprints.stale_warnings(cfg, store)
        for line in stale:
            print(f"warning: {name} uses a {line}", file=sys.stderr, flush=True)
    if name not in ALWAYS_RUN:
        todo = fingerprints.prepare(name, cfg, store, force=force)
        manifest = store.read_manifest(name)
        if not todo and manifest and manifest.get("complete"):
            return {**manifest, "skipped": True, "recomputed": []}
    t0 = time.time()
    summary = dict(STAGES[name](cfg, store, force=force, **kwargs) or {})
    summary.setdefault("complete", True)
    summary["stage"] = name
    summary["seconds"] = round(time.time() - t0, 1)
    if name in WARN_STALE:
        summary["stale"] = stale
    over = checks.over_threshold(cfg.checks, summary.get("degradations") or [])
    if over:
        summary["degraded"] = over
        for d in over:
            print(f"warning: {name} degraded: {checks.describe(d)}", file=sys.stderr, flush=True)
    if name not in ALWAYS_RUN:
        summary["recomputed"] = [p.key for p in todo]
        fingerprints.finish(name, store, todo, summary, extra_failed=checks.failed_reasons(over))
    store.write_manifest(name, summary)
    if over and cfg.checks.fail:
        raise checks.DegradedError(name, over)
    return summary
