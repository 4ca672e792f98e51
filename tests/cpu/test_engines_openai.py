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
from tests.conftest import LoopbackChatServer


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
    # only delays things): the limiter's grants, stamped on time.monotonic when made, follow the
    # GCRA bounds (a late grant keeps its slot within half a slot: two grants >= 0.5/qps apart,
    # k+1 grants span >= (k - 0.5)/qps); every request the server saw needed a grant before it
    # (the k-th request to arrive came after the k-th grant, on the same clock); so the last
    # arrives >= (n - 1.5)/qps after the call began. The bounds hold by construction, see
    # tests/cpu/test_rate_limit.py.
    eng = _engine(server, qps=20.0)
    grants, acquire = [], eng.limiter.acquire

    async def recorded():
        grants.append(await acquire())

    eng.limiter.acquire = recorded
    t0 = time.monotonic()
    eng.generate([[{"role": "user", "content": f"q{i}"}] for i in range(6)], GenerationParams())
    arrivals = sorted(r["t"] for r in server.requests)
    assert len(grants) == len(arrivals) == 6
    for k in range(1, 6):
        assert all(b - a >= (k - 0.5) / 20.0 for a, b in zip(grants, grants[k:])), (k, grants)
    assert all(t0 <= g <= a for g, a in zip(grants, arrivals)), (grants, arrivals)
    assert arrivals[-1] - t0 >= 4.5 / 20.0


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


# ---------------------------------------------------------------------------------------------
# Malformed 200 answers: a per-row error with its reason (retried where retryable), never a
# failed batch; and the key never in an error or a text, whatever the endpoint echoes.

def _ok(content: str = "fine", usage: dict | None = None) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": usage if usage is not None else {"prompt_tokens": 3, "completion_tokens": 2}}


# tag -> (answer: bytes (raw JSON body) or dict, retryable, reason fragment in gen_error)
MALFORMED = {
    "badjson": (b'{"choices": [{"message": ', True, "invalid JSON"),
    "html": (b"<html>502 bad gateway</html>", True, "invalid JSON"),
    "truncated": (None, True, "truncated response"),
    "not_object": ([1, 2, 3], False, "malformed answer: answer"),
    "no_choices": ({"object": "chat.completion"}, False, "malformed answer: choices: Field required"),
    "empty_choices": ({"choices": []}, False, "malformed answer: choices: List should have at least 1"),
    "choices_dict": ({"choices": {"0": {}}}, False, "malformed answer: choices: Input should be a valid list"),
    "null_message": ({"choices": [{"message": None}]}, False, "malformed answer: choices.0.message"),
    "no_content": ({"choices": [{"message": {"role": "assistant"}}]}, False,
                   "malformed answer: choices.0.message.content: Field required"),
    "null_content": ({"choices": [{"message": {"content": None}}]}, False, "choices.0.message.content"),
    "int_content": ({"choices": [{"message": {"content": 42}}]}, False, "choices.0.message.content"),
    "str_tokens": (_ok(usage={"prompt_tokens": "ten", "completion_tokens": 2}), False, "usage.prompt_tokens"),
    "neg_tokens": (_ok(usage={"prompt_tokens": 3, "completion_tokens": -5}), False,
                   "usage.completion_tokens: Input should be greater than or equal to 0"),
    "float_tokens": (_ok(usage={"prompt_tokens": 1.5, "completion_tokens": 2}), False, "usage.prompt_tokens"),
    "usage_list": (_ok(usage=[1, 2]), False, "malformed answer: usage"),
    "bad_finish": ({"choices": [{"message": {"content": "x"}, "finish_reason": 7}]}, False,
                   "choices.0.finish_reason"),
}


class MalformedServer(LoopbackChatServer):
    """Answers 200 with the malformed form its tag (the user message) names; ``flaky`` is
    invalid JSON once, then fine; anything else is a well-formed answer."""

    def __init__(self):
        self.seen: dict[str, int] = {}
        super().__init__()

    async def handle(self, request):
        from aiohttp import web

        tag = (await request.json())["messages"][-1]["content"]
        n = self.seen[tag] = self.seen.get(tag, 0) + 1
        if tag == "flaky" and n == 1:
            return web.Response(body=b"{", content_type="application/json")
        if tag == "truncated":  # headers promise 400 bytes, the connection closes after 12
            request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                    b"Content-Length: 400\r\n\r\n{\"choices\": ")
            request.transport.close()
            return web.Response()
        answer = MALFORMED.get(tag, (_ok(f"echo {tag}"),))[0]
        body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        return web.Response(body=body, content_type="application/json")


