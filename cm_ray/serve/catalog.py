"""The ingress's cached view of the adapters on the store: which ids exist and at which version.

``/v1/models`` and every routing decision read this view; it is refreshed from the store at most
once per ``serve.adapter_cache_ttl_s`` (one listing plus one pointer read per adapter), not once
per adapter per call. A version the adapter servers refused (422: bad or incompatible, or one that
yielded non-finite values) and a published version that is malformed are not advertised until
another version is published under that id; a request pinning either gets the servers' 422
naming it (never a 404).
"""

from __future__ import annotations

import threading
import time


class AdapterCatalog:
    def __init__(self, store, ttl_s: float):
        self.store, self.ttl_s = store, ttl_s
        self._versions: dict[str, tuple[str | None, bool]] = {}  # id -> (version, usable)
        self._at = float("-inf")
        self._refused: dict[str, str | None] = {}  # id -> the version the servers refused
        self._lock = threading.Lock()

    def _fresh(self) -> dict[str, tuple[str | None, bool]]:
        from cm_ray.serve.adapters import adapter_listing

        with self._lock:
            if time.monotonic() - self._at >= self.ttl_s:
                self._versions, self._at = adapter_listing(self.store), time.monotonic()
            return self._versions

    def ids(self) -> list[str]:
        """The ids ``/v1/models`` advertises: usable, and not those whose current version was
        refused."""
        return sorted(k for k, (v, ok) in self._fresh().items()
                      if ok and (k not in self._refused or self._refused[k] != v))

    def has(self, key: str) -> bool:
        """Whether the store has ``key`` (a refused version too: asking for it gets the
        servers' 422 naming it, not a 404); the store is reread once the view is older than the
        TTL (hot-load: a culture trained after start is found)."""
        return key in self._fresh()

    def model_id(self, key: str) -> str:
        """The multiplexed model id of ``key``'s current version: ``<key>@<content hash>``
        (``<key>`` alone for a dir written in place)."""
        version = self._fresh().get(key, (None, True))[0]
        return f"{key}@{version}" if version else key

    def refuse(self, model_id: str) -> None:
        """The adapter servers refused this version: stop advertising it."""
        key, _, version = model_id.partition("@")
        with self._lock:
            self._refused[key] = version or None
