"""Page fetch + main-text extraction of search hits against a real aiohttp server on 127.0.0.1:
SSRF refusals (loopback, private, link-local, redirects into them, non-http schemes), size and time
limits, and extraction with trafilatura.

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

    app = web.Application()
    for path, h in [("/article", article), ("/big", big), ("/slow", slow), ("/redirect", redirect)]:
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


async def test_names_resolving_to_loopback_are_refused_at_connect_time(site):
    base, hits = site
    port = base.rsplit(":", 1)[1]
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


async def test_searcher_attaches_fetched_pages_to_hits(site):
    base, _ = site

    async def serve_search(request):
        return web.json_response({"results": [{"title": "t", "url": f"{base}/article", "content": "c"}]})

    app = web.Application()
    app.router.add_get("/search", serve_search)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        cfg = SearchConfig(provider="searxng", endpoint=f"http://127.0.0.1:{server.port}/search",
                           qps=None, fetch={"enabled": True, "top_k": 1, "allow_private_urls": True})
        searcher = Searcher(cfg)
        row = await searcher.search_row({"query_id": "1", "culture": "MX", "task": "survey",
                                         "kind": "agnostic", "query": "modales", "locale": "es-MX"})
        await searcher.close()
    finally:
        await server.close()
    assert row["status"] == "ok" and row["pages"][0]["url"] == f"{base}/article"
    assert "provecho" in row["pages"][0]["text"]
