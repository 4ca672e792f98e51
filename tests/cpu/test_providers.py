"""Search providers against real aiohttp servers on 127.0.0.1 speaking each provider's JSON,
with injected faults (429 + Retry-After, 500, timeouts, invalid JSON, truncated bodies); BM25.

python -m pytest tests/cpu/test_providers.py -v
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cm_ray.config import ConfigError, SearchConfig, load_config
from cm_ray.data.providers import HIT_FIELDS, BM25Provider, ProviderError, load_corpus, make_provider
from cm_ray.data.search_cache import cache_key
from cm_ray.data.searcher import Searcher
from cm_ray.http import TokenBucket, backoff_delay, parse_retry_after

KEYS = {"BRAVE_API_KEY": "brave-secret-1", "SERPER_API_KEY": "serper-secret-2",
        "TAVILY_API_KEY": "tvly-secret-3", "YDC_API_KEY": "ydc-secret-4"}

# Where each provider lives on the fake server, and the paths its real API uses.
PATHS = {"searxng": "/searxng/search", "brave": "/brave/res/v1/web/search",
         "serper": "/serper/search", "tavily": "/tavily/search", "you": "/you/v1/search"}


def _answer(provider: str, query: str, n: int = 3) -> dict:
    items = [(f"{query} result {i}", f"https://example.org/{provider}/{i}", f"snippet {i} for {query}")
             for i in range(1, n + 1)]
    if provider == "searxng":
        return {"query": query, "results": [{"title": t, "url": u, "content": s, "engine": "x"}
                                            for t, u, s in items]}
    if provider == "brave":
        return {"type": "search", "web": {"type": "search", "results": [
            {"title": t, "url": u, "description": s} for t, u, s in items]}}
    if provider == "serper":
        return {"searchParameters": {"q": query}, "organic": [
            {"title": t, "link": u, "snippet": s, "position": i + 1} for i, (t, u, s) in enumerate(items)]}
    if provider == "tavily":
        return {"query": query, "results": [{"title": t, "url": u, "content": s, "score": 0.9}
                                            for t, u, s in items], "response_time": 0.1}
    return {"results": {"web": [{"url": u, "title": t, "description": "d", "snippets": [s]}
                                for t, u, s in items]}, "metadata": {"query": query}}


class FakeProviders:
    """One aiohttp app serving all five providers. Queries starting with ``fault:`` misbehave."""

    def __init__(self):
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        provider = next(p for p, path in PATHS.items() if request.path == path)
        body = await request.json() if request.method == "POST" else {}
        query = request.query.get("q") or request.query.get("query") or body.get("q") or body.get("query")
        self.requests.append({"provider": provider, "method": request.method, "query": query,
                              "params": dict(request.query), "json": body,
                              "headers": dict(request.headers), "t": time.monotonic()})
        n = self.seen[query] = self.seen.get(query, 0) + 1
        parts = query.split(":") if query.startswith("fault:") else []
        kind = parts[1] if parts else ""
        times = int(parts[2]) if len(parts) > 2 else 10**6
        if kind == "429" and n <= times:
            return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
        if kind == "500" and n <= times:
            return web.Response(status=500, text="boom")
        if kind == "timeout" and n <= times:
            await asyncio.sleep(2)
        if kind == "badjson":
            return web.Response(text='{"results": [ not json', content_type="application/json")
        if kind == "shape":
            return web.json_response({"unexpected": True})
        if kind == "echo401":  # an error page that echoes the request headers back
            return web.Response(status=401, text=json.dumps(dict(request.headers)))
        if kind == "truncated":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 4000
            await resp.prepare(request)
            await resp.write(b'{"results": [{"title": "cut')
            request.transport.close()
            return resp
        return web.json_response(_answer(provider, query))


@pytest.fixture
async def fake():
    state = FakeProviders()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.base = f"http://127.0.0.1:{server.port}"
    yield state
    await server.close()


@pytest.fixture
def keys(monkeypatch):
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)
    return KEYS


def _cfg(fake, provider="searxng", **kw) -> SearchConfig:
    endpoints = {p: fake.base + path for p, path in PATHS.items()}
    base = dict(provider=provider, endpoints=endpoints, top_k=2, qps=None, max_retries=2,
                backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=0.5)
    return SearchConfig(**{**base, **kw})


def _row(query: str, culture="MX", locale="es-MX") -> dict:
    return {"query_id": f"q-{abs(hash(query))}", "culture": culture, "task": "offensive",
            "kind": "specific", "query": query, "locale": locale}


async def _search(cfg: SearchConfig, query: str, culture="MX", locale="es-MX", buckets=None) -> dict:
    searcher = Searcher(cfg, buckets)
    try:
        return await searcher.search_row(_row(query, culture, locale))
    finally:
        await searcher.close()


@pytest.mark.parametrize("provider", list(PATHS))
async def test_each_provider_sends_its_documented_request_and_normalizes_hits(fake, keys, provider):
    out = await _search(_cfg(fake, provider), "saludos en méxico")
    assert out["status"] == "ok" and out["error"] is None and out["provider"] == provider
    assert [h["rank"] for h in out["hits"]] == [1, 2]  # top_k applied
    for h in out["hits"]:
        assert tuple(h) == HIT_FIELDS and h["provider"] == provider and h["locale"] == "es-MX"
        assert h["url"].startswith(f"https://example.org/{provider}/") and "saludos" in h["snippet"]
    (req,) = fake.requests
    p, j, hd = req["params"], req["json"], req["headers"]
    if provider == "searxng":
        assert p == {"q": "saludos en méxico", "format": "json", "language": "es-MX"}
    elif provider == "brave":
        assert req["method"] == "GET" and p["country"] == "MX" and p["search_lang"] == "es"
        assert hd["X-Subscription-Token"] == KEYS["BRAVE_API_KEY"]
    elif provider == "serper":
        assert req["method"] == "POST" and j["q"] == "saludos en méxico" and j["gl"] == "mx" and j["hl"] == "es"
        assert hd["X-API-KEY"] == KEYS["SERPER_API_KEY"]
    elif provider == "tavily":
        assert req["method"] == "POST" and j["max_results"] == 2 and j["country"] == "mexico"
        assert hd["Authorization"] == f"Bearer {KEYS['TAVILY_API_KEY']}"
    else:
        assert p["query"] == "saludos en méxico" and p["country"] == "MX" and p["count"] == "2"
        assert hd["X-API-Key"] == KEYS["YDC_API_KEY"]


@pytest.mark.parametrize("provider,var", [("brave", "BRAVE_API_KEY"), ("serper", "SERPER_API_KEY"),
                                          ("tavily", "TAVILY_API_KEY"), ("you", "YDC_API_KEY")])
def test_missing_api_key_is_a_clear_error_naming_the_variable(monkeypatch, provider, var):
    monkeypatch.delenv(var, raising=False)
    with pytest.raises(ProviderError, match=var):
        make_provider(provider)


async def test_api_key_is_scrubbed_from_an_error_page_that_echoes_it(fake, keys):
    out = await _search(_cfg(fake, "brave"), "fault:echo401")
    assert out["status"] == "failed" and out["error"].startswith("brave: HTTP 401")
    assert KEYS["BRAVE_API_KEY"] not in json.dumps(out) and "***" in out["error"]
    assert out["attempts"] == 1  # a 401 is not retried


async def test_429_waits_for_retry_after_then_succeeds(fake):
    out = await _search(_cfg(fake, backoff_max_s=5), "fault:429:1")
    assert out["status"] == "ok" and out["retries"] == 1 and out["attempts"] == 2
    first, second = fake.requests
    assert second["t"] - first["t"] >= 0.95  # Retry-After: 1 honoured, not the 10 ms backoff


async def test_5xx_is_retried_and_recovers(fake):
    out = await _search(_cfg(fake, max_retries=3), "fault:500:2")
    assert out["status"] == "ok" and out["attempts"] == 3 and out["retries"] == 2


async def test_timeouts_exhaust_retries_and_record_the_reason(fake):
    out = await _search(_cfg(fake, max_retries=1, timeout_s=0.2), "fault:timeout")
    assert out["status"] == "failed" and "timeout after 0.2s" in out["error"]
    assert out["attempts"] == 2 and out["hits"] == []


@pytest.mark.parametrize("fault,reason", [("badjson", "invalid JSON"), ("truncated", "truncated response")])
async def test_broken_bodies_are_retried_then_recorded_as_failed(fake, fault, reason):
    out = await _search(_cfg(fake, max_retries=1), f"fault:{fault}")
    assert out["status"] == "failed" and out["error"].startswith(f"searxng: {reason}")
    assert out["attempts"] == 2 and len(fake.requests) == 2


async def test_wrong_json_shape_fails_without_retry(fake):
    out = await _search(_cfg(fake), "fault:shape")
    assert out["status"] == "failed" and "malformed response: missing results" in out["error"]
    assert out["attempts"] == 1


async def test_fallback_provider_answers_when_the_primary_fails(fake, keys):
    out = await _search(_cfg(fake, "searxng", fallback=["brave"], max_retries=0), "fault:500:1")
    assert out["status"] == "ok" and out["provider"] == "brave"
    assert [r["provider"] for r in fake.requests] == ["searxng", "brave"]


async def test_all_providers_failing_lists_every_reason(fake, keys):
    out = await _search(_cfg(fake, "searxng", fallback=["serper"], max_retries=0), "fault:500")
    assert out["status"] == "failed" and out["provider"] == "searxng"
    assert out["error"] == "searxng: HTTP 500; serper: HTTP 500"


async def test_in_flight_requests_per_searcher_are_bounded(fake):
    searcher = Searcher(_cfg(fake, max_in_flight=3, timeout_s=5), None)
    active = peak = 0
    original = searcher._attempt

    async def counting(*a):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            return await original(*a)
        finally:
            active -= 1

    searcher._attempt = counting
    rows = await asyncio.gather(*(searcher.search_row(_row(f"q{i}")) for i in range(12)))
    await searcher.close()
    assert all(r["status"] == "ok" for r in rows) and peak == 3


async def test_token_bucket_holds_the_rate_for_batched_grants():
    bucket = TokenBucket(rate=100)
    t0 = time.monotonic()
    for _ in range(40):
        await bucket.acquire()
    # The first slot at once (it may take the bucket's half-slot tolerance), then 39 at 100/s.
    assert time.monotonic() - t0 >= 0.385


def test_backoff_is_exponential_with_jitter_and_capped():
    cfg = SearchConfig(backoff_base_s=0.5, backoff_max_s=4.0)
    rng = random.Random(0)
    for retry, full in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)]:
        delays = [backoff_delay(retry, cfg, rng) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays) and len(set(delays)) > 1
    assert backoff_delay(0, cfg, rng, retry_after=3.0) == 3.0
    assert backoff_delay(0, cfg, rng, retry_after=120.0) == 4.0  # capped


def test_retry_after_parses_seconds_and_http_dates():
    assert parse_retry_after("7") == 7.0 and parse_retry_after(None) is None
    assert parse_retry_after("garbage") is None
    from email.utils import formatdate

    assert 8 <= parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10


def test_cache_key_normalizes_query_but_keeps_provider_and_locale_apart():
    k = cache_key("brave", "  Etiquette  in MEXICO ", "es-MX")
    assert k == cache_key("brave", "etiquette in mexico", "es-MX")
    assert k != cache_key("serper", "etiquette in mexico", "es-MX")
    assert k != cache_key("brave", "etiquette in mexico", "en-GB")


def test_search_config_rejects_unknown_providers_and_bad_rates():
    with pytest.raises(ConfigError, match=r"^search.provider: unknown provider 'bing'"):
        load_config(None, ["search.provider=bing"])
    with pytest.raises(ConfigError, match=r"^search.fallback\[0\]"):
        load_config(None, ["search.fallback=[google]"])
    with pytest.raises(ConfigError, match=r"^search.qps: must be > 0 or null"):
        load_config(None, ["search.qps=0"])
    assert load_config(None, ["search.qps=null"]).search.qps is None


# --------------------------------------------------------------------------------- BM25 ----


def test_shipped_corpus_covers_the_demo_cultures():
    rows = load_corpus()
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) >= {"id", "title", "url", "text", "culture", "lang"} and len(r["text"]) > 40
    for c in ("GB", "CN", "MX"):
        own = [r for r in rows if r["culture"] == c]
        assert 25 <= len(own) <= 40
        assert {r["topic"] for r in own} >= {"norms", "etiquette", "values", "offensive", "family",
                                              "religion", "trust", "everyday"}
    assert any(r["culture"] is None for r in rows)


def test_bm25_prefers_the_query_culture_and_returns_top_k():
    bm25 = BM25Provider()
    hits = bm25.search("tipping in restaurants", "MX", "es-MX", 2)
    assert len(hits) == 2 and hits[0]["title"] == "Tipping in Mexico"
    assert all(tuple(h) == HIT_FIELDS and h["provider"] == "bm25" for h in hits)
    assert all("United Kingdom" not in h["title"] for h in bm25.search("tipping", "MX", "es-MX", 5))
    gb = bm25.search("tipping in restaurants", "GB", "en-GB", 1)
    assert gb[0]["title"] == "Tipping in the United Kingdom"


def test_bm25_never_gives_a_culture_another_cultures_passages():
    bm25 = BM25Provider()
    hits = bm25.search("tipping in restaurants offensive jokes family", "PE", "es-PE", 10)
    assert hits and all(h["url"].startswith("corpus://cm_ray/general-") for h in hits)


def test_bm25_matches_chinese_queries_character_by_character():
    hits = BM25Provider().search("网络上的冒犯性言论", "CN", "zh-CN", 3)
    assert hits and hits[0]["title"] == "网络上的冒犯性言论"


def test_bm25_reads_a_user_corpus_as_jsonl_or_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "a", "title": "Sauna", "url": "https://x/a", "text": "Finns share the sauna with family.",
             "culture": "FI", "lang": "en"},
            {"id": "b", "title": "Coffee", "url": "https://x/b", "text": "Coffee breaks are daily.",
             "culture": None, "lang": "en"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.parquet"):
        hits = BM25Provider(str(tmp_path / name)).search("sauna family", "FI", "fi-FI", 5)
        assert [h["url"] for h in hits] == ["https://x/a"]
        # no passages for JP and none culture-free but "b": only "b" can match, and does not
        assert BM25Provider(str(tmp_path / name)).search("sauna family", "JP", "ja-JP", 5) == []
    only_fi = [r for r in rows if r["culture"]]
    (tmp_path / "fi.jsonl").write_text("\n".join(json.dumps(r) for r in only_fi))
    assert BM25Provider(str(tmp_path / "fi.jsonl")).search("sauna", "JP", "ja-JP", 5) == []
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="passage 0 .* has no 'text'"):
        load_corpus(str(tmp_path / "bad.jsonl"))


# ------------------------------------------------------------- documented parameter values ----

PAPER = ["US", "GB", "CN", "KR", "JP", "DE", "MX", "IN", "EG", "ES"]


def _documented_sets() -> dict[str, dict[str, set[str]]]:
    """{provider: {param: documented values}} straight from the data file."""
    from cm_ray.data.provider_values import provider_values

    out = {}
    for provider, spec in provider_values().items():
        for s in spec.values():
            if "pattern" in s:  # SearXNG: a language pattern, checked on its own
                continue
            vals = s["names"].values() if "names" in s else s["values"]
            assert all(isinstance(v, str) for v in vals), (provider, s["param"])  # no YAML yes/no booleans
            out.setdefault(provider, {})[s["param"]] = set(vals)
    return {"searxng": {}, **out}


def _sent(provider: str, culture: str, locale: str) -> dict:
    req = make_provider(provider, "http://127.0.0.1:1/x").request("q", culture, locale, 8)
    return req.get("params") or req.get("json")


@pytest.mark.parametrize("provider", ["brave", "serper", "tavily", "you", "searxng"])
def test_every_registry_culture_gets_only_documented_values(keys, provider):
    import re

    from cm_ray.cultures import registry
    from cm_ray.data.provider_values import provider_values

    documented = _documented_sets()[provider]
    pattern = provider_values()["searxng"]["language"]["pattern"]
    for key, culture in registry().items():
        sent = _sent(provider, key, culture.locale)
        for param, allowed in documented.items():
            if param in sent:
                assert sent[param] in allowed, (provider, key, param, sent[param])
        if provider == "searxng":
            assert re.fullmatch(pattern, sent["language"]), (key, sent)


@pytest.mark.parametrize("provider,expected", [
    ("brave", {"CN": ("CN", "zh-hans"), "JP": ("JP", "jp"), "EG": ("ALL", "ar"), "GB": ("GB", "en-gb"),
               "IN": ("IN", "hi"), "MX": ("MX", "es")}),
    ("serper", {"CN": ("cn", "zh-cn"), "GB": ("uk", "en"), "EG": ("eg", "ar"), "JP": ("jp", "ja")}),
    ("you", {"CN": ("CN", "ZH-HANS"), "JP": ("JP", "JA"), "EG": (None, "AR"), "KR": ("KR", "KO")}),
    ("tavily", {"US": ("united states", None), "KR": ("south korea", None), "GB": ("united kingdom", None),
                "EG": ("egypt", None), "CN": ("china", None)}),
])
def test_paper_cultures_get_the_providers_own_spelling(keys, provider, expected):
    from cm_ray.cultures import get_culture

    cparam, lparam = {"brave": ("country", "search_lang"), "serper": ("gl", "hl"),
                      "you": ("country", "language"), "tavily": ("country", None)}[provider]
    for culture, (country, language) in expected.items():
        sent = _sent(provider, culture, get_culture(culture).locale)
        assert sent.get(cparam) == country and (lparam is None or sent.get(lparam) == language), sent


def test_brave_sends_zh_and_pt_variants_by_country(keys):
    assert _sent("brave", "TW", "zh-TW")["search_lang"] == "zh-hant"
    assert _sent("brave", "BR", "pt-BR")["search_lang"] == "pt-br"
    assert _sent("brave", "PT", "pt-PT")["search_lang"] == "pt-pt"
    assert _sent("brave", "NO", "no-NO")["search_lang"] == "nb"


def test_approximate_and_unsupported_cultures_are_named_with_how():
    from cm_ray.data.providers import check_support, provider_support, unsupported

    brave = provider_support("brave", PAPER)
    assert set(brave) == {"EG"} and brave["EG"].startswith("approximate: ") and "country=ALL" in brave["EG"]
    you = provider_support("you", PAPER)
    assert set(you) == {"EG"} and "country left out" in you["EG"]
    assert provider_support("serper", PAPER) == provider_support("tavily", PAPER) == {}
    assert provider_support("searxng", PAPER) == provider_support("bm25", PAPER) == {}
    assert unsupported("brave", PAPER) == {}
    # Aruba: Tavily has no country for it and no language parameter at all.
    assert "AW" in unsupported("tavily", ["AW", "MX"]) and "MX" not in unsupported("tavily", ["AW", "MX"])
    # Albania: Brave has neither AL nor Albanian (sq).
    assert "search_lang" in unsupported("brave", ["AL"])["AL"]
    lines = []
    report = check_support(["brave", "you"], PAPER, log=lines.append)
    assert set(report) == {"brave", "you"} and len(lines) == 2 and all("EG" in line for line in lines)
    with pytest.raises(ProviderError, match=r"no provider of tavily can serve AW"):
        check_support(["tavily"], ["MX", "AW"])
    assert "AW" in check_support(["tavily", "bm25"], ["AW"])["tavily"]  # BM25 still serves it
