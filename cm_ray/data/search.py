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
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
import unicodedata
import uuid
from collections import Counter, defaultdict, deque
from email.utils import parsedate_to_datetime
from typing import Any

from cm_ray.config import Config, SearchConfig
from cm_ray.data.providers import HTTP_PROVIDERS, ProviderError, make_provider

QUERY_COLUMNS = ("query_id", "culture", "task", "kind", "query", "locale")


def result_schema():
    import pyarrow as pa

    hit = pa.struct([("title", pa.string()), ("url", pa.string()), ("snippet", pa.string()),
                     ("rank", pa.int32()), ("provider", pa.string()), ("locale", pa.string()),
                     ("fetched_at", pa.string())])
    page = pa.struct([("url", pa.string()), ("text", pa.string()), ("error", pa.string())])
    return pa.schema([*((c, pa.string()) for c in QUERY_COLUMNS), ("status", pa.string()),
                      ("error", pa.string()), ("provider", pa.string()), ("cached", pa.bool_()),
                      ("hits", pa.list_(hit)), ("attempts", pa.int32()), ("retries", pa.int32()),
                      ("latency_ms", pa.float64()), ("pages", pa.list_(page))])


def cache_key(provider: str, query: str, locale: str) -> str:
    """Stable key of (provider, normalized query, locale): NFKC, case- and space-folded."""
    norm = " ".join(unicodedata.normalize("NFKC", query).casefold().split())
    return hashlib.sha256(f"{provider}\x1f{norm}\x1f{locale}".encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Retries and rate limiting.


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def backoff_delay(retry: int, cfg: SearchConfig, rng: random.Random,
                  retry_after: float | None = None) -> float:
    """Exponential backoff with jitter (50-100% of base * 2^retry, capped); Retry-After wins."""
    if retry_after is not None:
        return min(retry_after, cfg.backoff_max_s)
    return min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** retry) * (0.5 + rng.random() / 2)


