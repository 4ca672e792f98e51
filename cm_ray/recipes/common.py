"""What the CultureSPA and CLCA recipes share: LLM calls over Ray Data and writing training rows
in the synthesis row contract (``cm_ray.artifacts``).

Recipe rows land in ``synth/culture=XX/task=T/part-0.parquet`` with exactly the columns the
synthesis stage writes, so the train, route and serve stages consume them unchanged. Drops are
counted in the one drop log (``cm_ray.data.filters.FilterLog``), JSON is read with the one
extractor (``cm_ray.generation.parsing.extract_json``).
"""

from __future__ import annotations

import json
from typing import Any

from cm_ray import artifacts as A
from cm_ray.config import Config


def llm(cfg: Config, rows: list[dict], *, max_new_tokens: int, temperature: float, top_p: float = 0.95,
        seed: int | None = None) -> list[dict]:
    """Generate for every row (``messages`` + optional ``json_schema`` dict) on Ray Data.

    Returns the rows (same order) with ``generated_text``, ``engine``, ``model`` and the other
    columns of ``cm_ray.generation.generate``. Rows carry a ``_i`` index so order survives the shuffle
    of Ray's blocks.
    """
    if not rows:
        return []
    import ray

    from cm_ray.generation.generate import generate
    from cm_ray.ray_utils import init_ray

    init_ray(cfg)
    items = [{"_i": i, "messages": r["messages"],
              "json_schema": json.dumps(r["json_schema"]) if r.get("json_schema") else ""}
             for i, r in enumerate(rows)]
    blocks = max(1, min(len(items) // max(1, cfg.synthesis.batch_size), 4 * max(1, cfg.synthesis.concurrency)))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    out = generate(ds, cfg, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   seed=seed).take_all()
    by_i = {int(o["_i"]): o for o in out}
    keep = ("generated_text", "engine", "model", "finish_reason", "gen_error", "output_tokens")
    return [{**r, **{k: by_i[i].get(k) for k in keep}} for i, r in enumerate(rows)]


def recipe_row(cfg: Config, *, culture: str, task: str, sample: dict, input: str, output: str,
               messages: list[dict], label: str | None, engine: str, model: str, prompt: Any) -> dict:
    """One synth row of a recipe; its split is set per partition by ``write_synth``."""
    return A.synth_row(id=A.stable_id(cfg.recipe, culture, task, messages), culture=culture, task=task,
                       split="train", sample=json.dumps(sample, ensure_ascii=False), input=input, output=output,
                       messages=messages, label=label, engine=engine, model=model,
                       prompt_hash=A.stable_id(prompt))


def write_synth(store: Any, rows: list[dict], cultures: list[str], validation_fraction: float) -> dict[str, int]:
    """Replace each culture's recipe partitions with ``rows``, each (culture, task) partition split by
    ``artifacts.split_of``; returns rows written per culture/task."""
    counts: dict[str, int] = {}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["culture"], r["task"]), []).append(r)
    for c in cultures:
        if store.exists(*A.synth_dir(c)):
            store.delete(*A.synth_dir(c))
    for (c, t), rs in sorted(groups.items()):
        splits = A.split_of([r["id"] for r in rs], validation_fraction)
        A.write_synth_partition(store, c, t, [{**r, "split": splits[r["id"]]} for r in rs])
        counts[f"{c}/{t}"] = len(rs)
    return counts
