"""The synthesis stage: search results -> task-format training samples, one partition per
(culture, task), on Ray Data.

    pairs (culture, task) ─flat_map(build_prompt_rows)─> generate() ─map_batches(parse_generations)─>
    [RelevanceScorer | judge] ─> driver: dedup, relevance, label balance, split ─> one Parquet file
    per synth/culture=XX/task=T/

Rows reach the driver in input order, so a partition is complete when a row of a later pair
arrives; it is filtered, written (one atomic file) and dropped from memory before the next one
finishes. Driver memory is one partition, whatever the number of cultures. A partition whose file
exists is done and skipped on rerun, so a killed run resumes without duplicates or lost rows.

Every prompt is counted against ``context_limit - max_new_tokens`` (``cm_ray.generation.budget``)
before generation: grounding is trimmed to fit, and a row that still cannot fit is rejected
(``prompt_over_limit``, one row, never the run). The summary reports the largest prompt of each
(culture, task) against the limit, and a partition with rejected prompts is a degradation.
"""

from __future__ import annotations

import json
import time
from typing import Any

from cm_ray import artifacts as A
from cm_ray.config import Config
from cm_ray.data import filters as F


def finalize_partition(cfg: Config, culture: str, task: str, rows: list[dict]) -> tuple[list[dict], dict]:
    """Filter one partition's candidate rows and build its output rows.

    Returns:
        (output rows in the synth contract, FilterLog dict for this partition).
    """
    from cm_ray.tasks import load_task

    scfg = cfg.synthesis
    spec = load_task(task)
    log = F.FilterLog()
    log.record("parse_validate", len(rows), [r["status"] for r in rows if r["status"] != "ok"])
    ok = []
    for r in rows:
        if r["status"] == "ok":
            r["id"] = A.stable_id(culture, spec.name, r["sample_json"])
            ok.append(r)
    kept, why = F.dedup(ok, lambda r: r["sample_text"], scfg.near_dup_threshold,
                        seen=[spec.input_text(ex) for ex in spec.examples])
    log.record("dedup", len(ok), why)
    if scfg.relevance_filter != "none":
        n = len(kept)
        kept, why = F.threshold_filter(kept, "relevance", scfg.relevance_threshold)
        log.record("relevance", n, why)
    if scfg.balance_labels and spec.kind in ("classification", "multiple_choice"):
        n = len(kept)
        kept, why = F.balance_labels(kept, scfg.label_balance_ratio)
        log.record("label_balance", n, why)
    splits = A.split_of([r["id"] for r in kept], scfg.validation_fraction)
    out = []
    for r in kept:
        sample = json.loads(r["sample_json"])
        out.append(A.synth_row(
            id=r["id"], culture=culture, task=spec.name, split=splits[r["id"]], sample=r["sample_json"],
            input=spec.render_input(sample), output=spec.render_output(sample), messages=spec.messages(sample),
            label=r["label"], query_ids=r["query_ids"], snippet_urls=r["snippet_urls"], engine=r["engine"],
            model=r["model"], prompt_hash=r["prompt_hash"], relevance=r.get("relevance")))
    return out, log.to_dict()


def _judge(ds, cfg: Config):
    """Relevance by the generator itself: yes/no 'is this typical of <culture>?' -> 1.0 / 0.0."""
    from cm_ray.cultures import get_culture
    from cm_ray.generation.generate import generate

    def to_prompt(batch):
        msgs = [[{"role": "user", "content": f"Is the following text relevant to the culture of "
                  f"{get_culture(str(c)).name}? Answer yes or no.\n\n{t}"}]
                for c, t in zip(batch["culture"], batch["sample_text"])]
        return {**batch, "messages": msgs, "json_schema": [""] * len(msgs)}

    def from_answer(batch):
        rel = [(1.0 if str(t).strip().lower().startswith("yes") else 0.0) if s == "ok" else float("nan")
               for s, t in zip(batch["status"], batch["generated_text"])]
        keep = {k: v for k, v in batch.items() if k not in ("messages", "json_schema", "generated_text",
                                                              "prompt_tokens", "output_tokens")}
        keep["engine"], keep["model"] = batch["engine_orig"], batch["model_orig"]
        return {**keep, "relevance": rel}

    ds = ds.map_batches(lambda b: {**b, "engine_orig": b["engine"], "model_orig": b["model"]},
                        batch_format="numpy").map_batches(to_prompt, batch_format="numpy")
    ds = generate(ds, cfg, max_new_tokens=3, temperature=0.0, seed=cfg.seed)
    return ds.map_batches(from_answer, batch_format="numpy").drop_columns(["engine_orig", "model_orig"])


