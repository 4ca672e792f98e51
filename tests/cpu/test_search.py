"""The search stage end to end on real Ray Data: offline BM25 on the shipped corpus, and a
loopback SearXNG server (real aiohttp on 127.0.0.1) with the cache on a real S3 server (moto):
one row per query, failures recorded, a rerun makes 0 provider calls, an interrupted run resumes,
and the rate limit holds across actors.

python -m pytest tests/cpu/test_search.py -v
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from cm_ray.config import load_config
from cm_ray.data.search import run_search
from cm_ray.data.searcher import result_schema
from cm_ray.storage import ArtifactStore
from tests.conftest import LoopbackServer

TOPICS = ["table manners", "offensive slang online", "respect for elders", "religious holidays",
          "trust in neighbours", "gift giving", "tipping", "family obligations"]


def write_queries(store: ArtifactStore, culture: str, locale: str, queries: list[str]) -> list[dict]:
    """Rows exactly as the queries stage writes them."""
    rows = [{"query_id": f"{culture}-{i:03d}", "culture": culture, "task": "offensive" if i % 2 else "survey",
             "kind": "specific" if i % 3 else "agnostic", "query": q, "locale": locale}
            for i, q in enumerate(queries)]
    store.write_table(rows, "queries", f"culture={culture}", "part-0.parquet")
    return rows


class SearxServer(LoopbackServer):
    """A SearXNG-speaking aiohttp server in a background thread (``/search``; Brave's route too);
    counts calls; optional latency."""

    URL_SUFFIX = "/search"

    def __init__(self, latency_s: float = 0.0):
        self.calls: list[tuple[float, str]] = []
        self.latency_s = latency_s
        super().__init__()

    def routes(self):
        return [("GET", "/search", self._handle), ("GET", "/res/v1/web/search", self._brave)]

    async def _brave(self, request):
        q = request.query["q"]
        self.calls.append((time.monotonic(), q))
        if request.headers.get("X-Subscription-Token") != "key-from-env":
            return web.Response(status=401, text="bad key")
        return web.json_response({"web": {"results": [
            {"title": q, "url": "https://example.org/b", "description": f"brave {request.query['country']}"}]}})

    async def _handle(self, request):
        q = request.query["q"]
        self.calls.append((time.monotonic(), q))
        await asyncio.sleep(self.latency_s)
        if q.startswith("fault:badjson"):
            return web.Response(text="<html>gateway error</html>", content_type="application/json")
        return web.json_response({"query": q, "results": [
            {"title": f"{q} {i}", "url": f"https://example.org/{i}", "content": f"about {q} ({request.query['language']})"}
            for i in range(3)]})


@pytest.fixture
def searx():
    server = SearxServer()
    yield server
    server.close()


def test_bm25_stage_writes_one_row_per_query_for_every_culture(ray_local, tmp_path):
    cfg = load_config("configs/demo.yaml", [f"root={tmp_path / 'run'}"])
    store = ArtifactStore(cfg.root)
    sent = {c: write_queries(store, c, loc, [f"{t} in {name}" for t in TOPICS])
            for c, loc, name in [("GB", "en-GB", "Britain"), ("CN", "zh-CN", "China"), ("MX", "es-MX", "Mexico")]}
    summary = run_search(cfg, store)
    assert summary["queries"] == 24 and summary["ok"] == 24 and summary["failed"] == 0
    assert summary["per_provider"] == {"bm25": {"ok": 24, "failed": 0, "retried": 0, "cached": 0}}
    for c, rows in sent.items():
        table = store.read_table("search", "results", f"culture={c}")
        assert table.schema.equals(result_schema())
        got = table.to_pylist()
        assert [r["query_id"] for r in got] == [r["query_id"] for r in rows]  # the queries' order
        assert all(r["culture"] == c and r["status"] == "ok" and not r["cached"] for r in got)
        assert sum(len(r["hits"]) for r in got) >= 20
        for r in got:
            assert all(h["locale"] == r["locale"] and h["provider"] == "bm25" for h in r["hits"])
            assert [h["rank"] for h in r["hits"]] == list(range(1, len(r["hits"]) + 1))
        # the culture's own passages come first (ids are prefixed with the culture)
        firsts = [r["hits"][0]["url"] for r in got if r["hits"]]
        assert sum(u.startswith(f"corpus://cm_ray/{c.lower()}-") for u in firsts) >= len(firsts) - 2


def test_stage_without_queries_says_which_stage_to_run(tmp_path):
    cfg = load_config("configs/demo.yaml", [f"root={tmp_path / 'run'}"])
    with pytest.raises(RuntimeError, match="no queries for GB, CN, MX .* run the queries stage first"):
        run_search(cfg, ArtifactStore(cfg.root))


def test_missing_api_key_fails_at_stage_start(tmp_path, monkeypatch):
    from cm_ray.data.providers import ProviderError

    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    cfg = load_config("configs/demo.yaml", [f"root={tmp_path / 'run'}", "search.provider=serper"])
    with pytest.raises(ProviderError, match="SERPER_API_KEY"):
        run_search(cfg, ArtifactStore(cfg.root))


@pytest.mark.slow
def test_s3_cache_makes_reruns_free_and_interrupted_runs_resume(ray_local, s3_root, searx):
    overrides = [f"root={s3_root}", "search.provider=searxng", f"search.endpoint={searx.url}",
                 "search.qps=null", "search.max_retries=1", "search.backoff_base_s=0.01",
                 "search.concurrency=2", "search.batch_size=4", "cultures=[GB, MX]"]
    cfg = load_config("configs/demo.yaml", overrides)
    store = ArtifactStore(cfg.root)
    write_queries(store, "GB", "en-GB", [f"{t} uk" for t in TOPICS] + ["fault:badjson uk"])
    mx_all = [f"{t} méxico" for t in TOPICS]
    write_queries(store, "MX", "es-MX", mx_all[:4])  # "interrupted": only half of MX searched

    first = run_search(cfg, store)
    assert first["ok"] == 12 and first["failed"] == 1 and first["queries"] == 13
    # the malformed answer is a recorded failure with its reason, never a dropped row
    (bad,) = [r for r in store.read_rows("search", "results", "culture=GB") if r["status"] == "failed"]
    assert bad["query"] == "fault:badjson uk" and bad["error"].startswith("searxng: invalid JSON")
    assert bad["attempts"] == 2 and bad["hits"] == []
    assert first["provider_calls"] == len(searx.calls) == 12 + 2
    assert store.files("search", "cache", suffix=".parquet")  # cache persisted on S3
    mx_rows = store.read_rows("search", "results", "culture=MX")
    assert {r["hits"][0]["snippet"].split("(")[-1] for r in mx_rows} == {"es-MX)"}  # locale sent

    # Resume: MX's partition is lost mid-run with all its queries now present; GB is done.
    write_queries(store, "MX", "es-MX", mx_all)
    store.delete("search", "results", "culture=MX")
    before = len(searx.calls)
    resumed = run_search(cfg, store)
    assert len(searx.calls) - before == 4  # only the 4 MX queries never searched
    assert resumed["skipped_cultures"] == ["GB"] and resumed["queries"] == 17
    assert resumed["per_provider"]["searxng"]["cached"] == 4

    # Forced rerun of the whole job: everything that succeeded comes from the cache.
    before = len(searx.calls)
    again = run_search(cfg, store, force=True)
    assert len(searx.calls) - before == 2 == again["provider_calls"]  # only the failed query retried
    assert again["per_provider"]["searxng"]["cached"] == 16 and again["failed"] == 1


@pytest.mark.slow
def test_rate_limit_holds_across_all_actors(ray_local, tmp_path):
    server = SearxServer(latency_s=0.02)
    try:
        cfg = load_config("configs/demo.yaml", [
            f"root={tmp_path / 'run'}", "search.provider=searxng", f"search.endpoint={server.url}",
            "search.qps=20", "search.concurrency=2", "search.batch_size=4", "search.max_in_flight=8",
            "cultures=[GB]", "search.cache=false"])
        store = ArtifactStore(cfg.root)
        write_queries(store, "GB", "en-GB", [f"query {i}" for i in range(60)])
        summary = run_search(cfg, store)
        assert summary["ok"] == 60
        times = sorted(t for t, _ in server.calls)
        # 2 actors x 8 slots could send 800/s at 20 ms latency; the shared bucket allows 20/s
        # (+ a 1-token burst). Any 1 s window holds at most ~21 requests.
        worst = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
        assert worst <= 22, worst
        assert times[-1] - times[0] >= (60 - 2) / 20 * 0.95
    finally:
        server.close()


def test_api_key_reaches_the_actors_from_the_driver_environment(ray_local, tmp_path, searx, monkeypatch):
    # Set after Ray started, so only the stage's own forwarding can bring it to the actors.
    monkeypatch.setenv("BRAVE_API_KEY", "key-from-env")
    cfg = load_config("configs/demo.yaml", [
        f"root={tmp_path / 'run'}", "search.provider=brave", "cultures=[MX]",
        f"search.endpoint={searx.url.replace('/search', '/res/v1/web/search')}"])
    store = ArtifactStore(cfg.root)
    write_queries(store, "MX", "es-MX", ["cortesía", "familia"])
    summary = run_search(cfg, store)
    assert summary["ok"] == 2 and len(searx.calls) == 2
    rows = store.read_rows("search", "results")
    assert {r["hits"][0]["snippet"] for r in rows} == {"brave MX"}
    assert "key-from-env" not in json.dumps(summary) + json.dumps(rows, default=str)


@pytest.fixture(params=["local", "s3"])
def cache_root(request, tmp_path):
    return str(tmp_path / "run") if request.param == "local" else request.getfixturevalue("s3_root")


def test_cache_reads_only_complete_shards_after_a_crashed_writer(cache_root):
    import os

    from cm_ray.data.search_cache import STALE_TMP_S, SearchCache, _shard_dir

    store = ArtifactStore(cache_root)
    mx = {"query_id": "MX-000", "culture": "MX", "task": "survey", "kind": "agnostic",
          "query": "modales en la mesa", "locale": "es-MX"}
    gb = {**mx, "query_id": "GB-000", "culture": "GB", "query": "table manners", "locale": "en-GB"}
    hits = [{"title": "t", "url": "https://example.org/1", "snippet": "s", "rank": 1,
             "provider": "searxng", "locale": "es-MX", "fetched_at": "2026-01-01T00:00:00Z"}]
    cache = SearchCache(store, ["searxng"])
    cache.add({**mx, "status": "ok", "provider": "searxng", "hits": hits})
    assert cache.flush() == 1

    # What crashed writers leave: a temporary beside a complete shard, a locale whose only file
    # is a temporary (the rerun used to die on it with FileNotFoundError), and a broken shard.
    def raw_write(data: bytes, *parts: str) -> str:
        path = store.fs_path(*parts)
        store.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with store.fs.open_output_stream(path) as f:
            f.write(data)
        return path

    fresh_tmp = raw_write(b"PAR1 half a shard", *_shard_dir("searxng", "es-MX"), "part-2.parquet.tmp-4242")
    raw_write(b"PAR1 half", *_shard_dir("searxng", "en-GB"), "part-1.parquet.tmp-4242")
    raw_write(b"not parquet at all", *_shard_dir("searxng", "es-MX"), "part-3.parquet")
    stale_tmp = None
    if not store.is_s3:
        stale_tmp = raw_write(b"PAR1", *_shard_dir("searxng", "es-MX"), "part-0.parquet.tmp-99")
        old = time.time() - STALE_TMP_S - 60
        os.utime(stale_tmp, (old, old))

    rerun = SearchCache(store, ["searxng"])
    got = rerun.lookup(mx)
    assert got is not None and got["cached"] and got["hits"] == hits  # the complete shard counts
    assert rerun.lookup(gb) is None  # nothing complete for en-GB: asked again, no crash
    assert store.fs.get_file_info(fresh_tmp).size > 0  # a live writer's temporary is left alone
    if stale_tmp:
        assert not os.path.exists(stale_tmp)  # a crashed writer's leftover is cleaned up
    rerun.add({**gb, "status": "ok", "provider": "searxng", "hits": hits})
    assert rerun.flush() == 1
    assert SearchCache(store, ["searxng"]).lookup(gb)["hits"] == hits
    shards = store.files("search", "cache", suffix=".parquet")
    assert all(s.rsplit("/", 1)[-1].startswith("part-") for s in shards) and len(shards) == 3


def test_summary_counts_fetched_and_failed_pages(tmp_path):
    import pyarrow as pa

    from cm_ray import artifacts
    from cm_ray.data.search import _summary

    store = ArtifactStore(str(tmp_path))
    page = lambda url, err: {"url": url, "final_url": url, "text": "" if err else "body", "error": err}  # noqa: E731
    rows = [{"query_id": f"q{i}", "culture": "MX", "task": "t", "kind": "specific", "query": "x",
             "locale": "es-MX", "status": "ok", "error": None, "provider": "bm25", "cached": False,
             "retries": 0, "hits": [], "latency_ms": 1.0, "pages": pages}
            for i, pages in enumerate([[page("u1", None), page("u2", "blocked: private address")],
                                       [page("u3", "timeout")], []])]
    rows = [{k: r.get(k) for k in result_schema().names} for r in rows]
    store.write_table(pa.Table.from_pylist(rows, schema=result_schema()), *artifacts.search_results_file("MX"))
    summary = _summary(store, ["MX"], "bm25", 0, [])
    assert summary["queries"] == 3 and summary["pages"] == {"fetched": 1, "failed": 2}
    assert summary["per_culture"]["MX"]["pages"] == {"fetched": 1, "failed": 2}
    assert summary["degradations"] == []  # all answered by the primary: nothing degraded