class TokenBucket:
    """Token bucket (async). As a named Ray actor it is the one limit all searchers share."""

    def __init__(self, rate: float, burst: float):
        self.configure(rate, burst)

    def configure(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, max(1.0, burst)
        self.tokens, self.t, self._lock = self.burst, time.monotonic(), None

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now

    async def acquire(self, n: int) -> int:
        """Wait for at least one token; grant up to ``n`` (callers ask for batches)."""
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:  # FIFO across callers
            self._refill()
            if self.tokens < 1:
                await asyncio.sleep((1 - self.tokens) / self.rate)
                self._refill()
            k = min(n, int(self.tokens))
            self.tokens -= k
            return k


class RateLimiter:
    """One actor's side of a shared bucket: waiting requests are granted tokens in batches, so a
    busy actor makes one bucket call per batch instead of one per request, and a token is only
    asked for when a request is ready to use it (no hoarding, so no bursts above the limit)."""

    def __init__(self, bucket: Any, max_batch: int = 16):
        self.bucket, self.max_batch = bucket, max_batch
        self.waiters: deque = deque()
        self.pump: asyncio.Task | None = None

    async def acquire(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        if self.pump is None or self.pump.done():
            self.pump = asyncio.ensure_future(self._pump())
        await fut

    async def _pump(self) -> None:
        while self.waiters:
            n = min(len(self.waiters), self.max_batch)
            call = self.bucket.acquire.remote(n) if hasattr(self.bucket.acquire, "remote") \
                else self.bucket.acquire(n)
            for _ in range(await call):
                fut = self.waiters.popleft()
                if not fut.done():
                    fut.set_result(None)


# ---------------------------------------------------------------------------------------------
# Searching one row (no Ray here: WebSearcher wraps it, tests drive it directly).


class Searcher:
    """Search rows with the primary provider, then each fallback, with retries and rate limits.

    Args:
        cfg: the search config.
        buckets: provider name -> TokenBucket (or its Ray actor handle); missing = unthrottled.
        session_factory: builds the aiohttp session (injectable).
    """

    def __init__(self, cfg: SearchConfig, buckets: dict | None = None, session_factory=None,
                 seed: int | None = None):
        self.cfg = cfg
        self.chain = [cfg.provider, *cfg.fallback]
        self.providers = {p: make_provider(p, cfg.endpoints.get(p) or
                                           (cfg.endpoint if p == cfg.provider else None), cfg.corpus)
                          for p in self.chain}
        self.limiters = {p: RateLimiter(b) for p, b in (buckets or {}).items()}
        self.session_factory = session_factory
        self.session = self.sem = None
        self.rng = random.Random(seed)

    async def _session(self):
        if self.session is None:
            import aiohttp

            self.sem = asyncio.Semaphore(self.cfg.max_in_flight)
            factory = self.session_factory or (lambda: aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.cfg.max_in_flight)))
            self.session = factory()
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def _attempt(self, provider, query: str, culture: str, locale: str) -> list[dict]:
        import aiohttp

        req = provider.request(query, culture, locale, self.cfg.top_k)
        try:
            async with self.session.request(**req, timeout=aiohttp.ClientTimeout(
                    total=self.cfg.timeout_s)) as resp:
                body = await resp.read()
                status, retry_after = resp.status, resp.headers.get("Retry-After")
        except asyncio.TimeoutError:
            raise ProviderError(f"timeout after {self.cfg.timeout_s:g}s", retryable=True) from None
        except aiohttp.ClientPayloadError as e:
            raise ProviderError(f"truncated response: {e}", retryable=True) from None
        except aiohttp.ClientError as e:
            raise ProviderError(f"connection error: {type(e).__name__}", retryable=True) from None
        if status == 429 or status >= 500:
            raise ProviderError(f"HTTP {status}", retryable=True,
                                retry_after=parse_retry_after(retry_after))
        if status >= 400:
            text = body[:160].decode("utf-8", "replace")
            if provider.key:  # an error page that echoes the request must not leak the key
                text = text.replace(provider.key, "***")
            raise ProviderError(f"HTTP {status}: {text}")
        try:
            import json

            data = json.loads(body)
        except ValueError as e:
            # Often a proxy's error page or a cut connection: worth another try.
            raise ProviderError(f"invalid JSON ({len(body)} bytes): {e}", retryable=True) from None
        return provider.parse(data, locale, self.cfg.top_k)

    async def _with_retries(self, name: str, query: str, culture: str, locale: str, stats: dict):
        provider, limiter = self.providers[name], self.limiters.get(name)
        for retry in range(self.cfg.max_retries + 1):
            try:
                # Slot first, then token: a granted token is spent at once, never held.
                async with self.sem:
                    if limiter is not None:
                        await limiter.acquire()
                    stats["attempts"] += 1
                    t = time.monotonic()
                    try:
                        return await self._attempt(provider, query, culture, locale)
                    finally:
                        stats["busy"] += time.monotonic() - t
            except ProviderError as e:
                if not e.retryable or retry == self.cfg.max_retries:
                    raise
                stats["retries"] += 1
                delay = backoff_delay(retry, self.cfg, self.rng, e.retry_after)
                stats["busy"] += delay
                await asyncio.sleep(delay)

    async def search_row(self, row: dict) -> dict:
        """``row`` has the query columns; returns it with the result columns filled in."""
        await self._session()
        stats, errors = {"attempts": 0, "retries": 0, "busy": 0.0}, []
        out: dict = {}
        for name in self.chain:
            provider = self.providers[name]
            try:
                if name == "bm25":
                    t = time.monotonic()
                    hits = provider.search(row["query"], row["culture"], row["locale"], self.cfg.top_k)
                    stats["busy"] += time.monotonic() - t
                else:
                    hits = await self._with_retries(name, row["query"], row["culture"],
                                                    row["locale"], stats)
                out.update(status="ok", error=None, provider=name, hits=hits)
                break
            except ProviderError as e:
                errors.append(f"{name}: {e.reason}")
        else:
            out.update(status="failed", error="; ".join(errors), provider=self.cfg.provider, hits=[])
        pages = []
        if self.cfg.fetch.enabled and out["hits"]:
            from cm_ray.data.fetch import fetch_pages

            pages = await fetch_pages([h["url"] for h in out["hits"][:self.cfg.fetch.top_k]], self.cfg)
        # Time on the wire and in backoff; waits for a slot or a token are not the provider's.
        latency = stats["busy"] * 1000
        return {**{c: row[c] for c in QUERY_COLUMNS}, **out, "cached": False,
                "attempts": stats["attempts"], "retries": stats["retries"],
                "latency_ms": round(latency, 2), "pages": pages}


