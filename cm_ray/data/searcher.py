"""Searching one query row: the primary provider, then each fallback, each HTTP attempt through
``cm_ray.http`` (retries with backoff / Retry-After, the shared rate limit), then (with
``search.fetch.enabled``) the pages of its top hits. A row that carries ``cached_hits`` (a cached
answer whose pages were never fetched with the current fetch settings) is not searched again:
only its pages are fetched. No Ray here: ``cm_ray.data.search.WebSearcher`` wraps it, tests drive
it directly.
"""

from __future__ import annotations

import asyncio
import random
import re
import time

from cm_ray.config import SearchConfig
from cm_ray.data.providers import make_provider
from cm_ray.http import RequestFailed, SharedRateLimit, scrub_strings, send, with_retries

QUERY_COLUMNS = ("query_id", "culture", "task", "kind", "query", "locale")
REASONS = re.compile(r"HTTP \d{3}|timeout|connection error|truncated response|invalid JSON|malformed response")


def hit_type():
    import pyarrow as pa

    return pa.struct([("title", pa.string()), ("url", pa.string()), ("snippet", pa.string()),
                      ("rank", pa.int32()), ("provider", pa.string()), ("locale", pa.string()),
                      ("fetched_at", pa.string())])


def input_schema():
    """Arrow schema of the rows sent to the searchers: the query columns, and the provider and
    hits of a cached answer that only needs its pages fetched (null for a query to search)."""
    import pyarrow as pa

    return pa.schema([*((c, pa.string()) for c in QUERY_COLUMNS), ("cached_provider", pa.string()),
                      ("cached_hits", pa.list_(hit_type()))])


def failure_reasons(error: str | None, providers) -> list[str]:
    """``"searxng: connection error"``, ... for each provider failure named in a row's ``error``
    (``"searxng: connection error: ClientConnectorError; bm25: ..."``): provider and kind of
    failure, without the per-request detail, so they can be counted."""
    if not error:
        return []
    names = "|".join(re.escape(p) for p in providers)
    out = []
    for part in re.split(rf"; (?=(?:{names}): )", error):
        name, _, reason = part.partition(": ")
        kind = REASONS.match(reason)
        out.append(f"{name}: {kind.group(0) if kind else reason.split(':')[0][:60]}")
    return out


def result_schema():
    """Arrow schema of a search result row (``search/results/culture=XX/part-0.parquet``)."""
    import pyarrow as pa

    page = pa.struct([("url", pa.string()), ("final_url", pa.string()), ("text", pa.string()),
                      ("error", pa.string())])
    hit = hit_type()
    return pa.schema([*((c, pa.string()) for c in QUERY_COLUMNS), ("status", pa.string()),
                      ("error", pa.string()), ("provider", pa.string()), ("cached", pa.bool_()),
                      ("hits", pa.list_(hit)), ("attempts", pa.int32()), ("retries", pa.int32()),
                      ("latency_ms", pa.float64()), ("pages", pa.list_(page))])


class Searcher:
    """Search rows with the primary provider, then each fallback, with retries and rate limits.

    Args:
        cfg: the search config section.
        buckets: provider name -> TokenBucket (or its Ray actor handle); missing = unthrottled.
        session_factory: builds the aiohttp session (injectable).
    """

    def __init__(self, cfg: SearchConfig, buckets: dict | None = None, session_factory=None,
                 seed: int | None = None, secrets=None):
        self.cfg = cfg
        self.chain = [cfg.provider, *cfg.fallback]
        self.providers = {p: make_provider(p, cfg.endpoints.get(p) or
                                           (cfg.endpoint if p == cfg.provider else None), cfg.corpus,
                                           secrets)
                          for p in self.chain}
        self.limiters = {p: SharedRateLimit(b) for p, b in (buckets or {}).items()}
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
        req = dict(provider.request(query, culture, locale, self.cfg.top_k))
        resp = await send(self.session, req.pop("method"), req.pop("url"), timeout_s=self.cfg.timeout_s,
                          secrets=[provider.key], max_bytes=self.cfg.max_response_bytes,
                          limit_name="search.max_response_bytes", **req)
        # Text a provider echoes back is stored: scrub every key in play out of the hits.
        return scrub_strings(provider.answer(resp.body, locale, self.cfg.top_k),
                             [getattr(p, "key", None) for p in self.providers.values()])

    async def _with_retries(self, name: str, query: str, culture: str, locale: str, stats: dict):
        provider, limiter = self.providers[name], self.limiters.get(name)

        async def attempt():
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

        def on_retry(delay: float, _err) -> None:
            stats["retries"] += 1
            stats["busy"] += delay

        return await with_retries(attempt, self.cfg, self.rng, on_retry)

    async def search_row(self, row: dict) -> dict:
        """``row`` has the query columns; returns it with the result columns filled in.

        ``error`` names every provider that failed, also on a row a fallback answered (so a
        summary can count why the fallback was needed). A row with ``cached_hits`` is that
        cached answer (``cached`` true, no provider call) with its pages fetched."""
        await self._session()
        stats, errors = {"attempts": 0, "retries": 0, "busy": 0.0}, []
        out: dict = {}
        cached = row.get("cached_hits") is not None
        chain = [] if cached else self.chain
        if cached:
            out.update(status="ok", error=None, provider=row["cached_provider"], hits=row["cached_hits"])
        for name in chain:
            provider = self.providers[name]
            try:
                if name == "bm25":
                    t = time.monotonic()
                    hits = provider.search(row["query"], row["culture"], row["locale"], self.cfg.top_k)
                    stats["busy"] += time.monotonic() - t
                else:
                    hits = await self._with_retries(name, row["query"], row["culture"],
                                                    row["locale"], stats)
                out.update(status="ok", error="; ".join(errors) or None, provider=name, hits=hits)
                break
            except RequestFailed as e:
                errors.append(f"{name}: {e.reason}")
        if not out:
            out.update(status="failed", error="; ".join(errors), provider=self.cfg.provider, hits=[])
        pages = []
        if self.cfg.fetch.enabled and out["hits"]:
            from cm_ray.data.fetch import fetch_pages

            pages = await fetch_pages([h["url"] for h in out["hits"][:self.cfg.fetch.top_k]], self.cfg)
            # A page may echo the request that led to it (a key in a query string): scrub it too.
            pages = scrub_strings(pages, [getattr(p, "key", None) for p in self.providers.values()])
        # Time on the wire and in backoff; waits for a slot or a token are not the provider's.
        latency = stats["busy"] * 1000
        return {**{c: row[c] for c in QUERY_COLUMNS}, **out, "cached": cached,
                "attempts": stats["attempts"], "retries": stats["retries"],
                "latency_ms": round(latency, 2), "pages": pages}
