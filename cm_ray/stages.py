"""The pipeline's stages, in order, and how each recipe strings them together.

Every stage is a function ``run(cfg, store, force=False) -> dict`` in its own module. It writes its
outputs under the artifact root and returns a summary (counts) that is also saved as
``manifests/<stage>.json``. A stage whose manifest says ``complete`` is skipped unless forced.
Modules are imported only when their stage runs, so a missing optional stage never breaks the rest.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Any, Callable

from cm_ray.config import Config


@dataclass(frozen=True)
class Stage:
    name: str
    target: str
    """``module:function``."""
    description: str
    skippable: bool = True
    """False for stages that produce no reusable artifact (serving) and so always run."""

    def load(self) -> Callable[..., dict] | None:
        module, fn = self.target.split(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and (e.name == module or module.startswith(e.name + ".")):
                return None  # the stage's module does not exist (yet)
            raise
        return getattr(mod, fn, None)


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("queries", "cm_ray.data.queries:run_queries", "LLM writes task-specific and task-agnostic search queries"),
    Stage("search", "cm_ray.data.search:run_search", "async web search on Ray Data"),
    Stage("synthesize", "cm_ray.data.synthesize:run_synthesis", "task-format samples grounded in search results"),
    Stage("culturespa", "cm_ray.recipes.culturespa:run_culturespa_data", "CultureSPA survey questions + disagreement pairs"),
    Stage("clca", "cm_ray.recipes.clca:run_clca_data", "CLCA role-play dialogues, judge, intents"),
    Stage("train", "cm_ray.train.tune:run_training", "one LoRA adapter per culture (Ray Train + DeepSpeed trials)"),
    Stage("route", "cm_ray.serve.router:run_router_training", "culture router: encoder + linear head"),
    Stage("serve", "cm_ray.serve.app:run_serve", "Ray Serve app: router + multiplexed adapters", skippable=False),
    Stage("evaluate", "cm_ray.eval.evaluate:run_evaluate", "evaluation on real data", skippable=False),
]}

# CLI command -> stages it runs, per recipe.
DATA_STAGES = {
    "culturemanager": ["queries", "search", "synthesize"],
    "culturespa": ["culturespa"],
    "clca": ["clca"],
}


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


class StageMissing(RuntimeError):
    pass


def run_stage(name: str, cfg: Config, store: Any, force: bool = False, **kwargs) -> dict:
    """Run one stage (or skip it when its manifest says complete); return its summary."""
    stage = STAGES[name]
    if not force and stage.skippable:
        manifest = store.read_manifest(name)
        if manifest and manifest.get("complete"):
            return {**manifest, "skipped": True}
    fn = stage.load()
    if fn is None:
        raise StageMissing(f"stage {name!r} ({stage.description}) is not implemented in this "
                           f"version of cm_ray; nothing was faked for it")
    t0 = time.time()
    summary = dict(fn(cfg, store, force=force, **kwargs) or {})
    summary.setdefault("complete", True)
    summary["stage"] = name
    summary["seconds"] = round(time.time() - t0, 1)
    store.write_manifest(name, summary)
    return summary
