"""OpenAI-compatible HTTP engine against a real aiohttp server on 127.0.0.1 with injected 429/500s.

python -m pytest tests/cpu/test_engines_openai.py -q
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from cm_ray.config import load_config
from cm_ray.generation.base import GenerationParams
from cm_ray.generation.openai_client import OpenAIEngine
from cm_ray.http import parse_retry_after as retry_after_s


class ChatServer:
    """Speaks OpenAI's chat-completions JSON. A user message containing FAIL429 / FAIL500 gets that
    status on its first attempt (429 with Retry-After), BAD gets a 400 every time."""

    def __init__(self):
        from aiohttp import web

        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self.runner = web.AppRunner(app)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(web), self.loop).result()

    async def _start(self, web):
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def handle(self, request):
        from aiohttp import web

        body = await request.json()
        user = body["messages"][-1]["content"]
        self.requests.append({"t": time.monotonic(), "body": body, "auth": request.headers.get("Authorization")})
        n = self.seen[user] = self.seen.get(user, 0) + 1
        if "BAD" in user:
            return web.json_response({"error": {"message": "bad request"}}, status=400)
        if "FAIL429" in user and n == 1:
            return web.json_response({"error": {"message": "rate limited"}}, status=429,
                                     headers={"Retry-After": "0.2"})
        if "FAIL500" in user and n == 1:
            return web.json_response({"error": {"message": "oops"}}, status=500)
        text = json.dumps({"text": user[:20], "label": "offensive"}) if "response_format" in body else f"echo: {user}"
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}})

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def server():
    s = ChatServer()
    yield s
    s.close()


def _engine(server, **kw) -> OpenAIEngine:
    opts = dict(api_key_env="CM_RAY_TEST_KEY", max_retries=3, backoff_base_s=0.05, price_in_per_1m=2.0,
                price_out_per_1m=10.0)
    return OpenAIEngine(server.url(), "test-model", **{**opts, **kw})


def test_retries_429_and_500_then_counts_tokens_and_cost(server, monkeypatch):
    monkeypatch.setenv("CM_RAY_TEST_KEY", "sk-secret-123")
    eng = _engine(server)
    t0 = time.monotonic()
    gens = eng.generate([[{"role": "user", "content": "FAIL429 a"}], [{"role": "user", "content": "FAIL500 b"}],
                         [{"role": "user", "content": "ok c"}]], GenerationParams(max_new_tokens=8))
    assert [g.text for g in gens] == ["echo: FAIL429 a", "echo: FAIL500 b", "echo: ok c"]
    assert [g.retries for g in gens] == [1, 1, 0]
    assert time.monotonic() - t0 >= 0.2  # Retry-After: 0.2 honoured
    assert len(server.requests) == 5
    assert all(r["auth"] == "Bearer sk-secret-123" for r in server.requests)
    assert eng.usage["requests"] == 5 and eng.usage["retries"] == 2 and eng.usage["errors"] == 0
    assert eng.usage["prompt_tokens"] == 30 and eng.usage["output_tokens"] == 12
    assert eng.usage["cost_usd"] == pytest.approx(3 * (10 * 2.0 + 4 * 10.0) / 1e6)
    assert gens[2].cost_usd == pytest.approx((10 * 2.0 + 4 * 10.0) / 1e6)


def test_client_errors_are_not_retried_and_the_key_is_never_in_the_error(server, monkeypatch):
    monkeypatch.setenv("CM_RAY_TEST_KEY", "sk-secret-123")
    eng = _engine(server)
    g = eng.generate([[{"role": "user", "content": "BAD"}]], GenerationParams())[0]
    assert g.finish_reason == "error" and g.retries == 0 and "HTTP 400" in g.error
    assert "sk-secret" not in g.error and "sk-secret" not in repr(eng.__dict__)
    assert len(server.requests) == 1 and eng.usage["errors"] == 1


def test_retries_give_up_after_max_retries(server):
    eng = _engine(server, max_retries=0)
    g = eng.generate([[{"role": "user", "content": "FAIL500 x"}]], GenerationParams())[0]
    assert g.finish_reason == "error" and "HTTP 500" in g.error and len(server.requests) == 1


def test_json_schema_goes_out_as_response_format(server):
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    g = _engine(server).generate([[{"role": "user", "content": "x"}]],
                                 GenerationParams(json_schema=schema, seed=3, stop=["\n\n"]))[0]
    body = server.requests[0]["body"]
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "sample", "schema": schema}}
    assert body["seed"] == 3 and body["stop"] == ["\n\n"] and body["model"] == "test-model"
    assert json.loads(g.text)["label"] == "offensive"


def test_qps_limit_spaces_request_starts(server):
    # Checks the engine's real limiter on real HTTP with bounds machine load cannot break (load
    # only delays things): the limiter's grants, stamped on time.monotonic when made, are >= 1/qps
    # apart; every request the server saw needed a grant before it (the k-th request to arrive
    # came after the k-th grant, on the same clock); so the last arrives >= (n-1)/qps after the
    # call began. The spacing itself holds by construction, see tests/cpu/test_rate_limit.py.
    eng = _engine(server, qps=20.0)
    grants, acquire = [], eng.limiter.acquire

    async def recorded():
        grants.append(await acquire())

    eng.limiter.acquire = recorded
    t0 = time.monotonic()
    eng.generate([[{"role": "user", "content": f"q{i}"}] for i in range(6)], GenerationParams())
    arrivals = sorted(r["t"] for r in server.requests)
    assert len(grants) == len(arrivals) == 6
    assert all(b - a >= 1 / 20.0 for a, b in zip(grants, grants[1:])), grants
    assert all(t0 <= g <= a for g, a in zip(grants, arrivals)), (grants, arrivals)
    assert arrivals[-1] - t0 >= 5 / 20.0


def test_retry_after_accepts_seconds_and_http_dates():
    assert retry_after_s("1.5") == 1.5
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    assert 0 <= retry_after_s(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 3))) <= 3.5


def test_generate_runs_the_http_engine_as_an_async_ray_data_udf(ray_local, server, tiny_model_dir):
    from cm_ray.generation.generate import generate, usage_totals

    cfg = load_config(None, [f"models.generator={tiny_model_dir}", "synthesis.engine=openai",
                             f"synthesis.openai.base_url={server.url()}", "synthesis.openai.model=m",
                             "synthesis.batch_size=4", "synthesis.openai.backoff_base_s=0.05",
                             "synthesis.openai.price_out_per_1m=1.0"])
    schema = json.dumps({"type": "object", "properties": {"text": {"type": "string"}}})
    rows = [{"id": i, "messages": [{"role": "user", "content": f"{'FAIL429 ' if i == 2 else ''}row {i}"}],
             "json_schema": schema if i % 2 else None} for i in range(6)]
    out = sorted(generate(ray_local.data.from_items(rows), cfg, max_new_tokens=8, temperature=0.0).take_all(),
                 key=lambda r: r["id"])
    assert [r["id"] for r in out] == list(range(6))
    for r in out:
        assert r["engine"] == "openai" and r["model"] == "m" and r["finish_reason"] == "stop"
        if r["id"] % 2:
            assert json.loads(r["generated_text"])["label"] == "offensive"
        else:
            assert r["generated_text"] == f"echo: {r['messages'][0]['content']}"
    tot = usage_totals(out)
    assert tot["rows"] == 6 and tot["retries"] == 1 and tot["output_tokens"] == 24 and tot["errors"] == 0
    assert tot["cost_usd"] == pytest.approx(24 / 1e6)
