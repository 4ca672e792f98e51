"""Search providers behind one interface, each returning the same normalized hit record.

A hit is ``{title, url, snippet, rank, provider, locale, fetched_at}``. HTTP providers only build
the request (URL, params / JSON body, auth header from the environment) and parse the response as
the provider's public API documents it; sending, retrying and rate limiting live in
``cm_ray.data.searcher`` (through ``cm_ray.http``). ``BM25Provider`` answers offline from a passage corpus (JSONL/Parquet).

Country and language parameters come only from each provider's documented values, kept as data in
``provider_values.yaml`` (``targeting``). A culture a provider serves only approximately (Brave's
``country=ALL``, a language left out) or not at all (neither its country nor any of its languages
can be sent) is said up front: ``provider_support`` / ``unsupported`` per provider, and
``check_support`` for the search stage to call before it searches.
"""

from __future__ import annotations

import json
import os
import re
import time
from importlib import resources
from typing import Any

from cm_ray.data.provider_values import targeting
from cm_ray.http import RequestFailed, json_body

HIT_FIELDS = ("title", "url", "snippet", "rank", "provider", "locale", "fetched_at")


class ProviderError(RequestFailed):
    """A provider refused (missing API key, malformed answer); a ``RequestFailed`` like the HTTP ones."""


def _text(value: Any) -> str:
    """A field as storable text: lone surrogates (legal in JSON, not in UTF-8/Arrow) become '?'."""
    return str(value or "").encode("utf-8", "replace").decode("utf-8")


