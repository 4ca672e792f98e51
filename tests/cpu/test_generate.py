"""generate() over a real local Ray Dataset with the transformers engine: rows kept, columns added,
per-row JSON schemas honoured, counters summable.

python -m pytest tests/cpu/test_generate.py -q
"""

from __future__ import annotations

import json

import jsonschema

from cm_ray.config import load_config
from cm_ray.generation.base import bounded_schema
from cm_ray.generation.generate import generate, usage_totals
from cm_ray.tasks import load_task


def test_transformers_generate_keeps_rows_and_guides_rows_with_a_schema(ray_local, tiny_model_dir):
    cfg = load_config(None, [f"models.generator={tiny_model_dir}", "synthesis.batch_size=3",
                             "synthesis.guided_max_string_chars=16", "synthesis.guided_max_items=3"])
    schemas = {t: json.dumps(load_task(t).json_schema()) for t in ("offensive", "survey")}
    rows = [{"id": i, "task": t, "messages": [{"role": "user", "content": f"sample {i}"}],
             "json_schema": schemas.get(t)} for i, t in enumerate(["offensive", "survey", "free"] * 2)]
    ds = generate(ray_local.data.from_items(rows, override_num_blocks=2), cfg, max_new_tokens=160,
                  temperature=1.0, seed=0)
    out = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [(r["id"], r["task"]) for r in out] == [(r["id"], r["task"]) for r in rows]
    for r in out:
        assert r["engine"] == "transformers" and r["model"] == tiny_model_dir
        assert r["prompt_tokens"] > 0 and 0 < r["output_tokens"] <= 160 and r["gen_error"] is None
        if r["task"] != "free":  # a random model writes valid JSON only under the grammar
            schema = bounded_schema(load_task(r["task"]).json_schema(), 16, 3)
            jsonschema.validate(json.loads(r["generated_text"]), schema)
            assert r["finish_reason"] == "stop"
    tot = usage_totals(out)
    assert tot["rows"] == 6 and tot["output_tokens"] == sum(r["output_tokens"] for r in out)
    assert tot["retries"] == 0 and tot["cost_usd"] == 0 and tot["errors"] == 0


def test_guided_json_off_leaves_generation_free(ray_local, tiny_model_dir):
    cfg = load_config(None, [f"models.generator={tiny_model_dir}", "synthesis.guided_json=false"])
    rows = [{"messages": [{"role": "user", "content": "x"}], "json_schema": json.dumps({"type": "object"})}]
    r = generate(ray_local.data.from_items(rows), cfg, max_new_tokens=12, temperature=1.0).take_all()[0]
    assert r["finish_reason"] == "length" and r["output_tokens"] == 12  # no grammar closed it