class WebSearcher:
    """Ray Data UDF: search each row's query (async; bounded in-flight; shared rate limits).

    Input columns:  query_id, culture, task, kind, query, locale (str)
    Output columns: the input + status ("ok"|"failed"), error (str|null), provider (str),
                    cached (bool), hits (list of {title, url, snippet, rank, provider, locale,
                    fetched_at}), attempts, retries (int), latency_ms (float), pages (list)
    """

    def __init__(self, search_cfg: dict, buckets: dict, session_factory=None):
        self.searcher = Searcher(SearchConfig(**search_cfg), buckets, session_factory)

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


def shared_bucket(provider: str, qps: float):
    """The cluster-wide token bucket actor for ``provider`` (created once, reconfigured)."""
    import ray

    actor = ray.remote(TokenBucket).options(
        name=f"search_rate_{provider}", namespace="cm_ray", get_if_exists=True,
        num_cpus=0, max_concurrency=1000).remote(qps, qps / 20)
    ray.get(actor.configure.remote(qps, qps / 20))
    return actor


# ---------------------------------------------------------------------------------------------
# Driver side: cache, resume, the stage.


class SearchCache:
    """Provider answers under ``search/cache/provider=P/locale=L/part-*.parquet`` in the store."""

    def __init__(self, store, providers: list[str]):
        self.store, self.providers = store, [p for p in providers if p in HTTP_PROVIDERS]
        self.entries: dict[str, list] = {}
        self.loaded: set[str] = set()
        self.pending: dict[tuple[str, str], list[dict]] = defaultdict(list)

    def _load(self, locale: str) -> None:
        if locale in self.loaded:
            return
        self.loaded.add(locale)
        for p in self.providers:
            parts = ("search", "cache", f"provider={p}", f"locale={locale}")
            if self.store.listdir(*parts):
                for r in self.store.read_table(*parts).select(["key", "hits"]).to_pylist():
                    self.entries[r["key"]] = r["hits"]

    def lookup(self, row: dict) -> dict | None:
        """A cached result row for ``row`` (first provider of the chain that has one), or None."""
        self._load(row["locale"])
        for p in self.providers:
            hits = self.entries.get(cache_key(p, row["query"], row["locale"]))
            if hits is not None:
                return {**{c: row[c] for c in QUERY_COLUMNS}, "status": "ok", "error": None,
                        "provider": p, "cached": True, "hits": hits, "attempts": 0, "retries": 0,
                        "latency_ms": 0.0, "pages": []}
        return None

    def add(self, row: dict) -> None:
        if row["status"] == "ok" and row["provider"] in self.providers:
            key = cache_key(row["provider"], row["query"], row["locale"])
            self.entries[key] = row["hits"]
            self.pending[(row["provider"], row["locale"])].append(
                {"key": key, "query": row["query"], "hits": row["hits"]})

    def flush(self) -> int:
        """Write what was added since the last flush, one shard per (provider, locale)."""
        import pyarrow as pa

        hit_type = result_schema().field("hits").type
        schema = pa.schema([("key", pa.string()), ("query", pa.string()), ("hits", hit_type)])
        n = 0
        for (p, loc), rows in self.pending.items():
            name = f"part-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
            self.store.write_table(pa.Table.from_pylist(rows, schema=schema),
                                   "search", "cache", f"provider={p}", f"locale={loc}", name)
            n += len(rows)
        self.pending.clear()
        return n


def _check_keys(cfg: SearchConfig) -> dict[str, str]:
    """Fail at stage start on a missing API key; return the key variables the workers need."""
    import os

    env = {}
    for p in [cfg.provider, *cfg.fallback]:
        if p in HTTP_PROVIDERS:
            make_provider(p, "http://127.0.0.1/")  # raises ProviderError naming the variable
            var = HTTP_PROVIDERS[p].key_env
            if var:
                env[var] = os.environ[var]
    return env


def _summary(store, cultures: list[str], provider: str, calls: int, skipped: list[str]) -> dict:
    per: dict[str, Counter] = defaultdict(Counter)
    total = Counter()
    for c in cultures:
        if not store.exists("search", "results", f"culture={c}"):
            continue
        cols = ["status", "provider", "cached", "retries", "hits"]
        for r in store.read_table("search", "results", f"culture={c}").select(cols).to_pylist():
            k = per[r["provider"]]
            k[r["status"]] += 1
            k["cached"] += bool(r["cached"])
            k["retried"] += r["retries"] > 0
            total[r["status"]] += 1
            total["hits"] += len(r["hits"] or [])
    n = total["ok"] + total["failed"]
    return {"queries": n, "ok": total["ok"], "failed": total["failed"], "hits": total["hits"],
            "provider_calls": calls, "skipped_cultures": skipped,
            "per_provider": {p: {k: c[k] for k in ("ok", "failed", "retried", "cached")}
                             for p, c in sorted(per.items())},
            "headline": f"{n} queries via {provider}: {total['ok']} ok, {total['failed']} failed, "
                        f"{sum(c['cached'] for c in per.values())} cached, {calls} provider calls"}


