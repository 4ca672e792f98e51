"""What the CultureSPA and CLCA recipes share: LLM calls over Ray Data, JSON parsing with counted
reasons, and writing training rows in the synthesis stage's schema.

Recipe rows land in ``synth/culture=XX/task=T/part-*.parquet`` with exactly the columns the
synthesis stage writes, so the train, route and serve stages consume them unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from typing import Any

from cm_ray.config import Config

SYNTH_COLUMNS = ["id", "culture", "task", "split", "sample_json", "input", "output", "messages", "label",
                 "query_ids", "snippet_urls", "engine", "model", "prompt_hash"]


def stable_hash(*parts: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:n]


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


def parse_json(text: str) -> Any:
    """The first JSON value in ``text`` (guided output is pure JSON; free text may wrap it)."""
    text = (text or "").strip()
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        pass
    text = re.sub(r"^```(?:json)?|```$", "", text, flags=re.M).strip()
    dec = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            return dec.raw_decode(text[m.start():])[0]
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON value in the output")


class Drops(Counter):
    """Counted reasons, per stage step: ``drops.add("question", "duplicate")``."""

    def add(self, step: str, reason: str, n: int = 1) -> None:
        self[f"{step}:{reason}"] += n

    def as_dict(self) -> dict:
        return dict(sorted(self.items()))


def split_for(row_id: str, validation_fraction: float) -> str:
    """Deterministic train/validation split by id hash."""
    return "validation" if int(row_id[:8], 16) / 0xFFFFFFFF < validation_fraction else "train"


def synth_row(cfg: Config, *, culture: str, task: str, sample: dict, input: str, output: str,
              messages: list[dict], label: str | None, engine: str, model: str, prompt: Any) -> dict:
    rid = stable_hash(cfg.recipe, culture, task, messages)
    return {"id": rid, "culture": culture, "task": task,
            "split": split_for(rid, cfg.synthesis.validation_fraction),
            "sample_json": json.dumps(sample, ensure_ascii=False), "input": input, "output": output,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "label": label, "query_ids": [], "snippet_urls": [], "engine": engine or "", "model": model or "",
            "prompt_hash": stable_hash(prompt)}


def write_synth(store: Any, rows: list[dict], cultures: list[str]) -> dict[str, int]:
    """Replace each culture's recipe partitions with ``rows``; returns rows written per culture/task."""
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("culture", pa.string()), ("task", pa.string()),
                        ("split", pa.string()), ("sample_json", pa.string()), ("input", pa.string()),
                        ("output", pa.string()),
                        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("label", pa.string()), ("query_ids", pa.list_(pa.string())),
                        ("snippet_urls", pa.list_(pa.string())), ("engine", pa.string()), ("model", pa.string()),
                        ("prompt_hash", pa.string())])
    counts: dict[str, int] = {}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["culture"], r["task"]), []).append(r)
    for c in cultures:
        if store.exists("synth", f"culture={c}"):
            store.delete("synth", f"culture={c}")
    for (c, t), rs in sorted(groups.items()):
        # Hive partition values live in the path; the files keep every column for direct readers.
        store.write_table(pa.Table.from_pylist([{k: r[k] for k in SYNTH_COLUMNS} for r in rs], schema=schema),
                          "synth", f"culture={c}", f"task={t}", "part-0.parquet")
        counts[f"{c}/{t}"] = len(rs)
    return counts
