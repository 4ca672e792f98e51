"""HTTP calls with retries and rate limits: the one module web search and the OpenAI-compatible
engine send requests through.

- ``send`` makes one aiohttp attempt and turns every failure into ``RequestFailed`` (a reason
  that never holds a secret, ``retryable``, ``retry_after``): 408/409/425/429, 5xx, timeouts,
  broken connections and cut bodies are retryable, other 4xx are not. ``json_body`` parses an
  answer (a broken body is retryable: often a proxy's error page or a cut connection).
- ``with_retries`` runs an attempt under tenacity: exponential backoff with jitter (50-100% of
  ``backoff_base_s * 2**retry``, capped at ``backoff_max_s``); a ``Retry-After`` wins (capped too).
- ``TokenBucket`` (capacity 1: starts ``1/qps`` apart, no burst after an idle or stalled period)
  as a named Ray actor (``shared_bucket``) is the one limit a whole cluster shares;
  ``SharedRateLimit`` is one process's side of it (a slot per request, asked for when the request
  is ready, never hoarded) and ``ProcessRateLimit`` the same limit within one process.

Importing this module is cheap: aiohttp, tenacity and ray load on first use.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
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


class TokenBucket:
    """A token bucket of capacity 1: request starts granted at least ``1/rate`` s apart, first come
    first served. As a named Ray actor (``shared_bucket``) it is the one limit a whole cluster shares.

    No burst by construction: a grant is stamped with the clock's reading when it is made, and the
    next one waits until ``grant + 1/rate``. Nothing accumulates while the bucket is idle or while
    its process is stalled: after a gap the first caller is served at once and the next one
    ``1/rate`` later, never several together. ``clock`` and ``sleep`` are injectable (tests drive a
    fake monotonic clock).
    """

    def __init__(self, rate: float, *, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], Awaitable[Any]] | None = None):
        self.clock = clock or time.monotonic
        self.sleep = sleep or asyncio.sleep
        self.last = float("-inf")  # clock reading of the latest grant
        self._lock = self._loop = None
        self.configure(rate)

    def configure(self, rate: float) -> None:
        """Change the rate; the spacing after the latest grant follows the new rate at once."""
        if not rate or rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        self.rate = float(rate)

    def get_rate(self) -> float:
        return self.rate

    async def acquire(self) -> float:
        """Wait for the next start slot and return its time on the bucket's clock (one slot per
        call: slots are never handed out ahead, so none can pile up and be spent together)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # asyncio.Lock binds to one loop (asyncio.run per call)
            self._lock, self._loop = asyncio.Lock(), loop
        async with self._lock:  # FIFO across callers
            while True:
                now = self.clock()
                wait = 1.0 / self.rate - (now - self.last)  # as a difference: exact spacing
                if wait <= 0:
                    self.last = now
                    return now
                await self.sleep(wait + 1e-6)  # past the slot, so rounding can't wake us short


class ProcessRateLimit:
    """Request starts at least ``1/qps`` apart within this process (a capacity-1 ``TokenBucket``;
    no limit for ``qps=None``). ``acquire`` returns the grant time (``None`` when unlimited).

    aiolimiter's capacity-1 limiter spaces starts too, but it reads the event loop's clock, which a
    test cannot drive; this one shares the cluster bucket's schedule and takes ``clock``/``sleep``."""

    def __init__(self, qps: float | None, *, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], Awaitable[Any]] | None = None):
        self.qps = qps
        self.bucket = TokenBucket(qps, clock=clock, sleep=sleep) if qps else None

    async def acquire(self) -> float | None:
        return None if self.bucket is None else await self.bucket.acquire()


def shared_bucket(name: str, qps: float):
    """The cluster-wide ``TokenBucket`` actor called ``name`` (created once, reconfigured to
    ``qps``; capacity 1, so its grants are ``1/qps`` apart whatever the number of callers)."""
    import ray

    actor = ray.remote(TokenBucket).options(
        name=name, namespace="cm_ray", get_if_exists=True,
        num_cpus=0, max_concurrency=1000).remote(qps)
    ray.get(actor.configure.remote(qps))
    return actor


class SharedRateLimit:
    """One process's side of a shared ``TokenBucket`` (its actor handle, or the bucket itself).

    Each waiting request asks the bucket for its own slot when it is ready to start (no tokens are
    fetched ahead or hoarded, so nothing is left over to spend in a burst). The bucket's grants are
    ``1/qps`` apart; a local capacity-1 gate at the same rate then makes sure that grants which
    reach this process together (its loop was stalled while they were delivered) still start
    ``1/qps`` apart here: the local side can delay a start, never add a burst.
    """

    def __init__(self, bucket: Any, *, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], Awaitable[Any]] | None = None):
        self.bucket = bucket
        self.remote = hasattr(bucket.acquire, "remote")
        self.clock, self.sleep = clock, sleep
        self.local: ProcessRateLimit | None = None

    async def acquire(self) -> float:
        """Wait for a cluster-wide slot; returns the local start time."""
        if self.local is None:
            rate = await self.bucket.get_rate.remote() if self.remote else self.bucket.get_rate()
            if self.local is None:  # another waiter may have set it meanwhile: keep one gate
                self.local = ProcessRateLimit(rate, clock=self.clock, sleep=self.sleep)
        await (self.bucket.acquire.remote() if self.remote else self.bucket.acquire())
        return await self.local.acquire()
