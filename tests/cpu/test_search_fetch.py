"""Page fetch + main-text extraction of search hits against a real aiohttp server on 127.0.0.1:
SSRF refusals (loopback, private, link-local, redirects into them, non-http schemes), size and time
limits, extraction with trafilatura, and hostile pages and provider answers (bogus charsets,
malformed JSON shapes) that must each stay one row's problem. Every spelling of a private
address: tests/cpu/test_fetch_ssrf.py.

python -m pytest tests/cpu/test_search_fetch.py -v
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cm_ray.config import SearchConfig
from cm_ray.data.fetch import BlockedURL, check_url, fetch_pages, is_public
from cm_ray.data.searcher import Searcher

ARTICLE = ("<html><head><title>Etiquette</title></head><body><nav>Home | About | Login</nav>"
           "<article><h1>Table manners in Mexico</h1>" + "".join(
               f"<p>Paragraph {i}: guests wait for the host to say provecho before eating, and "
               f"refusing food several times can seem impolite in many Mexican homes.</p>"
               for i in range(6)) + "</article><footer>Copyright notice</footer></body></html>")


@pytest.fixture
async def site():
    hits = []

    async def article(request):
        hits.append(request.path)
        return web.Response(text=ARTICLE, content_type="text/html")

    async def big(request):
        hits.append(request.path)
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        await resp.prepare(request)
        await resp.write(b"<html><body><article>")
        for _ in range(200):  # 200 x 10 KB: far beyond the limit
            await resp.write(b"<p>" + b"word " * 2000 + b"</p>")
        return resp

    async def slow(request):
        hits.append(request.path)
        await asyncio.sleep(3)
        return web.Response(text=ARTICLE, content_type="text/html")

    async def redirect(request):
        hits.append(request.path)
        raise web.HTTPFound("file:///etc/passwd")

    async def moved(request):
        hits.append(request.path)
        raise web.HTTPFound("/article")

    async def charset(request):
        hits.append(request.path)
        text = ARTICLE.replace("provecho", "provecho, ¡qué rico!")
        body = text.encode(request.query.get("enc", "utf-8"))
        if "extra" in request.query:  # raw bytes spliced into the first paragraph
            body = body.replace(b"Paragraph 0:", b"Paragraph 0: " + request.query["extra"].encode())
        declared = request.match_info["cs"]
        ctype = "text/html" if declared == "none" else f"text/html; charset={declared}"
        return web.Response(body=body, headers={"Content-Type": ctype})

    app = web.Application()
    for path, h in [("/article", article), ("/big", big), ("/slow", slow), ("/redirect", redirect),
                    ("/moved", moved), ("/charset/{cs}", charset)]:
        app.router.add_get(path, h)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}", hits
    await server.close()


def _cfg(**kw) -> SearchConfig:
    return SearchConfig(fetch={"allow_private_urls": False, "timeout_s": 1.0, "max_bytes": 50_000, **kw})


@pytest.mark.parametrize("address,public", [("8.8.8.8", True), ("127.0.0.1", False), ("10.1.2.3", False),
                                            ("192.168.0.1", False), ("169.254.169.254", False),
                                            ("::1", False), ("fe80::1", False), ("::ffff:127.0.0.1", False),
                                            ("2606:4700::1111", True), ("0.0.0.0", False)])
def test_only_global_addresses_count_as_public(address, public):
    assert is_public(address) is public


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/x", "http://127.0.0.1:80/",
                                 "http://[::1]/", "http://10.0.0.5/admin", "gopher://x"])
def test_check_url_refuses_other_schemes_and_private_literals(url):
    with pytest.raises(BlockedURL):
        check_url(url)


async def test_loopback_fetch_is_refused_and_nothing_is_sent(site):
    base, hits = site
    (page,) = await fetch_pages([f"{base}/article"], _cfg())
    assert page["text"] is None and "refused" in page["error"] and hits == []


async def test_names_resolving_to_loopback_are_refused_at_connect_time(site, monkeypatch):
    from cm_ray.data import fetch

    base, hits = site
    port = base.rsplit(":", 1)[1]
    # check_url refuses "localhost" by name; past it, the connector's resolver refuses it too.
    monkeypatch.setattr(fetch, "check_url", lambda url, allow_private=False: None)
    (page,) = await fetch_pages([f"http://localhost:{port}/article"], _cfg())
    assert page["text"] is None and "refused localhost" in page["error"] and hits == []


async def test_allowed_fetch_extracts_main_text_without_boilerplate(site):
    base, _ = site
    (page,) = await fetch_pages([f"{base}/article"], _cfg(allow_private_urls=True))
    assert page["error"] is None and "provecho" in page["text"]
    assert "Login" not in page["text"] and "Copyright" not in page["text"]


async def test_every_redirect_hop_is_checked_again(site):
    base, hits = site
    # Loopback is allowed so the first hop reaches the test server; its redirect (to a non-http
    # scheme) must be checked on its own and refused.
    (page,) = await fetch_pages([f"{base}/redirect"], _cfg(allow_private_urls=True))
    assert hits == ["/redirect"] and page["text"] is None
    assert page["error"].startswith("refused 'file:///etc/passwd'")


async def test_size_and_time_limits_hold(site):
    base, _ = site
    t0 = asyncio.get_running_loop().time()
    big, slow = await fetch_pages([f"{base}/big", f"{base}/slow"], _cfg(allow_private_urls=True))
    assert asyncio.get_running_loop().time() - t0 < 2.5
    assert big["error"] is None and len(big["text"]) <= 50_000
    assert slow["text"] is None and "Timeout" in slow["error"]


async def _search_row(app, *, provider: str, path: str, **search):
    """One query through a real ``Searcher`` against ``app`` served on 127.0.0.1."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        searcher = Searcher(SearchConfig(provider=provider, qps=None,
                                         endpoint=f"http://127.0.0.1:{server.port}{path}", **search))
        row = await searcher.search_row({"query_id": "1", "culture": "MX", "task": "survey",
                                         "kind": "agnostic", "query": "modales", "locale": "es-MX"})
        await searcher.close()
    finally:
        await server.close()
    return row