def make_hit(title: Any, url: Any, snippet: Any, rank: int, provider: str, locale: str) -> dict:
    return {"title": _text(title), "url": _text(url), "snippet": _text(snippet),
            "rank": rank, "provider": provider, "locale": locale,
            "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _rank(value: Any, default: int) -> int:
    """A provider's own rank if it is a sane int (it is stored as int32), else ``default``."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1_000_000:
        return value
    return default


def _items(data: Any, *path: str) -> list:
    """``data[path...]`` as a list of dicts, or a ProviderError naming what is missing."""
    node = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise ProviderError(f"malformed response: missing {'.'.join(path)}")
        node = node[key]
    if not isinstance(node, list) or not all(isinstance(x, dict) for x in node):
        raise ProviderError(f"malformed response: {'.'.join(path)} is not a list of objects")
    return node


class HttpProvider:
    """Base: subclasses set ``name``, ``url``, ``key_env`` and implement request/parse."""

    name = ""
    url = ""
    key_env: str | None = None

    def __init__(self, endpoint: str | None = None, secrets: Any = None):
        self.endpoint = endpoint or self.url
        self.key = None
        if self.key_env:
            # The driver's key when it handed one over (ray_utils.Secrets), else this process's.
            self.key = secrets.get(self.key_env) if secrets is not None else os.environ.get(self.key_env)
            if not self.key:
                # The name of the variable only; the key itself is never put in a message.
                raise ProviderError(f"search provider {self.name!r} needs the {self.key_env} "
                                    f"environment variable (API keys come from the environment only)")

    def request(self, query: str, culture: str, locale: str, top_k: int) -> dict:
        """kwargs for ``aiohttp.ClientSession.request`` (method, url, params/json, headers)."""
        raise NotImplementedError

    def parse(self, data: Any, locale: str, top_k: int) -> list[dict]:
        raise NotImplementedError

    def answer(self, body: bytes, locale: str, top_k: int) -> list[dict]:
        """Hits from a raw answer body. Broken JSON is a retryable ``RequestFailed``; an answer
        that parses but does not have the documented shape is a ``ProviderError`` with its
        reason (one failed row, never an exception that ends the stage)."""
        try:
            data = json_body(body)
        except RecursionError:
            raise ProviderError("malformed response: JSON nested too deeply") from None
        try:
            return self.parse(data, locale, top_k)
        except RequestFailed:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, ArithmeticError, RecursionError) as e:
            raise ProviderError(f"malformed response: {type(e).__name__}: {e}"[:300]) from None


class SearXNG(HttpProvider):
    name, url = "searxng", "http://127.0.0.1:8888/search"

    def request(self, query, culture, locale, top_k):
        return {"method": "GET", "url": self.endpoint,
                "params": {"q": query, "format": "json", **targeting(self.name, culture, locale).params}}

    def parse(self, data, locale, top_k):
        return [make_hit(r.get("title"), r.get("url"), r.get("content"), i + 1, self.name, locale)
                for i, r in enumerate(_items(data, "results")[:top_k])]


class Brave(HttpProvider):
    name, url, key_env = "brave", "https://api.search.brave.com/res/v1/web/search", "BRAVE_API_KEY"

    def request(self, query, culture, locale, top_k):
        return {"method": "GET", "url": self.endpoint,
                "params": {"q": query, **targeting(self.name, culture, locale).params,
                           "count": min(top_k, 20)},
                "headers": {"Accept": "application/json", "X-Subscription-Token": self.key}}

    def parse(self, data, locale, top_k):
        return [make_hit(r.get("title"), r.get("url"), r.get("description"), i + 1, self.name, locale)
                for i, r in enumerate(_items(data, "web", "results")[:top_k])]


class Serper(HttpProvider):
    name, url, key_env = "serper", "https://google.serper.dev/search", "SERPER_API_KEY"

    def request(self, query, culture, locale, top_k):
        return {"method": "POST", "url": self.endpoint,
                "json": {"q": query, **targeting(self.name, culture, locale).params,
                         "num": min(top_k, 100)},
                "headers": {"X-API-KEY": self.key, "Content-Type": "application/json"}}

    def parse(self, data, locale, top_k):
        rows = _items(data, "organic")[:top_k]
        return [make_hit(r.get("title"), r.get("link"), r.get("snippet"),
                         _rank(r.get("position"), i + 1), self.name, locale)
                for i, r in enumerate(rows)]


class Tavily(HttpProvider):
    name, url, key_env = "tavily", "https://api.tavily.com/search", "TAVILY_API_KEY"

    def request(self, query, culture, locale, top_k):
        # Tavily's `country` is one of its own lower-case English names, for topic "general" only.
        body = {"query": query, "max_results": min(top_k, 20), "topic": "general",
                **targeting(self.name, culture, locale).params}
        return {"method": "POST", "url": self.endpoint, "json": body,
                "headers": {"Authorization": f"Bearer {self.key}"}}

    def parse(self, data, locale, top_k):
        return [make_hit(r.get("title"), r.get("url"), r.get("content"), i + 1, self.name, locale)
                for i, r in enumerate(_items(data, "results")[:top_k])]


class You(HttpProvider):
    name, url, key_env = "you", "https://ydc-index.io/v1/search", "YDC_API_KEY"

    def request(self, query, culture, locale, top_k):
        return {"method": "GET", "url": self.endpoint,
                "params": {"query": query, "count": min(top_k, 100),
                           **targeting(self.name, culture, locale).params},
                "headers": {"X-API-Key": self.key}}

    def parse(self, data, locale, top_k):
        rows = _items(data, "results", "web")[:top_k]
        out = []
        for i, r in enumerate(rows):
            snippets = r.get("snippets")
            snippets = snippets if isinstance(snippets, list) else []
            text = " ".join(s for s in snippets if isinstance(s, str)) or r.get("description")
            out.append(make_hit(r.get("title"), r.get("url"), text, i + 1, self.name, locale))
        return out


HTTP_PROVIDERS: dict[str, type[HttpProvider]] = {
    c.name: c for c in (SearXNG, Brave, Serper, Tavily, You)}
PROVIDERS = ("bm25", *HTTP_PROVIDERS)


# ---------------------------------------------------------------------------------------------
# Which documented values a provider gets for a culture, and which cultures it cannot serve.


def provider_support(provider: str, cultures) -> dict[str, str]:
    """{culture: reason} for each of ``cultures`` that ``provider`` serves only approximately
    (reason starts "approximate: ") or not at all ("unsupported: "); exact ones are left out."""
    if provider not in HTTP_PROVIDERS:
        return {}
    out = {}
    for culture in cultures:
        t = targeting(provider, culture)
        if t.support != "exact":
            out[culture] = f"{t.support}: {t.reason}"
    return out


def unsupported(provider: str, cultures) -> dict[str, str]:
    """{culture: reason} for the cultures ``provider`` cannot serve (it can send neither their
    country nor any of their languages)."""
    return {c: r.removeprefix("unsupported: ") for c, r in provider_support(provider, cultures).items()
            if r.startswith("unsupported: ")}


def check_support(chain: list[str], cultures, log=None) -> dict[str, dict[str, str]]:
    """For the search stage, before it searches: ``{provider: {culture: reason}}`` for every
    provider of ``chain`` (primary + fallbacks) that serves a culture approximately or not at all,
    each reason passed to ``log`` (e.g. ``logger.warning``). Raises ProviderError naming the
    cultures that no provider of the chain can serve (BM25 serves every culture)."""
    report = {p: s for p in chain if (s := provider_support(p, cultures))}
    for p, per in report.items():
        for culture, reason in per.items():
            if log is not None:
                log(f"search: {p} for {culture}: {reason}")
    if "bm25" not in chain:
        dead = [c for c in cultures if all(c in unsupported(p, [c]) for p in chain)]
        if dead:
            raise ProviderError("search: no provider of " + " -> ".join(chain) + " can serve "
                                + "; ".join(f"{c} ({unsupported(chain[0], [c])[c]})" for c in dead))
    return report


# ---------------------------------------------------------------------------------------------
# Offline BM25 over a passage corpus.

_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-cased words; CJK text has no spaces, so each CJK character is a token."""
    return [t for t in _TOKEN.findall(text.lower()) if len(t) > 1 or not t.isascii()]


def load_corpus(uri: str | None = None) -> list[dict]:
    """Passages (id, title, url, text, culture, lang) from JSONL or Parquet, local or s3://.

    ``None`` loads the corpus shipped with cm_ray (``cm_ray/corpus/*.jsonl``).
    """
    if uri is None:
        rows = []
        for f in sorted(resources.files("cm_ray.corpus").iterdir(), key=lambda p: p.name):
            if f.name.endswith(".jsonl"):
                rows += [json.loads(line) for line in f.read_text("utf-8").splitlines() if line.strip()]
    else:
        from cm_ray.storage import filesystem_and_path

        fs, path = filesystem_and_path(uri)
        if uri.endswith(".parquet"):
            import pyarrow.parquet as pq

            rows = pq.read_table(path, filesystem=fs).to_pylist()
        else:
            with fs.open_input_stream(path) as f:
                text = f.read().decode("utf-8")
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not r.get("text"):
            raise ValueError(f"search.corpus: passage {i} of {uri or 'the shipped corpus'} "
                             f"has no 'text'")
    return rows


class BM25Provider:
    """BM25 (rank-bm25) over passages of the query's culture plus culture-free ones.

    A culture with no passages of its own gets culture-free passages only, never another
    culture's: a sample grounded in Mexican passages would teach a Peruvian adapter Mexico.
    """

    name = "bm25"

    def __init__(self, corpus: str | None = None):
        self.passages = load_corpus(corpus)
        self._indexes: dict[str, tuple[Any, list[dict]]] = {}

    def _index(self, culture: str):
        if culture not in self._indexes:
            from rank_bm25 import BM25Plus

            own = [p for p in self.passages if (p.get("culture") or "").upper() == culture]
            general = [p for p in self.passages if not p.get("culture")]
            docs = own + general
            if not docs:
                self._indexes[culture] = (None, [], [])
                return self._indexes[culture]
            tokens = [tokenize(f"{p.get('title', '')} {p['text']}") or ["_"] for p in docs]
            # BM25+ keeps idf positive in small corpora (Okapi's is 0 for a term in half the docs).
            self._indexes[culture] = (BM25Plus(tokens), docs, [set(t) for t in tokens])
        return self._indexes[culture]

    def search(self, query: str, culture: str, locale: str, top_k: int) -> list[dict]:
        bm25, docs, vocab = self._index(culture.upper())
        if not docs:
            return []
        terms = tokenize(query)
        scores = bm25.get_scores(terms)
        # Only passages sharing a term with the query (BM25+ gives every passage a floor score).
        matching = [i for i in range(len(docs)) if vocab[i].intersection(terms)]
        best = sorted(matching, key=lambda i: -scores[i])[:top_k]
        return [make_hit(docs[i].get("title"), docs[i].get("url") or f"corpus://{docs[i].get('id', i)}",
                         docs[i]["text"], r + 1, self.name, locale) for r, i in enumerate(best)]


def make_provider(name: str, endpoint: str | None = None, corpus: str | None = None, secrets: Any = None):
    """The provider called ``name`` (raises ProviderError for a missing API key); ``secrets``: a
    ``ray_utils.Secrets`` to read the key from (default: the environment)."""
    if name == "bm25":
        return BM25Provider(corpus)
    if name not in HTTP_PROVIDERS:
        raise ValueError(f"unknown search provider {name!r} (known: {', '.join(PROVIDERS)})")
    return HTTP_PROVIDERS[name](endpoint, secrets)
