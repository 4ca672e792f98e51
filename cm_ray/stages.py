"""The pipeline's stages, in order, and how each recipe strings them together.

Every stage is a function ``run(cfg, store, force=False, **kw) -> dict`` in its own module. It
writes its outputs under the artifact root (``cm_ray.artifacts`` names them) and returns a summary
(counts) that is also saved as ``manifests/<stage>.json``. A stage whose manifest says ``complete``
is skipped unless forced. Stage modules import their heavy libraries (ray, torch, vllm) inside
their functions, so importing this registry stays cheap.
"""

from __future__ import annotations

import time
from typing import Any, Callable

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

ALWAYS_RUN = frozenset({"serve", "evaluate"})
"""Stages that produce no reusable artifact to skip on (serving, evaluation)."""

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
    """Run one stage (or skip it when its manifest says complete); return its summary."""
    if not force and name not in ALWAYS_RUN:
        manifest = store.read_manifest(name)
        if manifest and manifest.get("complete"):
            return {**manifest, "skipped": True}
    t0 = time.time()
    summary = dict(STAGES[name](cfg, store, force=force, **kwargs) or {})
    summary.setdefault("complete", True)
    summary["stage"] = name
    summary["seconds"] = round(time.time() - t0, 1)
    store.write_manifest(name, summary)
    return summary