@pytest.fixture
def malformed():
    s = MalformedServer()
    yield s
    s.close()


def test_every_malformed_answer_is_a_row_error_with_its_reason_and_retryable_ones_are_retried(malformed):
    eng = OpenAIEngine(malformed.url, "m", api_key_env="CM_RAY_TEST_KEY", max_retries=2, backoff_base_s=0.01)
    tags = ["ok1", *MALFORMED, "flaky", "ok2"]
    gens = eng.generate([[{"role": "user", "content": t}] for t in tags], GenerationParams())
    by = dict(zip(tags, gens))
    for tag, (_, retryable, reason) in MALFORMED.items():
        g = by[tag]
        assert g.finish_reason == "error" and g.text == "" and reason in g.error, (tag, g.error)
        assert g.retries == (2 if retryable else 0), (tag, g.retries)
        assert malformed.seen[tag] == (3 if retryable else 1), tag
    for tag in ("ok1", "ok2"):
        assert by[tag].finish_reason == "stop" and by[tag].text == f"echo {tag}" and by[tag].error is None
        assert (by[tag].prompt_tokens, by[tag].output_tokens) == (3, 2)
    assert by["flaky"].text == "echo flaky" and by["flaky"].retries == 1 and by["flaky"].error is None
    assert eng.usage["errors"] == len(MALFORMED)
    assert eng.usage["retries"] == 1 + 2 * sum(r for _, r, _ in MALFORMED.values())


class EchoServer(LoopbackChatServer):
    """Echoes the request headers back: in a 401 page (the key cut at the quoted length, in raw,
    JSON-escaped and URL-encoded spellings) and, for ``echo200``, in the answer's text."""

    async def handle(self, request):
        from urllib.parse import quote

        from aiohttp import web

        auth = request.headers.get("Authorization", "")
        tag = (await request.json())["messages"][-1]["content"]
        if tag == "echo200":
            return web.json_response(_ok(f"you sent {auth}"))
        pad = "x" * (300 - len("HTTP 401: ") - 12)  # the key straddles the 300-char cut
        return web.Response(status=401, text=f"{pad}{auth} {json.dumps(auth)} {quote(auth, safe='')}")


def test_an_endpoint_echoing_the_authorization_header_never_puts_the_key_into_a_row(monkeypatch):
    key = "sk-live/Abc+123_very-long-key-value-0123456789"
    monkeypatch.setenv("CM_RAY_TEST_KEY", key)
    server = EchoServer()
    try:
        eng = OpenAIEngine(server.url, "m", api_key_env="CM_RAY_TEST_KEY", max_retries=0)
        bad, echoed = eng.generate([[{"role": "user", "content": "echo401"}],
                                    [{"role": "user", "content": "echo200"}]], GenerationParams())
    finally:
        server.close()
    assert bad.finish_reason == "error" and bad.error.startswith("HTTP 401: xxx") and "***" in bad.error
    assert echoed.text == "you sent Bearer ***"
    for prefix in (key[:8], "sk-live", "Abc+123", "Abc%2B123"):
        assert prefix not in bad.error + echoed.text + repr(eng.__dict__)


def test_an_unexpected_exception_is_one_row_error_scrubbed_of_key_and_paths(monkeypatch):
    monkeypatch.setenv("CM_RAY_TEST_KEY", "sk-exc-999")

    class Session:  # the network edge raising what no handler expects, its message holding both
        async def __aenter__(self):
            return self

        async def __aexit__(self, *a):
            return False

        def request(self, method, url, **kw):
            if kw["json"]["messages"][-1]["content"] == "boom":
                raise RuntimeError("cannot read /home/alice/.config/openai/sk-exc-999.json (s3://bucket/x)")
            raise ValueError("sk-exc-999")

    eng = OpenAIEngine("http://127.0.0.1:9/v1", "m", api_key_env="CM_RAY_TEST_KEY", max_retries=0,
                       session_factory=Session)
    boom, other = eng.generate([[{"role": "user", "content": "boom"}], [{"role": "user", "content": "x"}]],
                               GenerationParams())
    assert boom.finish_reason == "error" and boom.error == "RuntimeError: cannot read <path> (<path>)"
    assert other.finish_reason == "error" and other.error == "ValueError: ***"
