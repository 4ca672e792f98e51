"""The queries stage: an LLM writes web-search queries per (culture, task, kind), on Ray Data.

Kinds (CultureManager): ``specific`` queries look for the culture as it bears on the task (what
counts as offensive in Korean online discussion); ``agnostic`` queries look for the culture's norms
and values in general. Output: ``queries/culture=XX/part-0.parquet`` with query_id, culture, task,
kind, query, locale, source ("llm" or "template").

Generated text is parsed leniently (the first JSON object/array; a numbered list as a last resort)
and validated (strings, length bounds, no placeholders); exact and near duplicates (word-shingle
Jaccard) are dropped, every rejection counted by reason. When the model gives too few valid
queries, deterministic template queries built from the task spec and culture top the kind up, so
no pair ends with zero queries. LLM queries always come first. ``queries.llm: false`` skips the
LLM (no engine starts) and writes the template queries only.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any

from cm_ray.artifacts import queries_dir, queries_file, stable_id
from cm_ray.config import Config
from cm_ray.cultures import get_culture
from cm_ray.data import filters as F
from cm_ray.generation.parsing import extract_json
from cm_ray.tasks import TaskSpec, load_task

SYSTEM = "You write web search queries. You reply with JSON only."
AGNOSTIC_TOPICS = ["social norms and etiquette", "cultural values and beliefs", "family values and respect for elders",
                   "religion and traditions", "attitudes to authority and politeness",
                   "what is considered rude or taboo"]
_PLACEHOLDER = re.compile(r"^(query|search query|first|second|third|example)\b.{0,20}$", re.I)
_LIST_LINE = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+(.+)$")


def query_schema(n: int, cfg) -> dict:
    return {"type": "object", "required": ["queries"], "additionalProperties": False,
            "properties": {"queries": {"type": "array", "minItems": 1, "maxItems": max(1, n),
                                       "items": {"type": "string", "minLength": cfg.min_chars,
                                                 "maxLength": cfg.max_chars}}}}


def build_query_messages(culture_key: str, spec: TaskSpec, kind: str, n: int) -> list[dict]:
    """Chat messages asking for ``n`` search queries of one kind as {"queries": [...]}."""
    c = get_culture(culture_key)
    if kind == "specific":
        topics = "; ".join(spec.search_topics) or spec.description
        about = (f"how the culture of {c.name} bears on this task: {spec.description} "
                 f"Useful topics: {topics}.")
    else:
        about = (f"the culture of {c.name} in general: its social norms and values, "
                 f"such as {', '.join(AGNOSTIC_TOPICS[:4])}.")
    example = json.dumps({"queries": prompt_examples(culture_key, spec, kind)})
    user = (f"Write {n} different web search queries that find information about {about}\n"
            f"Each query names {c.name} and is 3 to 12 words long.\n"
            f"Reply with JSON only, in this form: {example}")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def prompt_examples(culture_key: str, spec: TaskSpec, kind: str) -> list[str]:
    """The two queries shown as the format example (LLM copies of them are rejected)."""
    return template_queries(culture_key, spec, kind)[:2]


def template_queries(culture_key: str, spec: TaskSpec, kind: str) -> list[str]:
    """Deterministic fallback queries for one (culture, task, kind), most useful first."""
    c = get_culture(culture_key)
    if kind == "specific":
        topics = spec.search_topics or [spec.description.rstrip(".")]
    else:
        topics = AGNOSTIC_TOPICS
    out = [f"{t} in {c.name}" for t in topics]
    if kind == "specific":
        out.append(f"{spec.name.replace('_', ' ')} {c.name} {c.language_name}")
    return out


def parse_queries(text: str, cfg, finish_reason: str = "stop") -> tuple[list[str], list[str]]:
    """Queries found in one generation (lenient), and a reason per rejected candidate (a generation
    without any: ``generation_error``, ``empty_output``, or ``truncated_json`` when the token limit
    cut its JSON off, else ``no_json``)."""
    if finish_reason == "error":
        return [], ["generation_error"]
    if not text.strip():
        return [], ["empty_output"]
    try:
        value = extract_json(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        value = value.get("queries", list(value.values()))
    if value is None:
        lines = [m.group(1) for m in map(_LIST_LINE.match, text.splitlines()) if m]
        if not lines:
            return [], ["truncated_json" if finish_reason == "length" and "{" in text else "no_json"]
        value = lines
    items = value if isinstance(value, list) else [value]
    good, reasons = [], []
    for q in items:
        if isinstance(q, dict) and len(q) == 1:  # {"query one": "..."}: small models do this
            q = next(iter(q.values()))
        if not isinstance(q, str):
            reasons.append("not_a_string")
            continue
        q = " ".join(q.strip().strip('"\'').split())
        if len(q) < cfg.min_chars:
            reasons.append("too_short")
        elif len(q) > cfg.max_chars:
            reasons.append("too_long")
        elif _PLACEHOLDER.match(q) or len(q.split()) < 2:
            reasons.append("placeholder")
        else:
            good.append(q)
    if not items:
        reasons.append("empty")
    return good, reasons


def duplicate_of(query: str, kept: list[str], threshold: float, k: int = 1) -> str | None:
    """"duplicate" / "near_duplicate" when ``query`` repeats one of ``kept``, else None."""
    norm, sh = F.normalize_text(query), F.shingles(query, k)
    for other in kept:
        if F.normalize_text(other) == norm:
            return "duplicate"
        if F.jaccard(sh, F.shingles(other, k)) >= threshold:
            return "near_duplicate"
    return None


def query_id(culture: str, task: str, kind: str, query: str) -> str:
    return stable_id(culture, task, kind, F.normalize_text(query))


def assemble(cfg: Config, culture: str, task: str, generated: dict[str, str | None],
             reasons: Counter, finish: dict[str, str] | None = None) -> list[dict]:
    """Final query rows of one (culture, task): LLM queries first, deduplicated, topped up with
    templates. ``generated`` maps kind -> generated text (None when not generated); ``finish`` kind
    -> the generation's finish_reason (stop when absent); ``reasons`` tallies each rejected LLM
    candidate (the caller records them in its ``FilterLog``)."""
    spec = load_task(task)
    qcfg = cfg.queries
    locale = get_culture(culture).locale
    kept: list[dict] = []
    for source in ("llm", "template"):
        for kind in qcfg.kinds:
            n = qcfg.n_specific if kind == "specific" else qcfg.n_agnostic
            have = sum(1 for r in kept if r["kind"] == kind)
            if source == "llm":
                text = generated.get(kind)
                cands, why = ([], []) if text is None else parse_queries(
                    text, qcfg, (finish or {}).get(kind) or "stop")
                reasons.update(why)
                shown = {F.normalize_text(q) for q in prompt_examples(culture, spec, kind)}
                copies = sum(F.normalize_text(q) in shown for q in cands)
                if copies:
                    reasons["copies_example"] += copies
                cands = [q for q in cands if F.normalize_text(q) not in shown]
            else:
                cands = template_queries(culture, spec, kind) if qcfg.template_fill else []
            for q in cands:
                if have >= n:
                    if source == "llm":
                        reasons["over_count"] += 1
                    continue
                dup = duplicate_of(q, [r["query"] for r in kept], qcfg.near_dup_threshold, qcfg.near_dup_shingle)
                if dup:
                    if source == "llm":  # a template repeating a kept query is simply not needed
                        reasons[dup] += 1
                    continue
                kept.append({"query_id": query_id(culture, spec.name, kind, q), "culture": culture,
                             "task": spec.name, "kind": kind, "query": q, "locale": locale,
                             "source": source})
                have += 1
    return kept


def generation_key(culture: str, task: str, kind: str) -> tuple[str, str, str]:
    """Which generation a (culture, task, kind) uses: agnostic queries do not depend on the task,
    so one generation per culture serves every task."""
    return (culture, "" if kind == "agnostic" else task, kind)


def run_queries(cfg: Config, store: Any, force: bool = False) -> dict:
    """Generate, validate and write the search queries of every culture not written yet.

    Each generation may write ``queries.generation_tokens()`` tokens (sized for its count unless
    set). A culture whose LLM candidates were (nearly) all rejected is a degradation
    (``llm_queries_rejected``): only template queries remain, which ``checks`` makes loud.

    Returns:
        Summary: queries per culture / kind / source, rejections per culture and reason,
        ``degradations``, ``headline``.
    """
    from cm_ray import checks
    import ray.data

    from cm_ray.generation.generate import generate
    from cm_ray.ray_utils import init_ray

    t0 = time.time()
    qcfg = cfg.queries
    todo = [c for c in cfg.cultures if force or not store.exists(*queries_file(c))]
    items, asked = [], set()
    for c in todo:
        for t in cfg.tasks:
            spec = load_task(t)
            for kind in qcfg.kinds:
                n = qcfg.n_specific if kind == "specific" else qcfg.n_agnostic
                key = generation_key(c, spec.name, kind)
                if n > 0 and qcfg.llm and key not in asked:
                    asked.add(key)
                    items.append({"culture": c, "task": key[1], "kind": kind,
                                  "messages": build_query_messages(c, spec, kind, n),
                                  "json_schema": json.dumps(query_schema(n, qcfg))})
    from cm_ray.generation.generate import COUNTERS

    generated: dict[tuple, str] = {}
    finish: dict[tuple, str] = {}
    usage: dict = {"generations": len(items), **{k: 0 for k in COUNTERS}}
    if items:
        init_ray(cfg)
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 4, 32)))
        ds = generate(ds, cfg, max_new_tokens=qcfg.generation_tokens(), temperature=qcfg.temperature,
                      top_p=cfg.synthesis.top_p, seed=cfg.seed).select_columns(
            ["culture", "task", "kind", "generated_text", "finish_reason", *COUNTERS])
        # One short text per prompt: small enough to collect even for hundreds of cultures.
        for r in ds.take_all():
            generated[(r["culture"], r["task"], r["kind"])] = r["generated_text"] or ""
            finish[(r["culture"], r["task"], r["kind"])] = r["finish_reason"] or "stop"
            for k in COUNTERS:
                usage[k] = usage.get(k, 0) + (r[k] or 0)
    log = F.FilterLog()
    counts: dict[str, dict] = {}
    degradations: list[dict] = []
    by_source: Counter = Counter()
    for c in todo:
        rows, rejected = [], Counter()
        for t in cfg.tasks:
            name = load_task(t).name
            why: Counter = Counter()
            keys = {k: generation_key(c, name, k) for k in qcfg.kinds}
            pair = assemble(cfg, c, name, {k: generated.get(g) for k, g in keys.items()}, why,
                            {k: finish.get(g, "stop") for k, g in keys.items()})
            # In: what the LLM wrote (queries kept + candidates or generations rejected).
            log.record("llm_queries", sum(r["source"] == "llm" for r in pair) + sum(why.values()), why.elements())
            rejected += why
            rows += pair
        store.delete(*queries_dir(c))
        store.write_table(rows, *queries_file(c))
        sources = Counter(r["source"] for r in rows)
        by_source += sources
        llm_kept, n_rejected = sources.get("llm", 0), sum(rejected.values())
        counts[c] = {**Counter(f"{r['kind']}/{r['source']}" for r in rows), "total": len(rows),
                     "by_source": dict(sources), "llm_candidates": llm_kept + n_rejected,
                     "rejected": dict(rejected)}
        if qcfg.llm and llm_kept + n_rejected:
            top = ", ".join(f"{k} {v}" for k, v in rejected.most_common(3))
            degradations.append(checks.degradation(
                "llm_queries_rejected", c, n_rejected, llm_kept + n_rejected,
                f"{n_rejected} of {llm_kept + n_rejected} LLM query candidates rejected ({top or 'none'}); "
                f"{sources.get('template', 0)} template queries"))
    total = sum(v["total"] for v in counts.values())
    summary = {"queries": total, "cultures_written": len(todo),
               "cultures_skipped": len(cfg.cultures) - len(todo), "generations": len(items),
               "by_source": dict(by_source), "per_culture": counts, "rejected": log.reasons(),
               "llm": qcfg.llm, "max_new_tokens": qcfg.generation_tokens(), "degradations": degradations,
               "usage": {**usage, "cost_usd": round(float(usage["cost_usd"]), 6)},
               "seconds": round(time.time() - t0, 1)}
    summary["headline"] = (f"{total} queries for {len(todo)} cultures ({by_source.get('llm', 0)} LLM, "
                           f"{by_source.get('template', 0)} template; {sum(log.reasons().values())} rejected)"
                           if qcfg.llm else f"{total} template queries for {len(todo)} cultures (queries.llm=false)")
    return summary
