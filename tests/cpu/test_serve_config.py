"""Serve config and packaging checks that need no cluster.

python -m pytest tests/cpu/test_serve_config.py -q
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cm_ray.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_deploy_yaml_is_a_valid_serve_config_that_builds():
    from ray.serve.schema import ServeDeploySchema

    from cm_ray.serve.app import app_builder

    data = yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data)
    app = schema.applications[0]
    assert app.import_path == "cm_ray.serve.app:app_builder"
    built = app_builder({**app.args, "config": str(REPO / app.args["config"])})
    assert type(built).__name__ == "Application"


def test_auto_replicas_become_an_autoscaling_config():
    from cm_ray.serve.app import adapter_server_options

    cfg = load_config(REPO / "configs" / "demo.yaml", ["serve.num_replicas=auto",
                                                      "serve.max_replicas=3"])
    opts = adapter_server_options(cfg.serve)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3,
                                          "target_ongoing_requests": 8}
    fixed = load_config(REPO / "configs" / "demo.yaml", ["serve.num_replicas=2"])
    assert adapter_server_options(fixed.serve)["num_replicas"] == 2


def test_api_key_env_must_be_set_and_the_key_never_ships(monkeypatch):
    from cm_ray.serve.app import build_app

    cfg = load_config(REPO / "configs" / "demo.yaml", ["serve.api_key_env=CM_RAY_NO_SUCH_KEY"])
    with pytest.raises(ValueError, match="CM_RAY_NO_SUCH_KEY"):
        build_app(cfg)
    monkeypatch.setenv("CM_RAY_NO_SUCH_KEY", "sk-secret-value")
    app = build_app(cfg)
    assert "sk-secret-value" not in repr(app._bound_deployment.init_args)


@pytest.mark.parametrize("override,field", [
    ("serve.num_replicas=0", "serve.num_replicas"), ("serve.num_replicas=many", "serve.num_replicas"),
    ("serve.max_ongoing_requests=2", "serve.max_ongoing_requests"),
    ("serve.route_prefix=api", "serve.route_prefix"), ("serve.max_batch_size=0", "serve.max_batch_size"),
    ("router.threshold=1.5", "router.threshold"), ("router.kind=magic", "router.kind"),
])
def test_bad_serve_and_router_settings_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(REPO / "configs" / "demo.yaml", [override])


def test_serve_modules_import_without_vllm_or_deepspeed():
    code = ("import sys, json, cm_ray.serve.app, cm_ray.serve.ingress, cm_ray.serve.adapters, "
            "cm_ray.serve.stage, cm_ray.router.model, cm_ray.router.stage; "
            "print(json.dumps([m for m in ('vllm', 'deepspeed', 'torch') if m in sys.modules]))")
    assert json.loads(subprocess.check_output([sys.executable, "-c", code], cwd=REPO)) == []


def test_vllm_engine_options_come_from_the_config_not_the_driver():
    from cm_ray.serve.app import build_app, vllm_server_options
    from cm_ray.serve.vllm_server import engine_args

    cpu = load_config(REPO / "configs" / "demo.yaml", ["serve.engine=vllm", "serve.max_ongoing_requests=48"])
    opts = vllm_server_options(cpu.serve)
    assert opts["max_ongoing_requests"] == 48 and "placement_group_bundles" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": cpu.serve.ray_actor_cpus}
    assert type(build_app(cpu)).__name__ == "Application"
    gpu = load_config(None, ["serve.engine=vllm", "serve.num_gpus=1", "serve.vllm.tensor_parallel_size=2",
                             "serve.num_replicas=auto", "serve.max_replicas=3"])
    opts = vllm_server_options(gpu.serve)
    assert opts["placement_group_bundles"] == [{"GPU": 1, "CPU": 1}] * 2
    assert opts["autoscaling_config"]["max_replicas"] == 3 and opts["ray_actor_options"]["num_gpus"] == 0
    kw = engine_args(gpu.serve, "/m", cuda=True)
    assert kw["tensor_parallel_size"] == 2 and kw["distributed_executor_backend"] == "ray"
    assert kw["dtype"] == "bfloat16" and kw["enable_lora"] and kw["max_loras"] == 4
    kw = engine_args(cpu.serve, "/m", cuda=False)
    assert kw["dtype"] == "float32" and kw["enforce_eager"] is True
    assert kw["max_loras"] == 5  # + the base model's zero adapter on CPU
    with pytest.raises(ConfigError, match="serve.vllm.tensor_parallel_size"):
        load_config(None, ["serve.engine=vllm", "serve.vllm.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match="serve.engine"):
        load_config(None, ["serve.engine=tgi"])


def test_unsupported_fields_are_refused_by_name_and_response_format_is_checked():
    from cm_ray.serve.api import ApiError, ChatRequest, parse_request

    s = load_config(None, []).serve
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ApiError, match="'tool_choice', 'tools'") as e:
        parse_request(ChatRequest, {"messages": msgs, "tools": [], "tool_choice": "auto"}, s)
    assert e.value.status == 400 and e.value.param == "tool_choice"
    assert parse_request(ChatRequest, {"messages": msgs, "user": "u1"}, s).json_schema(300) is None
    req = parse_request(ChatRequest, {"messages": msgs, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}}, s)
    assert req.json_schema(30) == {"type": "object", "properties": {"a": {"type": "string", "maxLength": 30}}}
    assert parse_request(ChatRequest, {"messages": msgs, "response_format": {"type": "json_object"}},
                         s).json_schema(30) == {"type": "object"}
    for bad in ({"type": "json_schema"}, {"type": "yaml"}, {"type": "text", "json_schema": {"schema": {}}},
                {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}):
        with pytest.raises(ApiError, match="response_format") as e:
            parse_request(ChatRequest, {"messages": msgs, "response_format": bad}, s)
        assert e.value.status == 400
    req = parse_request(ChatRequest, {"messages": msgs, "stream": True, "stream_options": {"include_usage": True}}, s)
    assert req.include_usage()


def test_the_adapter_catalogue_reads_the_store_once_per_ttl(tmp_path, monkeypatch):
    from cm_ray.serve import adapters
    from cm_ray.serve.catalog import AdapterCatalog
    from cm_ray.storage import ArtifactStore

    store = ArtifactStore(str(tmp_path))
    reads = []
    monkeypatch.setattr(adapters, "adapter_listing", lambda st: reads.append(1) or {
        "MX": ("v1", True), "GB": (None, True), "FR": ("v2", False)})
    cat = AdapterCatalog(store, ttl_s=3600)
    assert cat.ids() == ["GB", "MX"] and cat.has("MX") and not cat.has("JP")
    assert cat.model_id("MX") == "MX@v1" and cat.model_id("GB") == "GB" and len(reads) == 1
    cat.refuse("MX@v1")
    assert cat.ids() == ["GB"] and cat.has("MX")  # not advertised; asking for it gets the 422
    assert cat.has("FR") and cat.model_id("FR") == "FR@v2"  # malformed: pinned = the servers' 422
    cat.ttl_s = 0
    monkeypatch.setattr(adapters, "adapter_listing", lambda st: {"MX": ("v2", True), "GB": (None, True)})
    assert cat.ids() == ["GB", "MX"] and cat.model_id("MX") == "MX@v2"  # republished: listed again


def test_mixed_batcher_puts_requests_for_different_adapters_in_one_batch():
    import asyncio

    from cm_ray.serve.pool import MixedBatcher

    batches = []

    def run(items):
        batches.append([i["adapter"] for i in items])
        return [{"text": i["adapter"]} for i in items]

    async def go():
        b = MixedBatcher(run, max_batch_size=3, wait_s=0.2)
        return await asyncio.gather(*(b.submit({"adapter": a}) for a in ["GB", "MX", "__base__", "CN"]))

    out = asyncio.run(go())
    assert [o["text"] for o in out] == ["GB", "MX", "__base__", "CN"]
    assert batches == [["GB", "MX", "__base__"], ["CN"]]


def test_stop_filter_cuts_a_stream_at_the_first_stop_string():
    from cm_ray.serve.pool import StopFilter

    f = StopFilter(["END", "\n\n"])
    sent = [f.push(p) for p in ["Hel", "lo E", "N", "D more"]]
    assert "".join(sent) + f.flush() == "Hello " and f.stopped
    f = StopFilter(None)
    assert [f.push(p) for p in ["a", "b"]] == ["a", "b"] and f.flush() == ""
    f = StopFilter(["xyz"])  # a tail that may begin "xyz" is held back until it cannot
    assert [f.push(p) for p in ["abx", "q", "zz"]] == ["a", "b", "xq"] and f.flush() == "zz"


def test_vllm_context_below_what_the_ingress_admits_is_a_config_error():
    from cm_ray.serve.vllm_server import engine_args

    with pytest.raises(ConfigError, match=r"serve\.vllm\.max_model_len: must be >= serve\.max_prompt_tokens "
                                          r"\+ serve\.max_new_tokens \(2048 \+ 512 = 2560.*got 2048"):
        load_config(REPO / "configs" / "paper.yaml", ["serve.engine=vllm", "serve.vllm.max_model_len=2048"])
    with pytest.raises(ConfigError, match=r"serve\.vllm\.max_model_len.*got 600"):
        load_config(None, ["serve.engine=vllm", "serve.max_prompt_tokens=500", "serve.max_new_tokens=101",
                           "serve.vllm.max_model_len=600"])
    ok = load_config(None, ["serve.engine=vllm", "serve.max_prompt_tokens=500", "serve.max_new_tokens=100",
                            "serve.vllm.max_model_len=600"])
    assert engine_args(ok.serve, "/m", cuda=False)["max_model_len"] == 600
    # unset: the engine's context is exactly what the ingress admits (paper: 2048 + 512)
    paper = load_config(REPO / "configs" / "paper.yaml", ["serve.engine=vllm"])
    assert engine_args(paper.serve, "/m", cuda=True)["max_model_len"] == 2560
    # the transformers engine has no such context to check
    load_config(None, ["serve.engine=transformers", "serve.vllm.max_model_len=64"])


def test_paper_serve_section_on_vllm_gives_autoscaling_gpu_replicas_and_capped_loras():
    from cm_ray.serve.app import vllm_server_options
    from cm_ray.serve.vllm_server import engine_args

    s = load_config(REPO / "configs" / "paper.yaml", ["serve.engine=vllm"]).serve
    opts = vllm_server_options(s)
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 8}
    assert "num_replicas" not in opts and "placement_group_bundles" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}
    gpu, cpu = engine_args(s, "/m", cuda=True), engine_args(s, "/m", cuda=False)
    assert gpu["max_loras"] == s.vllm.max_loras < s.max_adapters_per_replica == 16
    assert gpu["max_cpu_loras"] >= s.max_adapters_per_replica  # all 16 LRU adapters stay in the engine
    assert (gpu["dtype"], gpu["enforce_eager"]) == ("bfloat16", False)
    assert (cpu["dtype"], cpu["enforce_eager"], cpu["max_loras"]) == ("float32", True, s.vllm.max_loras + 1)


def test_responses_name_the_engine_that_generated_them():
    from cm_ray.serve.responses import ENGINE_HEADER, chunk_body, completion_body, engine_of, route_headers

    route = {"culture": "MX", "router_confidence": 0.9, "routed_by": "router"}
    result = {"text": "hola", "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 1,
              "system_fingerprint": "cm_ray-vllm-0.32.0"}
    body = completion_body(True, "auto", result, route)
    assert body["system_fingerprint"] == "cm_ray-vllm-0.32.0" and engine_of(body["system_fingerprint"]) == "vllm"
    assert route_headers(route, result)[ENGINE_HEADER] == "vllm"
    chunk = chunk_body(False, "c", "auto", None, "stop", route, "cm_ray-transformers-5.23.0")
    assert engine_of(chunk["system_fingerprint"]) == "transformers"
    assert engine_of(None, {"x-cm-ray-engine": "transformers"}) == "transformers"
    assert engine_of("fp_44709d6fcb") is None and engine_of(None, {}) is None
    assert "system_fingerprint" not in completion_body(True, "auto", {**result, "system_fingerprint": None}, route)