async def test_searcher_attaches_fetched_pages_to_hits(site):
    base, _ = site

    async def serve_search(request):
        return web.json_response({"results": [{"title": "t", "url": f"{base}/article", "content": "c"}]})

    app = web.Application()
    app.router.add_get("/search", serve_search)
    row = await _search_row(app, provider="searxng", path="/search",
                            fetch={"enabled": True, "top_k": 1, "allow_private_urls": True})
    assert row["status"] == "ok" and row["pages"][0]["url"] == f"{base}/article"
    assert "provecho" in row["pages"][0]["text"]


async def test_a_redirected_page_joins_its_hit_and_records_where_its_text_came_from(site):
    from cm_ray.data.synth_prompts import pool_snippets

    base, hits = site

    async def serve_search(request):
        return web.json_response({"results": [{"title": "t", "url": f"{base}/moved", "content": "c"}]})

    app = web.Application()
    app.router.add_get("/search", serve_search)
    row = await _search_row(app, provider="searxng", path="/search",
                            fetch={"enabled": True, "top_k": 1, "allow_private_urls": True})
    (page,) = row["pages"]
    assert hits == ["/moved", "/article"] and "provecho" in page["text"]
    assert page["url"] == f"{base}/moved" and page["final_url"] == f"{base}/article"
    (snippet,) = pool_snippets([row])  # the join synthesis makes: hit URL -> page text
    assert snippet["url"] == f"{base}/moved" and "provecho" in snippet["page"]


@pytest.mark.parametrize("declared,enc", [("bogus-xyz", "utf-8"), ("base64", "utf-8"), ("zlib", "cp1252"),
                                          ("none", "cp1252"), ("iso-8859-1", "iso-8859-1"),
                                          ("utf-8", "cp1252")])
async def test_a_bogus_or_missing_charset_falls_back_instead_of_raising(site, declared, enc):
    base, _ = site
    (page,) = await fetch_pages([f"{base}/charset/{declared}?enc={enc}"], _cfg(allow_private_urls=True))
    assert page["error"] is None and "provecho" in page["text"], page
    if declared in ("none", "zlib", "iso-8859-1"):  # detected or declared right: the accents survive
        assert "¡qué rico!" in page["text"]


async def test_a_utf7_page_with_lone_surrogates_stays_storable(site):
    import pyarrow as pa

    base, _ = site
    # "+2AA-" is a lone surrogate in UTF-7: legal to decode, impossible to write to Parquet.
    (page,) = await fetch_pages([f"{base}/charset/utf-7?enc=utf-7&extra=%2B2AA-"],
                                _cfg(allow_private_urls=True))
    assert page["error"] is None and "provecho" in page["text"] and "?" in page["text"]
    pa.array([page["text"]])  # storable (before, the surrogate cut the extracted text short)


async def test_an_extractor_failure_is_that_page_s_error(site, monkeypatch):
    from cm_ray.data import fetch

    def broken(html, url=None):
        raise ValueError("lxml choked")

    base, _ = site
    monkeypatch.setattr(fetch, "extract_text", broken)
    bad, refused = await fetch_pages([f"{base}/article", "file:///etc/passwd"], _cfg(allow_private_urls=True))
    assert bad["text"] is None and bad["error"] == "extraction failed: ValueError: lxml choked"
    assert refused["error"].startswith("refused")


DEEP = b'{"results": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HOSTILE_ANSWERS = {  # provider, answer body, expected status, expected error prefix
    "deep": ("searxng", DEEP, "failed", "searxng: malformed response: JSON nested too deeply"),
    "not-a-list": ("searxng", b'{"results": "nope"}', "failed", "searxng: malformed response"),
    "surrogate": ("searxng", b'{"results": [{"title": "\\ud800 x", "url": "https://e.org/", "content": 5}]}',
                  "ok", None),
    "word-rank": ("serper", b'{"organic": [{"title": "t", "link": "https://e.org/", "position": "first"}]}',
                  "ok", None),
    "inf-rank": ("serper", b'{"organic": [{"title": "t", "link": "https://e.org/", "position": 1e400}]}',
                 "ok", None),
    "huge-rank": ("serper", b'{"organic": [{"title": "t", "link": "https://e.org/", "position": 1e30}]}',
                  "ok", None),
    "int-snippets": ("you", b'{"results": {"web": [{"title": "t", "url": "https://e.org/", "snippets": 5,'
                            b' "description": "d"}]}}', "ok", None),
    "not-json": ("searxng", b"\xff\xfe<html>proxy error", "failed", "searxng: invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ANSWERS))
async def test_a_hostile_provider_answer_is_one_row_s_result_never_an_exception(case, monkeypatch):
    import pyarrow as pa

    from cm_ray.data.searcher import result_schema

    provider, body, status, error = HOSTILE_ANSWERS[case]
    monkeypatch.setenv("SERPER_API_KEY", "k")
    monkeypatch.setenv("YDC_API_KEY", "k")

    async def answer(request):
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    row = await _search_row(app, provider=provider, path="/s", max_retries=1, backoff_base_s=0.01)
    assert row["status"] == status, row
    if error:
        assert row["error"].startswith(error) and row["hits"] == []
    else:
        assert row["error"] is None and len(row["hits"]) == 1 and row["hits"][0]["rank"] == 1
    pa.Table.from_pylist([row], schema=result_schema())  # the row is storable as it is
