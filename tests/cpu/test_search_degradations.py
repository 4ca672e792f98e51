"""The search stage's degradations and cache keys on real Ray Data, against a SearXNG-speaking
aiohttp server on 127.0.0.1 whose hits point at its own pages (one of them behind a redirect):
a self-hosted provider without an endpoint on a cluster is a config error; a culture answered
mostly by the fallback fails the stage, with per-culture counts in the summary and the cultures
bm25 has no passages for named; a cached answer is searched again when ``search.top_k`` changes,
and gets its pages fetched (without a provider call) once ``search.fetch.enabled`` turns on;
fetched pages join their hits also when the page was redirected.

python -m pytest tests/cpu/test_search_degradations.py -v
"""

from __future__ import annotations

import pytest
from aiohttp import web

from cm_ray import checks
from cm_ray.config import ConfigError, load_config
from cm_ray.data import search
from cm_ray.data.search import run_search
from cm_ray.stages import run_stage
from cm_ray.storage import ArtifactStore
from tests.conftest import LoopbackServer

ARTICLE = ("<html><head><title>Manners</title></head><body><nav>Home | Login</nav><article>"
           "<h1>Table manners</h1>" + "".join(
               f"<p>Paragraph {i}: guests wait for the host to start eating, and refusing food "
               f"several times can seem impolite in many homes of {{where}}.</p>" for i in range(6))
           + "</article><footer>Copyright</footer></body></html>")


class Site(LoopbackServer):
    """``/search`` speaks SearXNG (503 for a query containing one of ``fail``); each answer has
    3 hits: ``/moved/0`` (a 302 to ``/page/0``), ``/page/1``, ``/page/2`` on this same server."""

    def __init__(self, fail: tuple[str, ...] = ()):
        self.fail, self.searches, self.pages = fail, [], []
        super().__init__()

    def routes(self):
        return [("GET", "/search", self._search), ("GET", "/page/{n}", self._page),
                ("GET", "/moved/{n}", self._moved)]

    async def _search(self, request):
        q = request.query["q"]
        self.searches.append(q)
        if any(f in q for f in self.fail):
            return web.Response(status=503, text="upstream engines unavailable")
        urls = [f"{self.base}/moved/0", f"{self.base}/page/1", f"{self.base}/page/2"]
        return web.json_response({"results": [{"title": f"{q} {i}", "url": u, "content": f"about {q}"}
                                              for i, u in enumerate(urls)]})

    async def _page(self, request):
        self.pages.append(request.path)
        return web.Response(text=ARTICLE.format(where=f"page {request.match_info['n']}"),
                            content_type="text/html")

    async def _moved(self, request):
        self.pages.append(request.path)
        raise web.HTTPFound(f"/page/{request.match_info['n']}")


@pytest.fixture
def site(request):
    server = Site(fail=getattr(request, "param", ()))
    yield server
    server.close()


def write_queries(store, culture: str, locale: str, queries: list[str]) -> None:
    rows = [{"query_id": f"{culture}-{i:03d}", "culture": culture, "task": "offensive", "kind": "specific",
             "query": q, "locale": locale} for i, q in enumerate(queries)]
    store.write_table(rows, "queries", f"culture={culture}", "part-0.parquet")


def _cfg(tmp_path, site, *extra):
    return load_config("configs/demo.yaml", [
        f"root={tmp_path / 'run'}", "search.provider=searxng", f"search.endpoint={site.base}/search",
        "search.qps=null", "search.max_retries=0", "search.concurrency=1", "search.batch_size=4",
        "search.fetch.allow_private_urls=true", *extra])


# -- 1. a self-hosted provider without an endpoint --------------------------------------------------
def test_paper_config_without_a_searxng_endpoint_is_a_config_error_naming_the_field(tmp_path):
    # ray.address: auto, provider searxng, fallback bm25: its endpoint left out
    cfg = load_config("configs/paper.yaml", [f"root={tmp_path / 'run'}", "search.endpoints={}"])
    with pytest.raises(ConfigError, match=r"^search\.endpoints\.searxng: required on a cluster"):
        run_search(cfg, ArtifactStore(cfg.root))
    search.check_endpoints(load_config("configs/paper.yaml"))  # as shipped: its SearXNG is named


