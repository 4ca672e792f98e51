"""HTTP calls with retries and rate limits: the one module web search and the OpenAI-compatible
engine send requests through.

- ``send`` makes one aiohttp attempt and turns every failure into ``RequestFailed`` (a reason
  that never holds a secret, ``retryable``, ``retry_after``): 408/409/425/429, 5xx, timeouts,
  broken connections and cut bodies are retryable, other 4xx are not. ``json_body`` parses an
  answer (a broken body is retryable: often a proxy's error page or a cut connection).
- ``with_retries`` runs an attempt under tenacity: exponential backoff with jitter (50-100% of
  ``backoff_base_s * 2**retry``, capped at ``backoff_max_s``); a ``Retry-After`` wins (capped too).
- ``ProcessRateLimit`` spaces request starts in one process (aiolimiter); ``TokenBucket`` as a named
  Ray actor (``shared_bucket``) is the one limit a whole cluster shares, and ``SharedRateLimit``
  is one process's side of it (tokens granted in batches, never hoarded).

Importing this module is cheap: aiohttp, tenacity, aiolimiter and ray load on first use.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import deque
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Awaitable, Callable, Iterable

RETRY_STATUS = frozenset({408, 409, 425, 429})
"""Client-error statuses worth another try (besides every 5xx)."""


class RequestFailed(Exception):
    """One failed attempt. ``retryable``: worth another try; ``retry_after``: the server's wait (s)."""

    def __init__(self, reason: str, retryable: bool = False, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retryable, self.retry_after = reason, retryable, retry_after


def is_retryable_status(status: int) -> bool:
    return status in RETRY_STATUS or status >= 500


_PATH_ROOTS = ("home", "root", "tmp", "var", "opt", "usr", "srv", "mnt", "media", "work", "data",
               "workspace", "app", "etc", "proc", "run", "nix", "private", "Users", "Volumes")
_PATHS = re.compile(r"(?:\b(?:s3|s3a|gs|gcs|az|abfs|hdfs|file)://[^\s'\"<>)]+)"
                    r"|(?:(?<![\w.:/~-])(?:~|/(?:%s))(?:/[^\s'\"<>,;)]*)+)" % "|".join(_PATH_ROOTS))


def _spellings(secret: str) -> set[str]:
    """``secret`` as it may come back in an echoed request: raw, JSON-escaped, URL-encoded."""
    import json
    from urllib.parse import quote, quote_plus

    return {secret, json.dumps(secret)[1:-1], quote(secret, safe=""), quote_plus(secret)}


def scrub(text: Any, secrets: Iterable[str | None] = (), paths: bool = True) -> str:
    """``text`` (any object: exceptions and reprs too) safe to store or log: every non-empty
    secret (raw, JSON-escaped or URL-encoded) becomes ``***`` and, with ``paths``, every local
    path and store URI (``/home/...``, ``/tmp/...``, ``s3://...``) becomes ``<path>``.
    The one scrub every error text goes through before it reaches a row, a log or a message."""
    text = text if isinstance(text, str) else str(text)
    for s in sorted({v for s in secrets if s for v in _spellings(s)}, key=len, reverse=True):
        text = text.replace(s, "***")
    return _PATHS.sub("<path>", text) if paths else text


def error_text(exc: BaseException, secrets: Iterable[str | None] = ()) -> str:
    """``TypeName: message`` of an exception, scrubbed (for per-row error columns)."""
    msg = scrub(exc, secrets)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


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


@dataclass
class Response:
    status: int
    headers: Any
    body: bytes


async def send(session: Any, method: str, url: str, *, timeout_s: float,
               secrets: Iterable[str | None] = (), detail_chars: int = 160, **kwargs: Any) -> Response:
    """One request with ``session`` (aiohttp); returns the answer of a status below 400, raises
    ``RequestFailed`` otherwise. A refused request's reason quotes the first ``detail_chars`` of
    the body with ``secrets`` and paths scrubbed (an error page may echo the request)."""
    import aiohttp

    try:
        async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout_s),
                                   **kwargs) as resp:
            body = await resp.read()
            status, headers = resp.status, resp.headers
    except (asyncio.TimeoutError, TimeoutError):
        raise RequestFailed(f"timeout after {timeout_s:g}s", retryable=True) from None
    except aiohttp.ClientPayloadError as e:
        raise RequestFailed(f"truncated response: {scrub(e, secrets)}", retryable=True) from None
    except aiohttp.ClientError as e:
        raise RequestFailed(f"connection error: {type(e).__name__}", retryable=True) from None
    if is_retryable_status(status):
        raise RequestFailed(f"HTTP {status}", retryable=True,
                            retry_after=parse_retry_after(headers.get("Retry-After")))
    if status >= 400:
        # Scrub the whole body first: a key cut at the quoted length would survive as a prefix.
        text = scrub(body[:4 * detail_chars + 8192].decode("utf-8", "replace"), secrets)
        raise RequestFailed(f"HTTP {status}: {text[:detail_chars]}")
    return Response(status, headers, body)


