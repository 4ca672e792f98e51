"""The search stage's cache of provider answers, under ``search/cache/provider=P/locale=L/`` in
the artifact store, keyed by (provider, normalized query, locale). Only HTTP providers are cached
(BM25 is local and deterministic).

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
from cm_ray.data.providers import HTTP_PROVIDERS
from cm_ray.data.searcher import QUERY_COLUMNS, result_schema

log = logging.getLogger(__name__)

STALE_TMP_S = 3600.0
"""A temporary older than this is a crashed writer's leftover (a live write takes seconds)."""


def cache_key(provider: str, query: str, locale: str) -> str:
    """Stable key of (provider, normalized query, locale): NFKC, case- and space-folded."""
    norm = " ".join(unicodedata.normalize("NFKC", query).casefold().split())
    return artifacts.stable_id(provider, norm, locale, n=32)


def _shard_dir(provider: str, locale: str) -> tuple[str, ...]:
    return artifacts.search_cache_dir(f"provider={provider}", f"locale={locale}")


class SearchCache:
    """Provider answers under ``search/cache/provider=P/locale=L/part-*.parquet`` in the store."""

    def __init__(self, store, providers: list[str]):
        self.store, self.providers = store, [p for p in providers if p in HTTP_PROVIDERS]
        self.entries: dict[str, list] = {}
        self.pages: dict[str, list] = {}  # fetched page texts of an answer (search.fetch), kept with it
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
                    rows = table.select([c for c in ("key", "hits", "pages") if c in table.column_names]).to_pylist()
                except (OSError, ValueError, KeyError) as e:  # pyarrow's ArrowInvalid is a ValueError
                    log.warning("search cache: skipping unreadable shard %s (%s: %s)",
                                name, type(e).__name__, e)
                    continue
                for r in rows:
                    self.entries[r["key"]] = r["hits"]
                    self.pages[r["key"]] = r.get("pages") or []

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

    def lookup(self, row: dict) -> dict | None:
        """A cached result row for ``row`` (first provider of the chain that has one), or None."""
        self._load(row["locale"])
        for p in self.providers:
            key = cache_key(p, row["query"], row["locale"])
            hits = self.entries.get(key)
            if hits is not None:
                return {**{c: row[c] for c in QUERY_COLUMNS}, "status": "ok", "error": None,
                        "provider": p, "cached": True, "hits": hits, "attempts": 0, "retries": 0,
                        "latency_ms": 0.0, "pages": self.pages.get(key) or []}
        return None

    def add(self, row: dict) -> None:
        if row["status"] == "ok" and row["provider"] in self.providers:
            key = cache_key(row["provider"], row["query"], row["locale"])
            self.entries[key], self.pages[key] = row["hits"], row.get("pages") or []
            self.pending[(row["provider"], row["locale"])].append(
                {"key": key, "query": row["query"], "hits": row["hits"], "pages": self.pages[key]})

    def flush(self) -> int:
        """Write what was added since the last flush, one shard per (provider, locale)."""
        import pyarrow as pa

        res = result_schema()
        schema = pa.schema([("key", pa.string()), ("query", pa.string()), ("hits", res.field("hits").type),
                            ("pages", res.field("pages").type)])
        n = 0
        for (p, loc), rows in self.pending.items():
            name = f"part-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
            self.store.write_table(pa.Table.from_pylist(rows, schema=schema), *_shard_dir(p, loc), name)
            n += len(rows)
        self.pending.clear()
        return n
