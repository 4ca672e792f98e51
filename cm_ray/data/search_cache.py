"""The search stage's cache of provider answers, under ``search/cache/provider=P/locale=L/`` in
the artifact store, keyed by what changes the answer: (provider, normalized query, locale,
``search.top_k``). Only HTTP providers are cached (BM25 is local and deterministic).

Fetched pages are kept with their answer, tagged with the fetch settings they were fetched under
(``fetch_signature``: ``search.fetch.top_k`` and ``max_bytes``). A lookup gives the pages only
when those are the current settings, and none when fetching is off (what a fresh search would
give); ``needs_fetch`` tells the stage that a cached answer still needs its pages fetched (fetch
turned on, or its settings changed), which it does without asking the provider again.

Crash consistency: every shard is written whole under a fresh name (``ArtifactStore.write_table``:
a temporary file renamed into place locally, one PUT on S3), so a crash leaves at most a
temporary (``*.tmp-*``), never half a shard. The reader takes only complete ``part-*.parquet``
shards, skips a shard it cannot read (its answers are simply asked again) and removes
temporaries older than ``STALE_TMP_S``.
"""

from __future__ import annotations

import logging
import time
import unicodedata
import uuid
from collections import defaultdict

from cm_ray import artifacts
from cm_ray.config import SearchConfig
from cm_ray.data.providers import HTTP_PROVIDERS
from cm_ray.data.searcher import QUERY_COLUMNS, result_schema

log = logging.getLogger(__name__)

STALE_TMP_S = 3600.0
"""A temporary older than this is a crashed writer's leftover (a live write takes seconds)."""


def cache_key(provider: str, query: str, locale: str, top_k: int | None = None) -> str:
    """Stable key of (provider, normalized query, locale[, top_k]); the query NFKC-, case- and
    space-folded. The cache always passes ``top_k``: a provider's answer depends on it."""
    norm = " ".join(unicodedata.normalize("NFKC", query).casefold().split())
    return artifacts.stable_id(provider, norm, locale, *([] if top_k is None else [top_k]), n=32)


def fetch_signature(cfg) -> str | None:
    """The fetch settings pages depend on (``cfg``: the search section), or None when off."""
    f = cfg.fetch
    return artifacts.stable_id("fetch", f.top_k, f.max_bytes, n=16) if f.enabled else None


def _shard_dir(provider: str, locale: str) -> tuple[str, ...]:
    return artifacts.search_cache_dir(f"provider={provider}", f"locale={locale}")


class SearchCache:
    """Provider answers under ``search/cache/provider=P/locale=L/part-*.parquet`` in the store.

    ``cfg``: the search section (its ``top_k`` and fetch settings key the entries; default: the
    section's defaults)."""

    def __init__(self, store, providers: list[str], cfg: SearchConfig | None = None):
        self.store, self.providers = store, [p for p in providers if p in HTTP_PROVIDERS]
        self.cfg = cfg or SearchConfig()
        self.fetch = fetch_signature(self.cfg)
        self.entries: dict[str, list] = {}
        self.pages: dict[str, list] = {}  # fetched page texts of an answer (search.fetch), kept with it
        self.fetched: dict[str, str | None] = {}  # the fetch signature its pages were fetched under
        self.loaded: set[str] = set()
        self.pending: dict[tuple[str, str], list[dict]] = defaultdict(list)

    def _load(self, locale: str) -> None:
        if locale in self.loaded:
            return
        self.loaded.add(locale)
        for p in self.providers:
            parts = _shard_dir(p, locale)
            for name in self._complete_shards(parts):
                try:
                    table = self.store.read_table(*parts, name)
                    cols = [c for c in ("key", "hits", "pages", "fetch") if c in table.column_names]
                    rows = table.select(cols).to_pylist()
                except (OSError, ValueError, KeyError) as e:  # pyarrow's ArrowInvalid is a ValueError
                    log.warning("search cache: skipping unreadable shard %s (%s: %s)",
                                name, type(e).__name__, e)
                    continue
                for r in rows:
                    self.entries[r["key"]] = r["hits"]
                    self.pages[r["key"]] = r.get("pages") or []
                    self.fetched[r["key"]] = r.get("fetch")

    def _complete_shards(self, parts: tuple[str, ...]) -> list[str]:
        """Names of the complete shards under ``parts``; stale temporaries are removed."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.store.fs_path(*parts), allow_not_found=True)
        shards, now = [], time.time()
        for info in self.store.fs.get_file_info(sel):
            if info.type != pafs.FileType.File:
                continue
            if ".tmp" in info.base_name:
                mtime = info.mtime.timestamp() if info.mtime is not None else now
                if now - mtime > STALE_TMP_S:
                    try:
                        self.store.fs.delete_file(info.path)
                    except OSError:
                        pass  # another run removed it first
            elif info.base_name.startswith("part-") and info.base_name.endswith(".parquet"):
                shards.append(info.base_name)
        return sorted(shards)

    def _key(self, provider: str, row: dict) -> str:
        return cache_key(provider, row["query"], row["locale"], self.cfg.top_k)

    def lookup(self, row: dict) -> dict | None:
        """A cached result row for ``row`` (first provider of the chain that has one), or None;
        its pages only if fetched under the current fetch settings."""
        self._load(row["locale"])
        for p in self.providers:
            key = self._key(p, row)
            hits = self.entries.get(key)
            if hits is not None:
                current = self.fetch is not None and self.fetched.get(key) == self.fetch
                return {**{c: row[c] for c in QUERY_COLUMNS}, "status": "ok", "error": None,
                        "provider": p, "cached": True, "hits": hits, "attempts": 0, "retries": 0,
                        "latency_ms": 0.0, "pages": (self.pages.get(key) or []) if current else []}
        return None

    def needs_fetch(self, cached: dict) -> bool:
        """Whether a row from ``lookup`` still needs its pages fetched under the current settings."""
        return self.fetch is not None and bool(cached["hits"]) and not cached["pages"]

    def add(self, row: dict) -> None:
        if row["status"] == "ok" and row["provider"] in self.providers:
            key = self._key(row["provider"], row)
            pages = row.get("pages") or []
            self.entries[key], self.pages[key] = row["hits"], pages
            self.fetched[key] = self.fetch if pages else None
            self.pending[(row["provider"], row["locale"])].append(
                {"key": key, "query": row["query"], "hits": row["hits"], "pages": pages,
                 "fetch": self.fetched[key]})

    def flush(self) -> int:
        """Write what was added since the last flush, one shard per (provider, locale)."""
        import pyarrow as pa

        res = result_schema()
        schema = pa.schema([("key", pa.string()), ("query", pa.string()), ("hits", res.field("hits").type),
                            ("pages", res.field("pages").type), ("fetch", pa.string())])
        n = 0
        for (p, loc), rows in self.pending.items():
            name = f"part-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
            self.store.write_table(pa.Table.from_pylist(rows, schema=schema), *_shard_dir(p, loc), name)
            n += len(rows)
        self.pending.clear()
        return n
