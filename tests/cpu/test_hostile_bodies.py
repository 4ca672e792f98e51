"""Hostile providers: answers too large to hold and answers that echo the API key back.

Real aiohttp servers on 127.0.0.1 speak each provider's format: a body over the configured limit
(``search.max_response_bytes``, ``synthesis.openai.max_response_bytes``) is refused while it
streams (the server is cut off long before it has sent it all) and is that row's counted error,
not retried and never an exception out of the batch; a provider that echoes a key (raw,
URL-encoded, base64 at any offset, e.g. ``Basic base64(user:key)``) in hit titles, snippets,
URLs or completions gets it scrubbed before anything is stored.

python -m pytest tests/cpu/test_hostile_bodies.py -q
"""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cm_ray.config import SearchConfig
from cm_ray.data.searcher import Searcher
from cm_ray.generation.base import GenerationParams
from cm_ray.generation.openai_client import OpenAIEngine
from cm_ray.http import RequestFailed, read_body, scrub, send
from cm_ray.ray_utils import Secrets

ROW = {"query_id": "1", "culture": "MX", "task": "survey", "kind": "agnostic", "query": "modales",
       "locale": "es-MX"}
HUGE = 200 * 2**20  # what the hostile server would send if nobody stopped it


class Flood:
    """Streams ``prefix`` then filler without a Content-Length, counting what it got to send."""

    def __init__(self, prefix: bytes = b'{"results": [{"title": "'):
        self.prefix, self.sent, self.requests = prefix, 0, 0

    async def __call__(self, request):
        self.requests += 1
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        chunk = b"x" * 65536
        try:
            await resp.write(self.prefix)
            while self.sent < HUGE:
                await resp.write(chunk)
                self.sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up: what we want
        return resp