def run_search(cfg: Config, store, force: bool = False) -> dict:
    """Run the search stage over every culture of ``cfg``; returns the summary.

    Cultures whose result partition exists are skipped unless ``force`` (then the cache still
    answers what it can). Raises RuntimeError when the queries stage has not run, ProviderError
    when a provider's API key is missing.
    """
    import pyarrow as pa

    scfg = cfg.search
    key_env = _check_keys(scfg)
    missing = [c for c in cfg.cultures if not store.listdir("queries", f"culture={c}")]
    if missing:
        raise RuntimeError(f"search: no queries for {', '.join(missing)} under "
                           f"{store.uri('queries')}; run the queries stage first")
    done = [c for c in cfg.cultures if store.exists("search", "results", f"culture={c}", "part-0.parquet")]
    todo = cfg.cultures if force else [c for c in cfg.cultures if c not in done]
    cache = SearchCache(store, [scfg.provider, *scfg.fallback] if scfg.cache else [])
    results: dict[str, list[dict]] = {}
    expected: dict[str, int] = {}
    order: dict[str, int] = {}
    misses: list[dict] = []
    for c in todo:
        rows = store.read_table("queries", f"culture={c}").select(list(QUERY_COLUMNS)).to_pylist()
        expected[c], results[c] = len(rows), []
        for i, r in enumerate(rows):
            order[r["query_id"]] = i
            hit = cache.lookup(r)
            (results[c].append(hit) if hit else misses.append(r))

    def finish(c: str) -> None:
        cache.flush()  # cache first: a partition on disk means its answers are cached too
        rows = sorted(results.pop(c), key=lambda r: order[r["query_id"]])  # the queries' order
        store.write_table(pa.Table.from_pylist(rows, schema=result_schema()),
                          "search", "results", f"culture={c}", "part-0.parquet")

    for c in [c for c in todo if len(results[c]) == expected[c]]:
        finish(c)
    calls = 0
    if misses:
        calls = _search_on_ray(cfg, misses, key_env, results, expected, cache, finish)
    return _summary(store, cfg.cultures, scfg.provider, calls,
                    [c for c in cfg.cultures if c not in todo])


def _search_on_ray(cfg: Config, misses: list[dict], key_env: dict, results: dict,
                   expected: dict, cache: SearchCache, finish) -> int:
    import pyarrow as pa
    import ray

    from cm_ray.ray_utils import init_ray

    scfg = cfg.search
    init_ray(cfg)
    buckets = {p: shared_bucket(p, scfg.qps) for p in [scfg.provider, *scfg.fallback]
               if p in HTTP_PROVIDERS and scfg.qps}
    # Enough blocks that every actor gets work and each block runs a few batches at once.
    blocks = max(scfg.concurrency * 2, -(-len(misses) // (scfg.batch_size * 4)))
    table = pa.Table.from_pylist(misses, schema=pa.schema([(c, pa.string()) for c in QUERY_COLUMNS]))
    remote_args: dict[str, Any] = {"num_cpus": scfg.actor_cpus}
    if key_env:  # keys reach the actors as environment variables only
        remote_args["runtime_env"] = {"env_vars": key_env}
    ds = ray.data.from_arrow(table).repartition(blocks).map_batches(
        WebSearcher, fn_constructor_kwargs={"search_cfg": scfg.model_dump(), "buckets": buckets},
        batch_size=scfg.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=scfg.concurrency),
        **remote_args)
    calls, since_flush = 0, 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for r in batch.to_pylist():
            calls += r["attempts"]
            cache.add(r)
            since_flush += 1
            results[r["culture"]].append(r)
            if len(results[r["culture"]]) == expected[r["culture"]]:
                finish(r["culture"])
                since_flush = 0
        if since_flush >= scfg.cache_flush_rows:
            cache.flush()
            since_flush = 0
    return calls

