"""Synthesis outputs: generated text -> candidate sample rows (a Ray Data UDF), with each generation's
usage counters carried once per generation to the partition stats."""

from __future__ import annotations

import json
from typing import Any

from cm_ray.cultures import get_culture
from cm_ray.data.synth_prompts import parse_samples
from cm_ray.tasks import load_task


def parse_generations(batch: dict[str, Any], require_sources: bool = True) -> dict[str, list]:
    """Ray Data map_batches: generated text -> candidate samples, one row per candidate or per
    rejected generation, with ``status`` "ok" or the rejection reason.

    A row whose ``skip_reason`` is set (a prompt over the model's context) was not generated: it
    becomes one row with that reason as its status.

    Input columns:  culture, task, pair_idx, snippets_json, prompt_hash, generated_text, engine, model,
                    skip_reason, prompt_token_count, prompt_trim (the last three optional)
    Output columns: culture, task, pair_idx, status, sample_json, sample_text, label, query_ids,
                    snippet_urls, reference_texts, engine, model, prompt_hash, gen_<counter>
                    (``usage_columns``)
    """
    cols = ["culture", "task", "pair_idx", "status", "sample_json", "sample_text", "label",
            "query_ids", "snippet_urls", "reference_texts", "engine", "model", "prompt_hash"]
    out: dict[str, list] = {c: [] for c in cols}
    generation_of: list[int] = []  # the generation each output row came from

    def emit(i, status, sample="", text="", label=None, qids=(), urls=(), refs=()):
        for c, v in zip(cols, [str(batch["culture"][i]), str(batch["task"][i]), int(batch["pair_idx"][i]),
                               status, sample, text, label, list(qids), list(urls), list(refs),
                               str(batch["engine"][i]), str(batch["model"][i]), str(batch["prompt_hash"][i])]):
            out[c].append(v)

    skip = batch.get("skip_reason")
    for i in range(len(batch["generated_text"])):
        if skip is not None and skip[i]:
            emit(i, str(skip[i]))
            generation_of.append(i)
            continue
        spec = load_task(str(batch["task"][i]))
        snippets = json.loads(batch["snippets_json"][i])
        finish = str(batch["finish_reason"][i]) if "finish_reason" in batch else "stop"
        samples, reasons = parse_samples(str(batch["generated_text"][i]), spec, len(snippets),
                                         require_sources, finish_reason=finish)
        for r in reasons:
            emit(i, r)
        c = get_culture(str(batch["culture"][i]))
        for sample, sources in samples:
            used = [snippets[k - 1] for k in sources] or snippets
            refs = [f"{c.name}: {s['title']}. {s['snippet']}" for s in used] + [
                f"Everyday life, values and customs of people in {c.name}."]
            emit(i, "ok", json.dumps(sample, ensure_ascii=False, sort_keys=True), spec.input_text(sample),
                 spec.label_of(sample), dict.fromkeys(s["query_id"] for s in used),
                 dict.fromkeys(s["url"] for s in used), refs)
        if len(out["status"]) == len(generation_of):  # nothing parsed, nothing rejected: say so
            emit(i, "empty")
        generation_of += [i] * (len(out["status"]) - len(generation_of))
    out.update(usage_columns(batch, generation_of))
    return out


USAGE = ("prompt_tokens", "output_tokens", "retries", "cost_usd")
"""Generation counters carried to the partition stats as ``gen_<counter>`` (and ``gen_count``)."""
BUDGET = {"prompt_token_count": "prompt_count", "prompt_trim": "trim"}
"""The prompt budget's columns (``synth_prompts.build_prompt_rows``), carried as ``gen_<name>``."""


def usage_columns(batch: dict[str, Any], generation_of: list[int]) -> dict[str, list]:
    """Each generation's counters on the first row it produced (0 on the others), so summing a
    partition's rows counts every generation once."""
    cols: dict[str, list] = {f"gen_{k}": [] for k in (*USAGE, "count", *BUDGET.values())}
    seen: set[int] = set()
    for g in generation_of:
        first = g not in seen
        seen.add(g)
        cols["gen_count"].append(int(first))
        for k in USAGE:
            v = batch[k][g] if first and k in batch else 0
            cols[f"gen_{k}"].append(float(v) if k == "cost_usd" else int(v or 0))
        for k, name in BUDGET.items():
            cols[f"gen_{name}"].append(int(batch[k][g] or 0) if first and k in batch else 0)
    return cols
