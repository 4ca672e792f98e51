"""The loopback web of the rehearsal (cm_ray.rehearsal.web): each provider's real request against
its stand-in returns hits for every paper culture it serves; a value the provider does not
document gets that provider's documented 4xx body and is counted; redirect chains, a consent wall
and long CJK pages are served, and the real page fetcher reads them.

python -m pytest tests/cpu/test_rehearsal_web.py -v
"""

from __future__ import annotations

import re

import aiohttp
import pytest

from cm_ray.config import SearchConfig
from cm_ray.cultures import get_culture
from cm_ray.data.providers import unsupported
from cm_ray.data.searcher import Searcher
from cm_ray.rehearsal.web import KEYS, PATHS, WebStandIn, provider_urls

PAPER = ["US", "GB", "CN", "KR", "JP", "DE", "MX", "IN", "EG", "ES"]
PROVIDERS = list(PATHS)


@pytest.fixture(scope="module")
def web():
    with WebStandIn() as stand_in:
        yield stand_in


@pytest.fixture
def keys(monkeypatch):
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)


def _cfg(web, provider, **kw) -> SearchConfig:
    return SearchConfig(**{"provider": provider, "endpoints": provider_urls(web.base), "top_k": 3,
                           "qps": None, "max_retries": 0, "timeout_s": 10, **kw})


def _row(culture: str) -> dict:
    c = get_culture(culture)
    return {"query_id": f"q-{culture}", "culture": culture, "task": "offensive", "kind": "specific",
            "query": f"greetings and politeness in {c.name}", "locale": c.locale}


def test_provider_urls_are_the_documented_paths(web):
    urls = provider_urls("http://127.0.0.1:9/")
    assert urls["brave"] == "http://127.0.0.1:9/brave/res/v1/web/search"
    assert urls["searxng"].endswith("/searxng/search") and urls["you"].endswith("/you/v1/search")
    assert set(urls) == {"searxng", "brave", "serper", "tavily", "you"}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_each_provider_answers_every_paper_culture_it_serves(web, keys, provider):
    served = [c for c in PAPER if c not in unsupported(provider, PAPER)]
    assert served == PAPER  # every paper culture is served (EG only approximately by Brave and You.com)
    before = web.stats()["providers"][provider]
    searcher = Searcher(_cfg(web, provider))
    try:
        for culture in served:
            out = await searcher.search_row(_row(culture))
            assert out["status"] == "ok" and out["provider"] == provider, (culture, out["error"])
            assert len(out["hits"]) == 3 and all(h["url"].startswith(web.base) for h in out["hits"])
            # the snippet names the culture, in its own language (e.g. 日本, 대한민국, مصر)
            assert all(f"({culture})" in h["snippet"] and f"/{culture}/" in h["url"] for h in out["hits"])
    finally:
        await searcher.close()
    after = web.stats()["providers"][provider]
    assert after["ok"] - before["ok"] == len(served) == after["requests"] - before["requests"]
    assert after["rejected"] == before["rejected"]


