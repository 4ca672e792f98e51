"""Transformers engine: JSON-guided decoding (xgrammar), EOS / length / stop-string endings, config checks.

python -m pytest tests/cpu/test_engines.py -q
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from cm_ray.config import ConfigError, load_config
from cm_ray.generation.base import GenerationParams, bounded_schema
from cm_ray.generation.engines import TransformersEngine, make_engine
from cm_ray.tasks import load_task


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return TransformersEngine(smollm2_dir, dtype="float32", batch_size=4)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return TransformersEngine(tiny_model_dir, dtype="float32", batch_size=4)


def _ask(spec) -> list[dict]:
    return [{"role": "system", "content": "You write one JSON object and nothing else."},
            {"role": "user", "content": f"{spec.description} Write one new sample as JSON with the fields "
                                        f"{', '.join(spec.fields)}. Example:\n{spec.example_json(1)}"}]


def test_bounded_schema_caps_free_strings_and_arrays_only():
    spec = load_task("survey")
    b = bounded_schema(spec.json_schema(), max_string_chars=50, max_items=6)
    assert b["properties"]["question"]["maxLength"] == 50
    assert b["properties"]["options"]["maxItems"] == 6
    assert b["properties"]["options"]["items"]["maxLength"] == 50
    labels = bounded_schema(load_task("offensive").json_schema())["properties"]["label"]
    assert "maxLength" not in labels and labels["enum"] == ["offensive", "not_offensive"]
    assert "maxLength" not in spec.json_schema()["properties"]["question"]  # the input is not modified
    assert bounded_schema({"type": "string", "maxLength": 3}, 50)["maxLength"] == 3


@pytest.mark.parametrize("task", ["offensive", "survey"])
def test_guided_smollm2_samples_parse_and_satisfy_the_task_schema(smol, task):
    spec = load_task(task)
    schema = bounded_schema(spec.json_schema(), max_string_chars=120, max_items=5)
    gens = smol.generate([_ask(spec)] * 2, GenerationParams(max_new_tokens=160, temperature=0.7, seed=1,
                                                            json_schema=schema))
    for g in gens:
        assert g.finish_reason == "stop", g.text  # the grammar closed the object, then EOS
        sample = json.loads(g.text)
        jsonschema.validate(sample, schema)
        assert set(spec.fields) <= sample.keys()
        assert 0 < g.output_tokens <= 160 and g.prompt_tokens > 0


def test_guided_decoding_makes_even_a_random_model_emit_schema_valid_json(tiny):
    schema = bounded_schema(load_task("offensive").json_schema(), max_string_chars=12, max_items=3)
    gens = tiny.generate([[{"role": "user", "content": "hi"}]] * 3,
                         GenerationParams(max_new_tokens=200, temperature=1.0, seed=0, json_schema=schema))
    for g in gens:
        jsonschema.validate(json.loads(g.text), schema)
        assert g.finish_reason == "stop"


def test_unguided_random_model_does_not_produce_json(tiny):
    # The control for the test above: without the grammar the same model emits no JSON.
    g = tiny.generate([[{"role": "user", "content": "hi"}]], GenerationParams(max_new_tokens=40, temperature=1.0))[0]
    with pytest.raises(ValueError):
        json.loads(g.text)


def test_eos_ends_with_stop_and_the_token_limit_with_length(smol):
    conv = [[{"role": "user", "content": "Say hello in one short sentence."}]]
    done = smol.generate(conv, GenerationParams(max_new_tokens=64, temperature=0.0))[0]
    assert done.finish_reason == "stop" and done.output_tokens < 64
    assert "<|im_end|>" not in done.text and done.text.strip()
    cut = smol.generate(conv, GenerationParams(max_new_tokens=3, temperature=0.0))[0]
    assert cut.finish_reason == "length" and cut.output_tokens == 3


def test_batched_rows_keep_their_own_lengths(smol):
    # Left padding and per-row EOS: a short answer next to a long one keeps its own token count.
    convs = [[{"role": "user", "content": "Reply with the single word: yes"}],
             [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]]
    short, long = smol.generate(convs, GenerationParams(max_new_tokens=48, temperature=0.0))
    assert short.finish_reason == "stop" and long.finish_reason == "length"
    assert short.output_tokens < long.output_tokens == 48


def test_stop_string_ends_the_text_before_it(smol):
    conv = [[{"role": "user", "content": "Count from 1 to 10, separated by commas."}]]
    g = smol.generate(conv, GenerationParams(max_new_tokens=40, temperature=0.0, stop=["5"]))[0]
    assert "5" not in g.text and g.finish_reason == "stop" and "4" in g.text


def test_config_rejects_an_unknown_engine_naming_the_field():
    with pytest.raises(ConfigError, match=r"^synthesis\.engine: "):
        load_config(None, ["synthesis.engine=llamacpp"])
    with pytest.raises(ConfigError, match=r"^synthesis\.openai.qps: "):
        load_config(None, ["synthesis.openai.qps=0"])


def test_make_engine_builds_the_configured_engine(tiny_model_dir):
    cfg = load_config(None, [f"models.generator={tiny_model_dir}", "synthesis.engine=openai",
                             "synthesis.openai.base_url=http://127.0.0.1:9/v1", "synthesis.openai.qps=4"])
    eng = make_engine(cfg)
    assert eng.name == "openai" and eng.url == "http://127.0.0.1:9/v1/chat/completions"
    assert make_engine(cfg, "transformers").name == "transformers"


def test_vllm_engine_kwargs_cache_prefixes_and_keep_whole_prompt_prefill_on_cpu():
    from cm_ray.generation.engines import vllm_engine_kwargs

    demo = load_config("configs/demo.yaml")
    cpu = vllm_engine_kwargs(demo, gpu=False)
    assert cpu["enable_prefix_caching"] is True and cpu["enable_chunked_prefill"] is False
    assert cpu["max_num_seqs"] == demo.synthesis.batch_size  # every prompt of the stage in flight
    assert "enable_chunked_prefill" not in vllm_engine_kwargs(demo, gpu=True)
    off = load_config(None, ["synthesis.vllm.prefix_caching=false"])
    assert vllm_engine_kwargs(off, gpu=False)["enable_prefix_caching"] is False