def build_synthesis_dataset(cfg: Config, pairs: list[tuple[str, str]], budget: dict | None = None):
    """The lazy Ray Dataset of candidate rows for ``pairs`` (nothing runs until consumed); prompts
    are fitted to ``budget`` (``cm_ray.generation.budget.prompt_budget``; None: not counted)."""
    import ray.data

    from cm_ray.generation.generate import generate
    from cm_ray.data.synth_parse import parse_generations
    from cm_ray.data.synth_prompts import build_prompt_rows

    scfg = cfg.synthesis
    items = [{"culture": c, "task": t, "pair_idx": i} for i, (c, t) in enumerate(pairs)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    ds = ds.flat_map(build_prompt_rows, fn_kwargs={"scfg": scfg, "root": cfg.root, "budget": budget})
    ds = generate(ds, cfg, max_new_tokens=scfg.max_new_tokens, temperature=scfg.temperature,
                  top_p=scfg.top_p, seed=cfg.seed)
    ds = ds.map_batches(parse_generations, fn_kwargs={"require_sources": scfg.require_sources},
                        batch_format="numpy")
    if scfg.relevance_filter == "embedding":
        ds = ds.map_batches(F.RelevanceScorer, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                            fn_constructor_kwargs={"encoder": cfg.models.encoder,
                                                   "cache_dir": cfg.models.cache_dir})
    elif scfg.relevance_filter == "judge":
        ds = _judge(ds, cfg)
    ds.context.execution_options.preserve_order = True  # partitions arrive one after another
    return ds


def run_synthesis(cfg: Config, store: Any, force: bool = False) -> dict:
    """Synthesize samples for every (culture, task) whose partition is not written yet.

    Args:
        cfg: run config (cultures, tasks, ``synthesis`` section).
        store: the ArtifactStore to read search results from and write ``synth/`` to.
        force: regenerate every partition (deleting the old ones first).

    Returns:
        Summary: rows kept, per-culture filter counts, partitions written / skipped, ``headline``.
    """
    from cm_ray.generation.budget import prompt_budget
    from cm_ray.ray_utils import init_ray

    t0 = time.time()
    pairs = [(c, t) for c in cfg.cultures for t in cfg.tasks]
    budget = prompt_budget(cfg, cfg.synthesis.max_new_tokens)  # a config error before any work
    names = {t: _task_name(t) for t in cfg.tasks}
    todo, skipped = [], []
    for c, t in pairs:
        done = store.exists(*A.synth_file(c, names[t]))
        if done and not force:
            skipped.append((c, t))
        else:
            store.delete(*A.synth_dir(c, names[t]))
            todo.append((c, t))
    if todo:
        init_ray(cfg)
        ds = build_synthesis_dataset(cfg, todo, budget)
        from cm_ray.progress import stage_bar

        buffers: dict[int, list[dict]] = {i: [] for i in range(len(todo))}
        next_idx, kept = 0, 0
        bar = stage_bar("synthesize", len(todo), "partition")

        def flush(upto: int):
            nonlocal next_idx, kept
            while next_idx < upto:
                c, t = todo[next_idx]
                kept += _write_partition(cfg, store, c, names[t], buffers.pop(next_idx), budget)
                next_idx += 1
                bar.set_postfix_str(f"{kept} rows kept, last {c}/{names[t]}", refresh=False)
                bar.update(1)

        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for r in batch.to_pylist():
                i = int(r["pair_idx"])
                flush(i)  # rows arrive in pair order: every earlier pair is complete
                buffers[i].append(r)
        flush(len(todo))
        bar.close()
    return summarize(cfg, store, pairs, names, written=todo, n_written=len(todo), n_skipped=len(skipped),
                     seconds=time.time() - t0)


def _task_name(task: str) -> str:
    from cm_ray.tasks import load_task

    return load_task(task).name


def _write_partition(cfg: Config, store: Any, culture: str, task: str, rows: list[dict],
                     budget: dict | None = None) -> int:
    out, log = finalize_partition(cfg, culture, task, rows)
    # Stats first, data file last: the data file is the partition's completion marker.
    stats = {"culture": culture, "task": task, "filters": log, "rows_out": len(out),
             "generations": len({r["prompt_hash"] for r in rows}), "usage": partition_usage(rows),
             "prompts": prompt_stats(rows, budget)}
    if not rows:
        stats["note"] = "no search snippets"
    store.write_json(stats, *A.synth_stats_file(culture, task))
    A.write_synth_partition(store, culture, task, out)
    return len(out)


def partition_usage(rows: list[dict]) -> dict:
    """Generations, tokens, retries and cost of one partition's rows (``synth_parse.usage_columns``)."""
    from cm_ray.data.synth_parse import USAGE

    tot = {k: sum(r.get(f"gen_{k}") or 0 for r in rows) for k in ("count", *USAGE)}
    tot["cost_usd"] = round(float(tot["cost_usd"]), 6)
    return {"generations": tot.pop("count"), **tot}


def prompt_stats(rows: list[dict], budget: dict | None) -> dict:
    """Prompt tokens of one partition against the model's limit: ``max_prompt_tokens``,
    ``model_limit``, ``max_new_tokens``, prompts counted, trimmed to fit and ``over_limit``."""
    from cm_ray.generation.budget import OVER_LIMIT

    first = [r for r in rows if r.get("gen_count")]  # one row per generation
    # Counted before generation; the engine's own count where there is no budget (openai).
    return {"max_prompt_tokens": max((r.get("gen_prompt_count") or r.get("gen_prompt_tokens") or 0
                                      for r in first), default=0),
            "model_limit": budget and budget["limit"], "max_new_tokens": budget and budget["max_new_tokens"],
            "prompts": len(first), "trimmed": sum(bool(r.get("gen_trim")) for r in first),
            "over_limit": sum(r["status"] == OVER_LIMIT for r in rows)}


def degradations(prompts: dict[str, dict]) -> list[dict]:
    """``prompt_over_limit`` records of the partitions (``{"MX/offensive": prompt_stats}``) that
    rejected prompts."""
    from cm_ray import checks

    out = []
    for key, p in prompts.items():
        if p.get("over_limit"):
            out.append(checks.degradation(
                "prompt_over_limit", key, p["over_limit"], p["prompts"],
                f"{p['over_limit']} of {p['prompts']} prompts longer than {p['model_limit']} - "
                f"{p['max_new_tokens']} new tokens even with their snippets trimmed (largest {p['max_prompt_tokens']})"))
    return out


def add_usage(total: dict, part: dict | None) -> dict:
    """``total`` + ``part`` counter by counter (cost rounded)."""
    for k, v in (part or {}).items():
        total[k] = round(total.get(k, 0) + v, 6) if k == "cost_usd" else total.get(k, 0) + v
    return total


def summarize(cfg: Config, store: Any, pairs, names, written=(), **extra) -> dict:
    """Merge the per-partition stats into ``synth/summary.json`` (rows in/out per filter per culture,
    prompt tokens per (culture, task), degradations of the ``written`` pairs)."""
    per_culture: dict[str, dict] = {}
    prompts: dict[str, dict] = {}
    done = {f"{c}/{names[t]}" for c, t in written}
    for c, t in pairs:
        parts = A.synth_stats_file(c, names[t])
        stats = store.read_json(*parts) if store.exists(*parts) else None
        entry = per_culture.setdefault(c, {"rows_out": 0, "tasks": {}, "filters": {}, "usage": {}})
        if stats:
            if stats.get("prompts") is not None:
                prompts[f"{c}/{names[t]}"] = stats["prompts"]
            add_usage(entry["usage"], stats.get("usage"))
            entry["rows_out"] += stats["rows_out"]
            entry["tasks"][names[t]] = stats["rows_out"]
            entry["filters"] = F.FilterLog.merge([entry["filters"], stats["filters"]])
    total = sum(e["rows_out"] for e in per_culture.values())
    candidates = sum(e["filters"].get("parse_validate", {}).get("in", 0) for e in per_culture.values())
    usage: dict = {}
    for e in per_culture.values():
        add_usage(usage, e["usage"])
    summary = {"rows": total, "candidates": candidates, "usage": usage,
               "kept_fraction": round(total / candidates, 3) if candidates else 0.0,
               "partitions": len(pairs), "per_culture": per_culture, "prompt_tokens": prompts,
               "degradations": degradations({k: v for k, v in prompts.items() if k in done}),
               **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in extra.items()}}
    summary["headline"] = (f"{total} samples kept of {candidates} candidates over {len(pairs)} "
                           f"(culture, task) partitions ({extra.get('n_skipped', 0)} skipped)")
    store.write_json(summary, *A.synth_summary_file())
    return summary