async def _send(method: str, url: str, **kw) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.request(method, url, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


BRAVE_AUTH = {"X-Subscription-Token": KEYS["BRAVE_API_KEY"]}


@pytest.mark.parametrize("provider,request_kw,status,reason,shape", [
    # what the old requests sent: Brave search_lang=zh and country=EG, Tavily a pycountry name,
    # Serper hl=zh, You.com language=ZH
    ("brave", {"params": {"q": "x", "search_lang": "zh", "country": "CN"}, "headers": BRAVE_AUTH},
     422, "bad search_lang", lambda b: b["type"] == "ErrorResponse" and b["error"]["code"] == "VALIDATION"
     and b["error"]["meta"]["errors"][0]["loc"] == ["query", "search_lang"]),
    ("brave", {"params": {"q": "x", "country": "EG"}, "headers": BRAVE_AUTH}, 422, "bad country",
     lambda b: b["error"]["meta"]["errors"][0]["input"] == "EG"),
    ("brave", {"params": {"q": "x"}, "headers": {"X-Subscription-Token": "wrong"}}, 401, "auth",
     lambda b: b["error"]["code"] == "SUBSCRIPTION_TOKEN_INVALID"),
    ("tavily", {"json": {"query": "x", "country": "korea, republic of"},
                "headers": {"Authorization": f"Bearer {KEYS['TAVILY_API_KEY']}"}}, 400, "bad country",
     lambda b: "country" in b["detail"]["error"]),
    ("tavily", {"json": {"query": "x"}, "headers": {"Authorization": KEYS["TAVILY_API_KEY"]}}, 401, "auth",
     lambda b: "API key" in b["detail"]["error"]),
    ("serper", {"json": {"q": "x", "gl": "cn", "hl": "zh"}, "headers": {"X-API-KEY": KEYS["SERPER_API_KEY"]}},
     400, "bad hl", lambda b: b["statusCode"] == 400 and "hl" in b["message"]),
    ("serper", {"json": {"q": "x"}}, 403, "auth", lambda b: b["statusCode"] == 403),
    ("you", {"params": {"query": "x", "language": "ZH"}, "headers": {"X-API-Key": KEYS["YDC_API_KEY"]}},
     422, "bad language", lambda b: b["detail"][0]["loc"] == ["query", "language"]),
    ("you", {"params": {"query": "x", "count": "500"}, "headers": {"X-API-Key": KEYS["YDC_API_KEY"]}},
     422, "bad count", lambda b: b["detail"][0]["loc"] == ["query", "count"]),
    ("searxng", {"params": {"q": "x", "format": "json", "language": "español"}}, 400, "bad language",
     lambda b: "language" in b["error"]),
    ("searxng", {"params": {"q": "x"}}, 400, "bad format", lambda b: "format" in b["error"]),
])
async def test_an_undocumented_value_gets_the_documented_4xx_and_is_counted(
        web, provider, request_kw, status, reason, shape):
    before = web.stats()["providers"][provider]
    method = "POST" if provider in ("serper", "tavily") else "GET"
    got, body = await _send(method, provider_urls(web.base)[provider], **request_kw)
    assert got == status and shape(body), body
    after = web.stats()["providers"][provider]
    assert after["rejected"].get(reason, 0) == before["rejected"].get(reason, 0) + 1
    assert after["ok"] == before["ok"] and after["requests"] == before["requests"] + 1


async def test_redirect_chains_consent_walls_and_long_cjk_pages_are_served(web):
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{web.base}/moved/KR/2", allow_redirects=False) as r1:
            assert r1.status == 301 and r1.headers["Location"] == "/moved2/KR/2"
        async with s.get(f"{web.base}/moved2/KR/2", allow_redirects=False) as r2:
            assert r2.status == 302 and r2.headers["Location"] == "/pages/KR/2"
        async with s.get(f"{web.base}/walled/DE/3", allow_redirects=False) as r3:
            assert r3.status == 302 and r3.headers["Location"].startswith("/consent?continue=")
        async with s.get(f"{web.base}/walled/DE/3") as r4:
            wall = await r4.text()
            assert "cookie-wall" in wall and "Accept all" in wall and "/pages/DE/3" in wall
        for culture, script in [("CN", r"[\u4e00-\u9fff]"), ("JP", r"[\u3040-\u30ff]"), ("KR", r"[\uac00-\ud7af]")]:
            async with s.get(f"{web.base}/pages/{culture}/1") as r:
                text = await r.text()
                cjk = re.findall(r"[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]", text)
                assert r.status == 200 and len(cjk) > 3000 and len(re.findall(script, text)) > 500, culture
        async with s.get(f"{web.base}/pages/MX/1") as r:
            assert "México" in await r.text()  # a normal page in the culture's language
    pages = web.stats()["pages"]
    assert pages["redirects"] >= 4 and pages["consent"] >= 1 and pages["cjk"] >= 3


async def test_the_page_fetcher_reads_the_stand_in_pages(web, keys):
    cfg = _cfg(web, "brave", fetch={"enabled": True, "top_k": 3, "allow_private_urls": True})
    before = web.stats()["pages"]
    searcher = Searcher(cfg)
    try:
        out = await searcher.search_row(_row("JP"))
    finally:
        await searcher.close()
    assert out["status"] == "ok" and len(out["pages"]) == 3
    page, moved, walled = out["pages"]
    assert page["error"] is None and len(page["text"]) > 3000 and "日本" in page["text"]
    assert moved["error"] is None and "日本" in moved["text"]  # after 301 -> 302
    assert walled["text"] is None or "日本" not in walled["text"]  # the consent wall, not the article
    after = web.stats()["pages"]
    assert after["redirects"] - before["redirects"] == 3 and after["consent"] - before["consent"] == 1
