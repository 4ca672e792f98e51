"""The Serve app over real HTTP on 127.0.0.1: routing, LRU, mixed batches, hot-load, bad input.

python -m pytest tests/cpu/test_serve.py -q -x
"""

import concurrent.futures as cf
import json
import time
import uuid
from pathlib import Path

import pytest
import requests

from cm_ray.config import load_config
from cm_ray.storage import ArtifactStore, ensure_bucket
from tests.conftest import free_port, serve_app

from test_router import TEXTS, split_pairs
from test_serve_adapters import make_adapter

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-test-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def store(s3_endpoint, tiny_model_dir, tmp_path_factory):
    """An S3 store with a trained router, adapters GB/CN/MX and broken adapters: FR (a bad
    config), BR (a config without weights: PEFT's error names the local copy's path), and
    published ones: KR (DoRA), IN (modules_to_save), ES (NaN weights), PT (finite weights that
    overflow to non-finite logits), AR (a target module the model lacks)."""
    from cm_ray.router.model import Encoder, train_router

    ensure_bucket("s3://cm-ray-test")
    store = ArtifactStore(f"s3://cm-ray-test/serve-{uuid.uuid4().hex[:8]}")
    local = tmp_path_factory.mktemp("adapters")
    for seed, culture in enumerate(["GB", "CN", "MX"]):
        store.upload_dir(make_adapter(tiny_model_dir, local / culture, seed), "adapters", culture)
    store.write_json({"peft_type": "LORA", "r": "not a number"}, "adapters", "FR",
                     "adapter_config.json")
    store.write_json(json.loads((local / "GB" / "adapter_config.json").read_text()), "adapters", "BR",
                     "adapter_config.json")
    for culture, change in BROKEN.items():
        store.publish_dir(broken_adapter(tiny_model_dir, local / culture, change), "adapters", culture)
    router, _ = train_router(*split_pairs(), Encoder("embedded:all-minilm-l6-v2"))
    router.save(store, "router")
    return store


BROKEN = {"KR": ("config", {"use_dora": True}), "IN": ("config", {"modules_to_save": ["lm_head"]}),
          "ES": ("scale", float("nan")), "PT": ("scale", 1e38),
          "AR": ("config", {"target_modules": ["q_proj", "no_such_proj"]})}


def broken_adapter(base_dir, out, change):
    """A real adapter made unservable by ``change``: ("config", keys to set) or ("scale", a
    factor for every lora_B matrix)."""
    from safetensors.torch import load_file, save_file

    make_adapter(base_dir, out, 11)
    kind, value = change
    if kind == "config":
        cfg = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**cfg, **value}))
    else:
        w = load_file(str(out / "adapter_model.safetensors"))
        save_file({k: v * value if "lora_B" in k else v for k, v in w.items()},
                  str(out / "adapter_model.safetensors"))
    return out


@pytest.fixture(scope="module")
def cfg_overrides(store, tiny_model_dir):
    return [f"root={store.root}", f"models.base={tiny_model_dir}", "serve.max_adapters_per_replica=2",
            "serve.max_new_tokens=8", "serve.max_prompt_chars=500", "serve.batch_wait_timeout_s=0.25",
            "serve.ray_actor_cpus=0.5", "serve.max_prompt_tokens=120", "serve.max_messages=16",
            "serve.max_body_bytes=65536", "serve.adapter_cache_ttl_s=0.5", "serve.body_read_timeout_s=3"]


@pytest.fixture(scope="module")
def url(ray_local, cfg_overrides, monkeypatch_module):
    port = free_port()
    monkeypatch_module.setenv("CM_RAY_TEST_KEY", KEY)
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      [*cfg_overrides, f"serve.port={port}", "serve.api_key_env=CM_RAY_TEST_KEY"])
    yield from serve_app(cfg, "cm_ray_test", port)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


AUTH = {"Authorization": f"Bearer {KEY}"}