@pytest.mark.parametrize("overrides,field", [
    ([], "search.endpoints.searxng"),
    (["search.provider=brave", "search.fallback=[searxng]", "search.endpoint=http://b/"],  # endpoint: primary's
     "search.endpoints.searxng"),
    (["search.endpoint=http://searx.internal/search"], None),
    (["search.endpoints={searxng: http://searx.internal/search}"], None),
])
def test_a_cluster_run_needs_an_endpoint_for_each_self_hosted_provider(overrides, field, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    base = ["search.provider=searxng", "search.fallback=[bm25]", *overrides]
    search.check_endpoints(load_config(None, base))  # a local run: the loopback default is fine
    cluster = load_config(None, [*base, "ray.address=auto"])
    if field is None:
        search.check_endpoints(cluster)
        return
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        search.check_endpoints(cluster)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # `ray job submit` sets it instead
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        search.check_endpoints(load_config(None, base))


# -- 1 + 4. fallbacks and failures per culture ------------------------------------------------------
@pytest.mark.parametrize("site", [("méxico", "perú")], indirect=True)
def test_a_culture_answered_mostly_by_the_fallback_fails_the_stage_with_per_culture_counts(
        ray_local, tmp_path, site, capsys):
    cfg = _cfg(tmp_path, site, "search.fallback=[bm25]", "cultures=[GB, MX, PE]")
    store = ArtifactStore(cfg.root)
    topics = ["table manners", "respect for elders", "gift giving", "tipping"]
    write_queries(store, "GB", "en-GB", [f"{t} britain" for t in topics])
    write_queries(store, "MX", "es-MX", [f"{t} méxico" for t in topics[:3]] + ["tipping mexico"])
    write_queries(store, "PE", "es-PE", [f"{t} perú" for t in topics])
    with pytest.raises(checks.DegradedError) as e:
        run_stage("search", cfg, store)
    assert "MX, PE" in str(e.value) and "GB" not in str(e.value)
    assert "the bm25 corpus has no passages of their own for PE: " in capsys.readouterr().err
    summary = store.read_manifest("search")
    per = summary["per_culture"]
    assert per["GB"] == {"searches": 4, "ok": 4, "failed": 0, "primary": 4, "fallback": 0,
                         "by_provider": {"searxng": 4}, "cached": 0, "failures": {},
                         "pages": {"fetched": 0, "failed": 0}, "culture_free": 0}
    assert per["MX"]["primary"] == 1 and per["MX"]["fallback"] == 3 and per["MX"]["by_provider"] == {
        "bm25": 3, "searxng": 1}
    assert per["MX"]["failures"] == {"searxng: HTTP 503": 3} and per["MX"]["culture_free"] == 0
    assert per["PE"]["fallback"] == 4 and per["PE"]["culture_free"] == 4
    assert summary["culture_free_cultures"] == ["PE"]
    degr = {(d["key"], d["kind"]): d for d in summary["degradations"]}
    assert set(degr) == {("MX", "search_fallback"), ("PE", "search_fallback")}  # nothing for GB
    assert (degr["MX", "search_fallback"]["bad"], degr["MX", "search_fallback"]["total"]) == (3, 4)
    assert "answered by the fallback bm25 (3), not searxng (searxng: HTTP 503 x3)" in degr["MX", "search_fallback"]["detail"]
    assert "culture-free passages only" in degr["PE", "search_fallback"]["detail"]
    # A row a fallback answered says why the primary failed.
    mx = store.read_rows("search", "results", "culture=MX")
    assert {r["error"] for r in mx if r["provider"] == "bm25"} == {"searxng: HTTP 503"}


def test_failed_searches_are_a_search_failed_degradation_with_their_reasons(tmp_path):
    import pyarrow as pa

    from cm_ray import artifacts
    from cm_ray.data.search import _summary
    from cm_ray.data.searcher import result_schema

    store = ArtifactStore(str(tmp_path))
    errors = [None, "searxng: timeout after 15s; brave: HTTP 429", "searxng: timeout after 15s; brave: HTTP 503",
              "searxng: connection error: ClientConnectorError; brave: malformed response: missing web"]
    rows = [{"query_id": f"q{i}", "culture": "MX", "task": "t", "kind": "specific", "query": "x",
             "locale": "es-MX", "status": "ok" if err is None else "failed", "error": err, "provider": "searxng",
             "cached": False, "hits": [], "attempts": 1, "retries": 0, "latency_ms": 1.0, "pages": []}
            for i, err in enumerate(errors)]
    store.write_table(pa.Table.from_pylist(rows, schema=result_schema()), *artifacts.search_results_file("MX"))
    summary = _summary(store, ["MX"], "searxng", 0, [])
    assert summary["per_culture"]["MX"]["failures"] == {
        "searxng: timeout": 2, "brave: HTTP 429": 1, "brave: HTTP 503": 1, "searxng: connection error": 1,
        "brave: malformed response": 1}
    (d,) = summary["degradations"]
    assert (d["kind"], d["key"], d["bad"], d["total"]) == ("search_failed", "MX", 3, 4)
    assert checks.over_threshold(load_config(None).checks, [d])  # 0.75 > checks.search_failed 0.5


# -- 2 + 3. fetched pages: redirects, and cached answers ----------------------------------------------
def test_a_stale_partition_is_not_answered_from_a_cache_made_with_another_top_k(ray_local, tmp_path, site):
    narrow = _cfg(tmp_path, site, "cultures=[GB]", "search.top_k=2")
    store = ArtifactStore(narrow.root)
    write_queries(store, "GB", "en-GB", ["table manners", "gift giving"])
    assert run_stage("search", narrow, store)["provider_calls"] == 2
    assert {len(r["hits"]) for r in store.read_rows("search", "results", "culture=GB")} == {2}
    # top_k changes the answer: the stale partition is searched again, not answered from the cache.
    wider = run_stage("search", _cfg(tmp_path, site, "cultures=[GB]", "search.top_k=3"), store)
    assert wider["recomputed"] == ["GB"] and wider["provider_calls"] == 2 and len(site.searches) == 4
    assert {len(r["hits"]) for r in store.read_rows("search", "results", "culture=GB")} == {3}
    # and the same top_k again is answered from the cache
    again = run_stage("search", _cfg(tmp_path, site, "cultures=[GB]", "search.top_k=2"), store)
    assert again["provider_calls"] == 0 and again["per_culture"]["GB"]["cached"] == 2


def test_cached_answers_get_their_pages_fetched_once_fetch_turns_on_and_joined_past_redirects(
        ray_local, tmp_path, site):
    from cm_ray.data.synth_prompts import pool_snippets

    plain = _cfg(tmp_path, site, "cultures=[GB]", "search.top_k=3")
    store = ArtifactStore(plain.root)
    write_queries(store, "GB", "en-GB", ["table manners", "gift giving"])
    first = run_stage("search", plain, store)
    assert first["provider_calls"] == 2 and first["pages"] == {"fetched": 0, "failed": 0} and not site.pages

    # fetch turned on: the cached answers are not searched again, but their pages are fetched.
    fetching = _cfg(tmp_path, site, "cultures=[GB]", "search.top_k=3", "search.fetch.enabled=true")
    second = run_stage("search", fetching, store)
    assert second["recomputed"] == ["GB"] and second["provider_calls"] == 0 and len(site.searches) == 2
    assert second["pages"] == {"fetched": 4, "failed": 0} and second["per_culture"]["GB"]["cached"] == 2
    rows = store.read_rows("search", "results", "culture=GB")
    for r in rows:
        assert r["cached"] and [p["url"] for p in r["pages"]] == [h["url"] for h in r["hits"][:2]]
        moved = r["pages"][0]
        # the redirected page is kept under its hit's URL, with the URL its text came from
        assert moved["url"].endswith("/moved/0") and moved["final_url"].endswith("/page/0")
        assert "page 0" in moved["text"]
    pool = pool_snippets(rows)  # what synthesis grounds its prompts in
    assert [bool(p["page"]) for p in pool if p["url"].endswith("/moved/0")] == [True, True]
    assert all(bool(p["page"]) == (not p["url"].endswith("/page/2")) for p in pool)  # fetch.top_k = 2

    # and the pages are cached with their answer: a forced rerun fetches nothing.
    fetched = len(site.pages)
    again = run_search(fetching, store, force=True)
    assert again["provider_calls"] == 0 and len(site.pages) == fetched
    assert again["pages"] == {"fetched": 4, "failed": 0}