async def _serve(path: str, handler, method: str = "GET") -> TestServer:
    app = web.Application()
    app.router.add_route(method, path, handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def test_send_refuses_a_body_over_its_limit_while_it_streams():
    flood = Flood()
    server = await _serve("/big", flood)
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(RequestFailed) as e:
                await send(session, "GET", f"http://127.0.0.1:{server.port}/big", timeout_s=30,
                           max_bytes=1_000_000, limit_name="search.max_response_bytes")
        assert not e.value.retryable
        assert "over the 1000000-byte limit (search.max_response_bytes)" in e.value.reason
        assert flood.sent < HUGE / 4  # the client stopped reading: the server never got far
    finally:
        await server.close()


async def test_a_declared_length_over_the_limit_is_refused_before_reading_and_cut_keeps_what_fits():
    async def declared(request):
        return web.Response(body=b"y" * 300_000, content_type="text/html")

    server = await _serve("/declared", declared)
    url = f"http://127.0.0.1:{server.port}/declared"
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(RequestFailed, match="300000 bytes declared"):
                await send(session, "GET", url, timeout_s=10, max_bytes=100_000)
            # The page-fetch way (fetch.max_bytes): keep the first bytes, no error.
            async with session.get(url) as resp:
                assert await read_body(resp, 1000, cut=True) == b"y" * 1000
            assert (await send(session, "GET", url, timeout_s=10, max_bytes=300_000)).body == b"y" * 300_000
    finally:
        await server.close()


async def test_an_oversized_search_answer_fails_that_query_once_and_the_next_succeeds():
    flood = Flood()
    calls = {"n": 0}

    async def search(request):
        calls["n"] += 1
        if calls["n"] == 1:
            return await flood(request)
        return web.json_response({"results": [{"title": "ok", "url": "https://e.org/", "content": "c"}]})

    server = await _serve("/search", search)
    try:
        searcher = Searcher(SearchConfig(provider="searxng", qps=None, max_retries=3, backoff_base_s=0.01,
                                         endpoint=f"http://127.0.0.1:{server.port}/search",
                                         max_response_bytes=500_000))
        bad = await searcher.search_row(ROW)
        good = await searcher.search_row({**ROW, "query_id": "2"})
        await searcher.close()
    finally:
        await server.close()
    assert bad["status"] == "failed" and bad["attempts"] == 1 and bad["retries"] == 0
    assert "searxng: response body over the 500000-byte limit (search.max_response_bytes)" in bad["error"]
    assert flood.requests == 1 and flood.sent < HUGE / 4
    assert good["status"] == "ok" and good["hits"][0]["title"] == "ok"


def test_search_max_response_bytes_is_validated():
    from cm_ray.config import ConfigError, load_config

    assert load_config(None, []).search.max_response_bytes > 0
    assert load_config(None, []).synthesis.openai.max_response_bytes > 0
    with pytest.raises(ConfigError, match="search.max_response_bytes"):
        load_config(None, ["search.max_response_bytes=0"])


def _echoes(key: str) -> list[str]:
    """A key as an echoing server might spell it: raw, URL-encoded, base64 at each offset."""
    b64 = [base64.b64encode(f"{p}{key}".encode()).decode() for p in ("", "u:", "ab:")]
    return [key, quote(key, safe=""), *b64, base64.urlsafe_b64encode(key.encode()).decode()]


def _leaks(text: str, key: str) -> list[str]:
    """Spellings of ``key`` left in ``text``: any echo form, or a base64 run (either alphabet,
    any offset) that decodes to something holding the key."""
    found = [s for s in _echoes(key) if s in text]
    for run in re.findall(r"[A-Za-z0-9+/_=-]{8,}", text):
        for i in range(4):
            chunk = run[i:].rstrip("=").replace("-", "+").replace("_", "/")
            chunk = chunk[:len(chunk) // 4 * 4]
            try:
                if key.encode() in base64.b64decode(chunk):
                    found.append(run)
            except ValueError:
                pass
    return found


async def test_keys_echoed_in_hits_are_scrubbed_in_every_spelling(monkeypatch):
    brave_key, other_key = "brv-Abc+d/ef=123456", "srp-0987-zyx+wv"
    spelled = [*_echoes(brave_key), *_echoes(other_key)]

    async def brave(request):
        token = request.headers["X-Subscription-Token"]
        assert token == brave_key  # the key did travel
        return web.json_response({"web": {"results": [
            {"title": f"title {s}", "url": f"https://e.org/?k={s}", "description": f"echo: {s} Basic {s}"}
            for s in spelled]}})

    server = await _serve("/res/v1/web/search", brave)
    try:
        cfg = SearchConfig(provider="brave", fallback=["serper"], qps=None, top_k=20,
                           endpoint=f"http://127.0.0.1:{server.port}/res/v1/web/search")
        searcher = Searcher(cfg, secrets=Secrets({"BRAVE_API_KEY": brave_key, "SERPER_API_KEY": other_key}))
        row = await searcher.search_row(ROW)
        await searcher.close()
    finally:
        await server.close()
    assert row["status"] == "ok" and len(row["hits"]) == len(spelled)
    stored = json.dumps(row["hits"])
    assert "***" in stored
    assert not _leaks(stored, brave_key) and not _leaks(stored, other_key), stored[:500]


def test_scrub_finds_base64_of_a_key_at_any_offset_and_leaves_other_text():
    key = "sk-live-0123456789abcdef"
    for p in ("", "u:", "ab:", "Bearer "):
        enc = base64.b64encode(f"{p}{key} tail".encode()).decode()
        assert not _leaks(scrub(enc, [key]), key), (p, scrub(enc, [key]))
    plain = "an ordinary sentence about base64 and keys, QUJD and sk-live"
    assert scrub(plain, [key]) == plain


async def test_an_oversized_completion_is_that_rows_error_and_an_echoed_key_is_scrubbed(monkeypatch):
    key = "sk-echo-Zz9+/Yy8=xx"
    monkeypatch.setenv("CM_RAY_HOSTILE_KEY", key)
    flood = Flood(prefix=b'{"choices": [{"message": {"content": "')

    async def chat(request):
        body = await request.json()
        if body["messages"][-1]["content"] == "big":
            return await flood(request)
        auth = request.headers["Authorization"]
        echo = " ".join(_echoes(auth.split()[-1]))
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": f"{auth} {echo}"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 3}})

    server = await _serve("/v1/chat/completions", chat, "POST")
    try:
        eng = OpenAIEngine(f"http://127.0.0.1:{server.port}/v1", "m", api_key_env="CM_RAY_HOSTILE_KEY",
                           max_retries=3, backoff_base_s=0.01, max_response_bytes=200_000)
        gens = await eng.agenerate([[{"role": "user", "content": "big"}], [{"role": "user", "content": "hi"}]],
                                   GenerationParams(max_new_tokens=8))
    finally:
        await server.close()
    big, ok = gens
    assert big.finish_reason == "error" and big.retries == 0 and flood.requests == 1
    assert "over the 200000-byte limit (synthesis.openai.max_response_bytes)" in big.error
    assert flood.sent < HUGE / 4 and eng.usage["errors"] == 1
    assert ok.finish_reason == "stop" and ok.text.startswith("Bearer ***")
    assert not _leaks(ok.text, key), ok.text


async def test_fetched_pages_that_echo_a_key_are_scrubbed_and_cut_at_fetch_max_bytes():
    key = "brv-Page+Key/777999"

    async def brave(request):
        base = f"http://127.0.0.1:{request.url.port}"
        return web.json_response({"web": {"results": [
            {"title": "t", "url": f"{base}/page", "description": "d"}]}})

    async def page(request):  # a page that shows the key it was reached with, then floods
        text = "".join(f"<p>your token {s} is active</p>" for s in _echoes(key))
        return web.Response(text=f"<html><body><article><h1>Session</h1>{text}{'<p>filler text</p>' * 9000}"
                                 "</article></body></html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/res/v1/web/search", brave)
    app.router.add_get("/page", page)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        cfg = SearchConfig(provider="brave", qps=None, top_k=1,
                           endpoint=f"http://127.0.0.1:{server.port}/res/v1/web/search",
                           fetch={"enabled": True, "top_k": 1, "allow_private_urls": True, "max_bytes": 20000})
        searcher = Searcher(cfg, secrets=Secrets({"BRAVE_API_KEY": key}))
        row = await searcher.search_row(ROW)
        await searcher.close()
    finally:
        await server.close()
    [p] = row["pages"]
    assert p["error"] is None and "your token" in p["text"] and "***" in p["text"]
    assert not _leaks(p["text"], key), p["text"][:400]
    assert p["text"].count("filler text") < 2000  # cut near fetch.max_bytes, not all 9000