def chat(url, content, model="auto", headers=None, **kw):
    body = {"model": model, "messages": [{"role": "user", "content": content}], **kw}
    return requests.post(f"{url}/v1/chat/completions", json=body, headers={**AUTH, **(headers or {})},
                         timeout=120)


def test_models_lists_auto_base_and_every_adapter(url):
    r = requests.get(f"{url}/v1/models", headers=AUTH, timeout=30)
    ids = [m["id"] for m in r.json()["data"]]
    assert ids[:2] == ["auto", "base"] and {"GB", "CN", "MX"} <= set(ids)
    assert requests.get(f"{url}/healthz", timeout=10).json()["router"] is True


def test_auto_routes_by_language_and_says_who_answered(url):
    r = chat(url, "¿Qué comemos en el Día de Muertos con la familia?")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["culture"] == "MX" and body["routed_by"] == "router"
    assert 0.4 <= body["router_confidence"] <= 1.0
    assert r.headers["X-Culture"] == "MX" and float(r.headers["X-Router-Confidence"]) > 0.4
    assert r.headers["X-Router-Evidence"] in {"language", "mention", "content"}  # what decided
    assert body["object"] == "chat.completion" and isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["completion_tokens"] <= 8
    assert chat(url, "过年的时候我们吃饺子。").json()["culture"] == "CN"


def test_pinned_model_header_field_metadata_and_base(url):
    assert chat(url, "hello", model="gb").json()["culture"] == "GB"
    r = chat(url, "hello", headers={"X-Culture": "MX"})
    assert (r.json()["culture"], r.json()["routed_by"]) == ("MX", "header")
    assert chat(url, "hello", culture="CHN").json()["culture"] == "CN"
    assert chat(url, "What do we eat at parties?", metadata={"country": "Mexico"}).json()["culture"] == "MX"
    r = chat(url, "hello", model="base")
    assert r.json()["culture"] == "none" and r.headers["X-Culture"] == "none"


