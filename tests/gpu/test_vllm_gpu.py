"""The vLLM path on a CUDA GPU: ray.data.llm's vLLM processor writes schema-valid task samples.

python -m pytest tests/gpu/test_vllm_gpu.py -q
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray", reason="needs ray: install the project with its GPU extra (CM_RAY_GPU_INSTALL=1 bash scripts/test_gpu.sh)")
pytest.importorskip("vllm", reason="needs vLLM for CUDA (the GPU extra)")
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_ray_data_llm_vllm_gpu_writes_schema_valid_samples(ray_local):
    pytest.importorskip("vllm")
    jsonschema = pytest.importorskip("jsonschema")
    from cm_ray.config import load_config
    from cm_ray.generation.base import bounded_schema
    from cm_ray.generation.generate import generate
    from cm_ray.tasks import load_task

    spec = load_task("survey")
    cfg = load_config(None, ["synthesis.engine=vllm", "synthesis.batch_size=8",
                             "synthesis.vllm.engine_kwargs={gpu_memory_utilization: 0.5}"])
    ask = f"{spec.description} Write one new sample as JSON. Example:\n{spec.example_json(1)}"
    rows = [{"id": i, "messages": [{"role": "user", "content": ask}], "json_schema": json.dumps(spec.json_schema())}
            for i in range(16)]
    out = generate(ray_local.data.from_items(rows), cfg, max_new_tokens=192, temperature=0.7).take_all()
    assert sorted(r["id"] for r in out) == list(range(16))
    schema = bounded_schema(spec.json_schema(), cfg.synthesis.guided_max_string_chars, cfg.synthesis.guided_max_items)
    for r in out:
        jsonschema.validate(json.loads(r["generated_text"]), schema)
        assert r["engine"] == "vllm" and r["finish_reason"] == "stop"
