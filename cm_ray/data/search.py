"""Search stage: every generated query through a search provider, asynchronously, on Ray Data.

Reads ``queries/culture=XX/`` and writes ``search/results/culture=XX/part-0.parquet`` (one row per
query; a query that fails after retries and fallbacks is a row with ``status="failed"`` and its
reason, never dropped). ``WebSearcher`` actors (async aiohttp) hold at most
``search.max_in_flight`` requests each, and all of them draw from one token bucket per provider
(a named Ray actor), so ``search.qps`` holds for the whole cluster.

Provider answers are cached under ``search/cache/provider=P/locale=L/`` in the artifact store,
keyed by (provider, normalized query, locale). The driver answers from the cache before anything
is sent, writes cache shards as results stream in, and writes each culture's partition once that
culture is complete, so an interrupted run resumes where it stopped and a rerun makes 0 calls.
Only HTTP providers are cached (BM25 is local and deterministic).

    cm-ray synthesize configs/demo.yaml            # queries -> search -> synthesize

A cached answer is searched again only when its key changes (``search.top_k`` is part of it);
with ``search.fetch.enabled`` a cached answer without pages fetched under the current fetch
settings goes to the searchers for its pages only (no provider call).

Before anything runs: a self-hosted provider (``searxng``) with no endpoint is a config error
naming ``search.endpoints.searxng`` when the run targets a cluster (``ray.address`` or
``RAY_ADDRESS`` set), since its loopback default only exists on the machine that runs it; and
the cultures the bm25 corpus has no passages of their own for are named (a warning, and
``summary["culture_free_cultures"]``) when bm25 is in the chain, and so are the cultures a provider
serves approximately or not at all (``providers.check_support``: ``summary["provider_support"]``).

The summary has the totals, ``per_provider`` and, per culture (``summary["per_culture"][c]``):

    searches     rows (queries) of the culture's partition
    ok, failed   answered / failed after retries and every fallback
    primary      answered by ``search.provider``; fallback: answered by a ``search.fallback``
    by_provider  {provider: answers}; cached: answers from the cache
    failures     {"<provider>: <kind>": n}: every provider failure, also those a fallback made
                 good (kind: "HTTP 503", "timeout", "connection error", "invalid JSON", ...)
    pages        {"fetched": n, "failed": n}: fetched page texts and page failures
    culture_free answers by bm25 from culture-free passages only (no passages of the culture's own)

and ``summary["degradations"]`` has one ``search_fallback`` and one ``search_failed`` record
(``cm_ray.checks``) per culture that had any, failing the stage past ``checks.search_fallback`` /
``checks.search_failed``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter, defaultdict
from typing import Any

from cm_ray import artifacts, checks
from cm_ray.config import Config, SearchConfig
from cm_ray.config.base import ConfigError
from cm_ray.data.providers import HTTP_PROVIDERS, PROVIDERS, check_support, load_corpus, make_provider
from cm_ray.data.search_cache import SearchCache, cache_key
from cm_ray.data.searcher import QUERY_COLUMNS, Searcher, failure_reasons, input_schema, result_schema

SELF_HOSTED = ("searxng",)
"""Providers with no public URL: their default endpoint is a loopback address."""


class WebSearcher:
    """Ray Data UDF: search each row's query (async; bounded in-flight; shared rate limits).

    Input columns:  query_id, culture, task, kind, query, locale (str); cached_provider,
                    cached_hits (a cached answer that needs only its pages; null otherwise)
    Output columns: the query columns + status ("ok"|"failed"), error (str|null: the providers
                    that failed, also when a fallback answered), provider (str), cached (bool),
                    hits (list of {title, url, snippet, rank, provider, locale, fetched_at}),
                    attempts, retries (int), latency_ms (float), pages (list of {url (the
                    hit's), final_url (after redirects), text, error})
    """

    def __init__(self, search_cfg: SearchConfig, buckets: dict, session_factory=None, secrets=None):
        from cm_ray.ray_utils import resolve_secrets

        # API keys from the driver through the object store (never runtime_env: Ray displays it).
        self.searcher = Searcher(search_cfg, buckets, session_factory, secrets=resolve_secrets(secrets))

    async def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        out = await asyncio.gather(*(self.searcher.search_row(r) for r in rows))
        yield pa.Table.from_pylist(out, schema=result_schema())

    def __del__(self):
        # The session lives on Ray Data's UDF event loop; close it there when the actor goes.
        session = getattr(self.searcher, "session", None)
        loop = getattr(session, "_loop", None)
        if loop is not None and loop.is_running() and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.searcher.close(), loop)


def check_endpoints(cfg: Config) -> None:
    """A self-hosted provider of the chain without an endpoint is a ConfigError naming the field
    when the run targets a cluster: the actors run on other machines, where its loopback default
    answers nothing, and every query would go to the fallback."""
    if not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        return
    s = cfg.search
    for p in [s.provider, *s.fallback]:
        if p in SELF_HOSTED and not (s.endpoints.get(p) or (p == s.provider and s.endpoint)):
            raise ConfigError(
                f"search.endpoints.{p}: required on a cluster (ray.address / RAY_ADDRESS is set): "
                f"{p} is self-hosted and its default {HTTP_PROVIDERS[p].url} is loopback on each "
                f"node; set search.endpoints.{p}" + (" or search.endpoint" if p == s.provider else ""))


def culture_free(cfg: Config) -> list[str]:
    """The cultures of ``cfg`` the bm25 corpus has no passages of their own for, when bm25 is in
    the provider chain (bm25 answers them from culture-free passages only)."""
    if "bm25" not in [cfg.search.provider, *cfg.search.fallback]:
        return []
    own = {(p.get("culture") or "").upper() for p in load_corpus(cfg.search.corpus)}
    return [c for c in cfg.cultures if c not in own]


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def _check_keys(cfg: SearchConfig) -> list[str]:
    """Fail at stage start on a missing API key; return the key variables the workers need."""
    names = []
    for p in [cfg.provider, *cfg.fallback]:
        if p in HTTP_PROVIDERS:
            make_provider(p, "http://127.0.0.1/")  # raises ProviderError naming the variable
            if HTTP_PROVIDERS[p].key_env:
                names.append(HTTP_PROVIDERS[p].key_env)
    return names


def dedup_misses(misses: list[dict]) -> tuple[list[dict], dict[str, list[dict]]]:
    """One row per distinct (normalized query, locale) to send, and every row sharing it: the same
    search (an agnostic query repeated for each task, two cultures sharing a locale) runs once."""
    twins: dict[str, list[dict]] = {}
    for r in misses:
        twins.setdefault(cache_key("", r["query"], r["locale"]), []).append(r)
    return [rows[0] for rows in twins.values()], twins


def _top(counts: Counter, n: int = 3) -> str:
    return ", ".join(f"{k} x{v}" for k, v in counts.most_common(n))


def _culture_summary(c: str, rows: list[dict], primary: str, free: bool) -> tuple[dict, list[dict]]:
    """``summary["per_culture"][c]`` and the culture's degradation records."""
    ok = [r for r in rows if r["status"] == "ok"]
    by_provider = Counter(r["provider"] for r in ok)
    failures = Counter(f for r in rows for f in failure_reasons(r["error"], PROVIDERS))
    pages = Counter("failed" if p["error"] else "fetched" for r in rows for p in r["pages"] or [])
    n, n_failed = len(rows), len(rows) - len(ok)
    n_fallback = len(ok) - by_provider[primary]
    n_free = by_provider["bm25"] if free else 0
    entry = {"searches": n, "ok": len(ok), "failed": n_failed, "primary": by_provider[primary],
             "fallback": n_fallback, "by_provider": dict(sorted(by_provider.items())),
             "cached": sum(bool(r["cached"]) for r in rows), "failures": dict(failures.most_common()),
             "pages": {"fetched": pages["fetched"], "failed": pages["failed"]}, "culture_free": n_free}
    degr = []
    if n_fallback:
        used = ", ".join(f"{p} ({k})" for p, k in by_provider.most_common() if p != primary)
        why = Counter(f for f in failures.elements() if f.startswith(f"{primary}: "))
        degr.append(checks.degradation(
            "search_fallback", c, n_fallback, n,
            f"{n_fallback} of {n} searches answered by the fallback {used}, not {primary}"
            + (f" ({_top(why)})" if why else "")
            + (f"; bm25 has no passages of {c}'s own: culture-free passages only" if n_free else "")))
    if n_failed:
        degr.append(checks.degradation("search_failed", c, n_failed, n,
                                       f"{n_failed} of {n} searches failed ({_top(failures)})"))
    return entry, degr


def _summary(store, cultures: list[str], provider: str, calls: int, skipped: list[str],
             deduplicated: int = 0, free: list[str] | tuple = ()) -> dict:
    per: dict[str, Counter] = defaultdict(Counter)
    total = Counter()
    per_culture, degradations = {}, []
    cols = ["status", "error", "provider", "cached", "retries", "hits", "pages"]
    for c in cultures:
        if not store.exists(*artifacts.search_results_dir(c)):
            continue
        rows = store.read_table(*artifacts.search_results_dir(c)).select(cols).to_pylist()
        per_culture[c], degr = _culture_summary(c, rows, provider, c in free)
        degradations += degr
        for r in rows:
            k = per[r["provider"]]
            k[r["status"]] += 1
            k["cached"] += bool(r["cached"])
            k["retried"] += r["retries"] > 0
            total[r["status"]] += 1
            total["retries"] += r["retries"] or 0
            total["hits"] += len(r["hits"] or [])
    n = total["ok"] + total["failed"]
    fallback = sum(e["fallback"] for e in per_culture.values())
    pages = {k: sum(e["pages"][k] for e in per_culture.values()) for k in ("fetched", "failed")}
    return {"queries": n, "ok": total["ok"], "failed": total["failed"], "hits": total["hits"],
            "pages": pages, "fallback": fallback,
            "provider_calls": calls, "skipped_cultures": skipped, "deduplicated": deduplicated,
            "usage": {"provider_calls": calls, "retries": total["retries"]},
            "per_provider": {p: {k: c[k] for k in ("ok", "failed", "retried", "cached")}
                             for p, c in sorted(per.items())},
            "per_culture": per_culture, "degradations": degradations,
            "culture_free_cultures": list(free),
            "headline": f"{n} queries via {provider}: {total['ok']} ok ({fallback} by a fallback), "
                        f"{total['failed']} failed, {sum(c['cached'] for c in per.values())} cached, "
                        f"{calls} provider calls"}


def run_search(cfg: Config, store, force: bool = False) -> dict:
    """Run the search stage over every culture of ``cfg``; returns the summary.

    Cultures whose result partition exists are skipped unless ``force`` (then the cache still
    answers what it can). Raises RuntimeError when the queries stage has not run, ProviderError
    when a provider's API key is missing or no provider of the chain can serve a culture,
    ConfigError for a self-hosted provider without an endpoint on a cluster (``check_endpoints``).
    """
    import pyarrow as pa

    scfg = cfg.search
    check_endpoints(cfg)
    key_env = _check_keys(scfg)
    support = check_support([scfg.provider, *scfg.fallback], cfg.cultures, log=_warn)
    missing = [c for c in cfg.cultures if not store.listdir(*artifacts.queries_dir(c))]
    if missing:
        raise RuntimeError(f"search: no queries for {', '.join(missing)} under "
                           f"{store.uri(*artifacts.queries_dir())}; run the queries stage first")
    done = [c for c in cfg.cultures if store.exists(*artifacts.search_results_file(c))]
    todo = cfg.cultures if force else [c for c in cfg.cultures if c not in done]
    free = culture_free(cfg)
    if free:
        _warn(f"search: the bm25 corpus has no passages of their own for {', '.join(free)}: "
              f"bm25 answers them from culture-free passages only")
    cache = SearchCache(store, [scfg.provider, *scfg.fallback] if scfg.cache else [], scfg)
    results: dict[str, list[dict]] = {}
    expected: dict[str, int] = {}
    order: dict[str, int] = {}
    misses: list[dict] = []
    for c in todo:
        rows = store.read_table(*artifacts.queries_dir(c)).select(list(QUERY_COLUMNS)).to_pylist()
        expected[c], results[c] = len(rows), []
        for i, r in enumerate(rows):
            order[r["query_id"]] = i
            hit = cache.lookup(r)
            if hit and cache.needs_fetch(hit):  # to the searchers for its pages only
                misses.append({**r, "cached_provider": hit["provider"], "cached_hits": hit["hits"]})
            else:
                (results[c].append(hit) if hit else misses.append(r))

    from cm_ray.progress import stage_bar

    bar = stage_bar("search", len(todo))
    written = [0]

    def finish(c: str) -> None:
        cache.flush()  # cache first: a partition on disk means its answers are cached too
        rows = sorted(results.pop(c), key=lambda r: order[r["query_id"]])  # the queries' order
        store.write_table(pa.Table.from_pylist(rows, schema=result_schema()),
                          *artifacts.search_results_file(c))
        written[0] += len(rows)
        bar.set_postfix_str(f"{written[0]} queries, last {c}", refresh=False)
        bar.update(1)

    for c in [c for c in todo if len(results[c]) == expected[c]]:
        finish(c)
    calls = 0
    unique, twins = dedup_misses(misses)
    if unique:
        calls = _search_on_ray(cfg, unique, key_env, results, expected, cache, finish, twins)
    bar.close()
    return _summary(store, cfg.cultures, scfg.provider, calls, [c for c in cfg.cultures if c not in todo],
                    deduplicated=len(misses) - len(unique), free=free) | {"provider_support": support}


def _search_on_ray(cfg: Config, misses: list[dict], key_env: list[str], results: dict,
                   expected: dict, cache: SearchCache, finish, twins: dict[str, list[dict]]) -> int:
    import pyarrow as pa
    import ray

    from cm_ray.http import shared_bucket
    from cm_ray.ray_utils import init_ray, share_secrets

    scfg = cfg.search
    init_ray(cfg)
    buckets = {p: shared_bucket(f"search_rate_{p}", scfg.qps) for p in [scfg.provider, *scfg.fallback]
               if p in HTTP_PROVIDERS and scfg.qps}
    # Enough blocks that every actor gets work and each block runs a few batches at once.
    blocks = max(scfg.concurrency * 2, -(-len(misses) // (scfg.batch_size * 4)))
    table = pa.Table.from_pylist(misses, schema=input_schema())
    remote_args: dict[str, Any] = {"num_cpus": scfg.actor_cpus}
    # Keys reach the actors through the object store, never runtime_env (shown by Ray).
    secrets = share_secrets(key_env) if key_env else None
    ds = ray.data.from_arrow(table).repartition(blocks).map_batches(
        WebSearcher, fn_constructor_kwargs={"search_cfg": scfg, "buckets": buckets, "secrets": secrets},
        batch_size=scfg.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=scfg.concurrency),
        **remote_args)
    calls, since_flush = 0, 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for r in batch.to_pylist():
            calls += r["attempts"]
            cache.add(r)
            since_flush += 1
            for twin in twins[cache_key("", r["query"], r["locale"])]:  # the answer of each row asking it
                c = twin["culture"]
                results[c].append({**r, **{k: twin[k] for k in QUERY_COLUMNS}})
                if len(results[c]) == expected[c]:
                    finish(c)
                    since_flush = 0
        if since_flush >= scfg.cache_flush_rows:
            cache.flush()
            since_flush = 0
    return calls