def test_completions_and_sse_stream_match_the_plain_answer(url):
    r = requests.post(f"{url}/v1/completions", json={"model": "MX", "prompt": "Hola, ¿cómo"},
                      headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    plain = chat(url, "Cuéntame de las posadas", model="MX").json()["choices"][0]["message"]["content"]
    with requests.post(f"{url}/v1/chat/completions", stream=True, headers=AUTH, timeout=60,
                       json={"model": "MX", "stream": True,
                             "messages": [{"role": "user", "content": "Cuéntame de las posadas"}]}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in s.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["culture"] == "MX" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stream_stop_strings_usage_chunk_and_guided_json_on_transformers(url):
    import openai

    plain = chat(url, "Cuéntame de las posadas", model="MX").json()["choices"][0]["message"]["content"]
    stop = plain[2:4]
    cut = chat(url, "Cuéntame de las posadas", model="MX", stop=[stop]).json()["choices"][0]["message"]["content"]
    assert stop and cut == plain[:plain.index(stop)]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    chunks = list(client.chat.completions.create(
        model="MX", messages=[{"role": "user", "content": "Cuéntame de las posadas"}], stream=True,
        stop=[stop], stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens > 0
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = client.chat.completions.create(model="GB", messages=[{"role": "user", "content": "tea?"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "a", "schema": schema}})
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model="GB", messages=[{"role": "user", "content": "tea?"}], logprobs=True)


def test_lru_eviction_reloads_the_least_recently_used_adapter(url):
    # capacity 2: after GB, CN the replica holds exactly {GB, CN}, whatever ran before
    chat(url, "x", model="GB"), chat(url, "x", model="CN")
    cold = [chat(url, "x", model=m).headers["X-Adapter-Cold"] for m in ["GB", "MX", "GB", "CN"]]
    assert cold == ["0", "1", "0", "1"]  # MX evicted CN (LRU), then CN had to come back
    metrics = requests.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    assert 'cm_ray_adapter_loads_total{culture="CN"}' in metrics


def test_mixed_adapter_batch_over_http_gives_each_adapters_greedy_answer(url):
    jobs = [("GB", "Tell me about tea"), ("MX", "Háblame del mariachi"), ("base", "Hello"),
            ("MX", "Tell me about tea"), ("GB", "Hello")]
    alone = {j: chat(url, j[1], model=j[0]).json()["choices"][0]["message"]["content"] for j in jobs}
    for _attempt in range(3):
        with cf.ThreadPoolExecutor(len(jobs)) as ex:
            rs = list(ex.map(lambda j: chat(url, j[1], model=j[0]), jobs))
        assert [r.json()["choices"][0]["message"]["content"] for r in rs] == [alone[j] for j in jobs]
        if max(int(r.headers["X-Batch-Adapters"]) for r in rs) >= 2:
            break
    else:
        pytest.fail("concurrent requests for different adapters were never batched together")


def test_new_culture_is_served_without_restart(url, store, tiny_model_dir, tmp_path):
    assert chat(url, "hi", model="JP").status_code == 404
    store.upload_dir(make_adapter(tiny_model_dir, tmp_path / "JP", 7), "adapters", "JP")
    time.sleep(1.0)  # the ingress rereads the store once its view is serve.adapter_cache_ttl_s old
    ids = [m["id"] for m in requests.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()["data"]]
    assert "JP" in ids
    r = chat(url, "こんにちは", model="JP")
    assert r.status_code == 200 and r.json()["culture"] == "JP"


def _msgs(content):
    return [{"role": "user", "content": content}]


BAD = [  # (path, raw body or json, headers, status, words in the message)
    ("/v1/chat/completions", b'{"model": "auto", "messages": [', {}, 400, "malformed JSON"),
    ("/v1/chat/completions", b'[1, 2]', {}, 400, "JSON object"),
    ("/v1/chat/completions", {"messages": []}, {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, {}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, {}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, {}, 400, "non-empty user"),
    ("/v1/chat/completions", {"messages": "hello"}, {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": _msgs("hi"), "max_tokens": "5"}, {}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": _msgs("hi"), "max_tokens": 10_000}, {}, 400, "serve.max_new_tokens"),
    ("/v1/chat/completions", {"messages": _msgs("hi"), "temperature": 9}, {}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": _msgs("hi"), "n": 17}, {}, 400, "n"),
    ("/v1/chat/completions", {"messages": _msgs("x" * 600)}, {}, 413, "serve.max_prompt_chars"),
    ("/v1/chat/completions", {"model": "ZZ", "messages": _msgs("hi")}, {}, 404, "unknown culture"),
    ("/v1/chat/completions", {"model": "DE", "messages": _msgs("hi")}, {}, 404, "no adapter"),
    ("/v1/chat/completions", {"model": "../GB", "messages": _msgs("hi")}, {}, 400, "path separators"),
    ("/v1/chat/completions", {"model": "GB/../../etc", "messages": _msgs("hi")}, {}, 400, "path separators"),
    ("/v1/chat/completions", {"model": "..", "messages": _msgs("hi")}, {}, 400, "'..'"),
    ("/v1/chat/completions", {"model": "G B", "messages": _msgs("hi")}, {}, 400, "letters, digits"),
    ("/v1/chat/completions", {"model": "GB\n", "messages": _msgs("hi")}, {}, 400, "letters, digits"),
    ("/v1/chat/completions", {"culture": "MX\n", "messages": _msgs("hi")}, {}, 400, "culture"),
    ("/v1/chat/completions", {"messages": _msgs("hi")}, {"X-Culture": "..\\x"}, 400, "X-Culture"),
    ("/v1/chat/completions", {"messages": _msgs("hi"), "culture": "Narnia"}, {}, 404, "unknown culture"),
    ("/v1/chat/completions", {"model": "FR", "messages": _msgs("hi")}, {}, 422, "could not be loaded"),
    ("/v1/chat/completions", {"model": "FR", "stream": True, "messages": _msgs("hi")}, {}, 422, "FR"),
    ("/v1/chat/completions", {"model": "ZZ", "stream": True, "messages": _msgs("hi")}, {}, 404, "ZZ"),
    ("/v1/completions", {"model": "MX"}, {}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, {}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": _msgs("hi")}, {"Authorization": "Bearer wrong"}, 401, "API key"),
    ("/v1/chat/completions", {"messages": _msgs("hi")}, {"Authorization": ""}, 401, "API key"),
]


@pytest.mark.parametrize("path,body,headers,status,words", BAD,
                         ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_a_4xx_naming_the_problem(url, path, body, headers, status, words):
    kw = {"data": body, "headers": {**AUTH, "Content-Type": "application/json", **headers}} \
        if isinstance(body, bytes) else {"json": body, "headers": {**AUTH, **headers}}
    r = requests.post(f"{url}{path}", timeout=60, **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_errors_name_no_store_uri_or_local_path(url, store):
    import tempfile

    for model, stream in (("BR", False), ("BR", True), ("FR", False)):
        r = chat(url, "hi", model=model, stream=stream)  # a broken adapter: a load error
        assert r.status_code == 422, r.text  # pinned by name: the 422 naming it, listed or not
        msg = r.json()["error"]["message"]
        assert model in msg
        for leak in (store.root, "s3://", tempfile.gettempdir(), "adapter-BR-"):
            assert leak not in msg, msg


def test_server_keeps_serving_after_bad_input_and_counts_per_culture(url):
    assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
    assert chat(url, "Fuimos a comer tacos al pastor.").status_code == 200
    metrics = requests.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    assert 'cm_ray_requests_total{culture="MX",endpoint="chat",status="200"}' in metrics
    assert "cm_ray_request_latency_seconds_bucket" in metrics
    assert "cm_ray_router_latency_seconds_count" in metrics
    assert 'status="500"' not in metrics
    assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401  # no key


def test_run_serve_deploys_routes_one_demo_request_and_cleans_up(url, store, cfg_overrides):
    """With auth on (serve.api_key_env): run_serve's own requests carry the key."""
    from ray import serve

    from cm_ray.serve.stage import run_serve

    port = int(url.rsplit(":", 1)[1])
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      [*cfg_overrides, f"serve.port={port}", "serve.route_prefix=/demo",
                       "serve.app_name=cm_ray_demo", "serve.api_key_env=CM_RAY_TEST_KEY",
                       f"serve.demo_prompt={TEXTS['MX'][0]}"])
    summary = run_serve(cfg, store)
    assert summary["culture"] == "MX" and summary["routed_by"] == "router"
    assert isinstance(summary["answer"], str) and summary["latency_ms"] > 0
    assert summary["adapters"] >= 3 and "MX" in summary["headline"]
    assert "cm_ray_demo" not in serve.status().applications  # its app is gone ...
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200  # ... the other one stays


@pytest.mark.parametrize("culture,words", [("KR", "DoRA"), ("IN", "modules_to_save"), ("ES", "NaN"),
                                           ("AR", "no_such_proj")])
def test_a_broken_published_adapter_pinned_by_name_is_a_422_naming_it_and_is_never_listed(url, culture, words):
    for stream in (False, True):
        r = chat(url, "hi", model=culture, stream=stream)
        assert r.status_code == 422, r.text
        assert culture in r.json()["error"]["message"] and words in r.json()["error"]["message"]
    ids = [m["id"] for m in requests.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()["data"]]
    assert culture not in ids and "GB" in ids
    assert chat(url, "hello", model="GB").status_code == 200  # every other adapter still served


def test_an_adapter_yielding_non_finite_values_fails_only_its_own_requests(url):
    """PT's weights are finite but overflow: in a mixed batch (sampling, so NaN would break the
    whole batch's sampling) it gets a 422 naming it, its neighbours their answers; then it is
    refused and no longer listed, and later requests for other adapters are served."""
    jobs = [("GB", "Tell me about tea"), ("PT", "Olá"), ("base", "Hello"), ("MX", "Hola")]
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        rs = list(ex.map(lambda j: chat(url, j[1], model=j[0], temperature=0.7), jobs))
    assert [r.status_code for r in rs] == [200, 422, 200, 200], [r.text for r in rs]
    assert "PT" in rs[1].json()["error"]["message"] and "non-finite" in rs[1].json()["error"]["message"]
    assert chat(url, "Olá", model="PT").status_code == 422
    time.sleep(1.0)  # the ingress view: serve.adapter_cache_ttl_s
    ids = [m["id"] for m in requests.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()["data"]]
    assert "PT" not in ids
    assert all(chat(url, "hi", model=m).status_code == 200 for m in ("GB", "CN", "MX", "base"))


def test_unencodable_text_in_any_string_field_is_a_400_naming_the_field(url):
    for body, field in ((b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages.0.content"),
                        (b'{"messages": [{"role": "user", "content": "hi"}], "metadata": {"note": "\\udfff"}}',
                         "metadata.note"),
                        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud83d"]}', "stop.0"),
                        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
                         "messages.0.content.0.text")):
        r = requests.post(f"{url}/v1/chat/completions", data=body, timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def _raw(url: str, data: bytes) -> bytes:
    """Send ``data`` as is over a socket (kept open: a half-closed connection gets no answer
    from uvicorn); the first line of the answer (b"" when none came)."""
    import socket

    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        got = b""
        try:
            while b"\r\n" not in got and (piece := sock.recv(4096)):
                got += piece
        except (ConnectionResetError, TimeoutError):
            pass
    return got.split(b"\r\n", 1)[0]


def test_malformed_http_framing_gets_a_400_and_a_chunked_body_is_served(url):
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    body = json.dumps({"model": "GB", "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\n"
    chunked = head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + \
        f"{len(body):x}".encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"
    assert _raw(url, chunked).startswith(b"HTTP/1.1 200"), _raw(url, chunked)
    # promises more than it sends: the body read times out (serve.body_read_timeout_s)
    assert _raw(url, head + b"Content-Length: 500\r\n\r\n" + body).startswith(b"HTTP/1.1 408")
    for bad in (head + b"Content-Length: 5\r\n\r\n" + body,  # less: a truncated body
                b"GET /../v1/models HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
                head + b"X-Culture: M\xffX\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body):
        got = _raw(url, bad)
        assert got.startswith(b"HTTP/1.1 400"), (bad[:120], got)


def test_openai_error_shapes_routes_content_type_and_auth_on_every_route(url):
    for r in (requests.get(f"{url}/v1/nothing", headers=AUTH, timeout=10),
              requests.get(f"{url}/v1/chat/completions", headers=AUTH, timeout=10),
              requests.get(f"{url}/v1/models/ZZ", headers=AUTH, timeout=10),
              requests.post(f"{url}/v1/chat/completions", data="messages=hi", timeout=10,
                            headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})):
        err = r.json()["error"]
        assert r.status_code in (400, 404, 405) and set(err) == {"message", "type", "param", "code"}
        assert err["code"] is None or isinstance(err["code"], str)
    assert r.status_code == 400 and err["param"] == "Content-Type"
    m = requests.get(f"{url}/v1/models/mx", headers=AUTH, timeout=10).json()
    assert m["id"] == "MX" and m["object"] == "model" and isinstance(m["created"], int)
    for path in ("/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/models/MX"):
        assert requests.get(f"{url}{path}", timeout=10).status_code == 401, path
        assert requests.get(f"{url}{path}", headers=AUTH, timeout=10).status_code == 200, path
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200