def json_body(body: bytes) -> Any:
    """The JSON of an answer; a broken body is a retryable failure."""
    import json

    try:
        return json.loads(body)
    except ValueError as e:
        raise RequestFailed(f"invalid JSON ({len(body)} bytes): {e}", retryable=True) from None


# ---------------------------------------------------------------------------------------------
# Retries.


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry (SearchConfig has the same three fields)."""

    max_retries: int = 4
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0


def backoff_delay(retry: int, policy: Any, rng: Any = random, retry_after: float | None = None) -> float:
    """Seconds before retry number ``retry`` (0-based) under ``policy`` (anything with
    ``backoff_base_s`` and ``backoff_max_s``): exponential with jitter, capped; Retry-After wins."""
    if retry_after is not None:
        return min(retry_after, policy.backoff_max_s)
    return min(policy.backoff_max_s, policy.backoff_base_s * 2 ** retry) * (0.5 + rng.random() / 2)


async def with_retries(attempt: Callable[[], Awaitable[Any]], policy: Any, rng: Any = random,
                       on_retry: Callable[[float, RequestFailed], None] | None = None) -> Any:
    """Await ``attempt()`` until it returns, raises anything but a retryable ``RequestFailed``, or
    ``policy.max_retries`` retries have failed; the last error is raised as it is.
    ``on_retry(delay, error)`` runs before each backoff sleep."""
    from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

    def wait(state) -> float:
        err = state.outcome.exception()
        return backoff_delay(state.attempt_number - 1, policy, rng, getattr(err, "retry_after", None))

    def before_sleep(state) -> None:
        if on_retry is not None:
            on_retry(state.next_action.sleep, state.outcome.exception())

    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.max_retries + 1), wait=wait, before_sleep=before_sleep,
        retry=retry_if_exception(lambda e: isinstance(e, RequestFailed) and e.retryable), reraise=True)
    return await retrying(attempt)


# ---------------------------------------------------------------------------------------------
# Rate limits.


class ProcessRateLimit:
    """Request starts at least ``1/qps`` apart within this process (aiolimiter; no limit for
    ``qps=None``). The limiter is rebuilt when a new event loop uses it (``asyncio.run`` per call)."""

    def __init__(self, qps: float | None):
        self.qps = qps
        self._limiter = self._loop = None

    async def acquire(self) -> None:
        if not self.qps:
            return
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            from aiolimiter import AsyncLimiter

            # Capacity 1 per 1/qps s: no burst, every start is spaced.
            self._limiter, self._loop = AsyncLimiter(1, 1.0 / self.qps), loop
        await self._limiter.acquire()


class TokenBucket:
    """Token bucket (async). As a named Ray actor it is the one limit all processes share."""

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


def shared_bucket(name: str, qps: float):
    """The cluster-wide ``TokenBucket`` actor called ``name`` (created once, reconfigured to
    ``qps`` with a burst of ``qps / 20``, at least 1)."""
    import ray

    actor = ray.remote(TokenBucket).options(
        name=name, namespace="cm_ray", get_if_exists=True,
        num_cpus=0, max_concurrency=1000).remote(qps, qps / 20)
    ray.get(actor.configure.remote(qps, qps / 20))
    return actor


class SharedRateLimit:
    """One process's side of a shared ``TokenBucket`` (its actor handle, or the bucket itself):
    waiting requests are granted tokens in batches, so a busy process makes one bucket call per
    batch instead of one per request, and a token is only asked for when a request is ready to
    use it (no hoarding, so no bursts above the limit)."""

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
