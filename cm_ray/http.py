"""HTTP calls with retries and rate limits: the one module web search and the OpenAI-compatible
engine send requests through.

- ``send`` makes one aiohttp attempt and turns every failure into ``RequestFailed`` (a reason
  that never holds a secret, ``retryable``, ``retry_after``): 408/409/425/429, 5xx, timeouts,
  broken connections and cut bodies are retryable, other 4xx are not; a body over its byte limit
  (``read_body``: checked while streaming) is not. ``json_body`` parses an answer (a broken body
  is retryable: often a proxy's error page or a cut connection).
- ``scrub`` / ``scrub_strings``: secrets (raw, JSON-escaped, URL-encoded, base64) out of text.
- ``with_retries`` runs an attempt under tenacity: exponential backoff with jitter (50-100% of
  ``backoff_base_s * 2**retry``, capped at ``backoff_max_s``); a ``Retry-After`` wins (capped too).
- ``TokenBucket`` (GCRA: a fixed ``1/qps`` schedule, bounded catch-up) as a named Ray actor
  (``shared_bucket``) is the one limit a whole cluster shares; ``SharedRateLimit`` is one
  process's side of it (a slot per request, asked for when ready, never hoarded) and
  ``ProcessRateLimit`` the same limit within one process.

Importing this module is cheap: aiohttp, tenacity and ray load on first use.
"""

from __future__ import annotations

import asyncio
import base64
import functools
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


def _base64_cores(raw: bytes) -> set[str]:
    """The base64 (standard and URL-safe) characters that encode only ``raw``'s bytes, for each of
    the 3 offsets ``raw`` can have in a longer encoded text (``Basic base64(user:key)``, a
    base64-wrapped echo): whatever surrounds it, one of these occurs where ``raw`` was encoded."""
    cores = set()
    for encode, off in ((e, o) for e in (base64.b64encode, base64.urlsafe_b64encode) for o in range(3)):
        text = encode(b"\0" * off + raw + b"\0\0").decode()
        own = [j for j in range(len(text)) if 6 * j // 8 >= off and (6 * j + 5) // 8 < off + len(raw)]
        cores |= {text[own[0]:own[-1] + 1]} if len(own) >= 8 else set()  # shorter: ordinary text
    return cores


@functools.lru_cache(maxsize=256)
def _spellings(secret: str) -> frozenset[str]:
    """``secret`` as it may come back in an echoed request: raw, JSON-escaped, URL-encoded, base64."""
    import json
    from urllib.parse import quote, quote_plus

    return frozenset({secret, json.dumps(secret)[1:-1], quote(secret, safe=""), quote_plus(secret),
                      *_base64_cores(secret.encode("utf-8", "surrogatepass"))})


def scrub(text: Any, secrets: Iterable[str | None] = (), paths: bool = True) -> str:
    """``text`` (any object: exceptions and reprs too) safe to store or log: every non-empty
    secret (raw, JSON-escaped, URL-encoded or base64) becomes ``***`` and, with ``paths``, every local
    path and store URI (``/home/...``, ``/tmp/...``, ``s3://...``) becomes ``<path>``.
    The one scrub every error text goes through before it reaches a row, a log or a message."""
    text = text if isinstance(text, str) else str(text)
    for s in sorted({v for s in secrets if s for v in _spellings(s)}, key=len, reverse=True):
        text = text.replace(s, "***")
    return _PATHS.sub("<path>", text) if paths else text


def scrub_strings(rows: list[dict], secrets: Iterable[str | None]) -> list[dict]:
    """``rows`` (parsed provider answers, e.g. search hits) with every string value scrubbed of
    ``secrets`` in every spelling (paths kept: they are data here)."""
    secrets = [x for x in secrets if x]
    return [{k: scrub(v, secrets, paths=False) if isinstance(v, str) else v for k, v in r.items()}
            for r in rows] if secrets else rows


def error_text(exc: BaseException, secrets: Iterable[str | None] = ()) -> str:
    """``TypeName: message`` of an exception, scrubbed (for per-row error columns)."""
    msg = scrub(exc, secrets)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    try:
        return max(0.0, float(value)) if value else None
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


DEFAULT_MAX_BYTES = 16 * 2**20  # send's body limit when its caller names none


async def read_body(resp: Any, max_bytes: int, *, cut: bool = False,
                    limit_name: str = "max_response_bytes") -> bytes:
    """``resp``'s (aiohttp) body read in chunks, never held beyond ``max_bytes`` (+ one chunk): over
    it (or a Content-Length over it), a non-retryable ``RequestFailed`` names ``limit_name``, or
    with ``cut`` the first ``max_bytes`` are returned (a page: keep what fits)."""
    too_large = f"response body over the {max_bytes}-byte limit ({limit_name})"
    if not cut and (resp.content_length or 0) > max_bytes:
        raise RequestFailed(f"{too_large}: {resp.content_length} bytes declared")
    body = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        body += chunk
        if cut and len(body) >= max_bytes:
            return bytes(body[:max_bytes])
        if len(body) > max_bytes:
            raise RequestFailed(f"{too_large}: more than {max_bytes} bytes sent")
    return bytes(body)


async def send(session: Any, method: str, url: str, *, timeout_s: float,
               secrets: Iterable[str | None] = (), detail_chars: int = 160,
               max_bytes: int = DEFAULT_MAX_BYTES, limit_name: str = "max_response_bytes",
               **kwargs: Any) -> Response:
    """One request with ``session`` (aiohttp); returns the answer of a status below 400 (body of
    at most ``max_bytes``, ``limit_name`` its config field), raises ``RequestFailed`` otherwise. A
    refused request's reason quotes the first ``detail_chars`` of the body with ``secrets`` and
    paths scrubbed (an error page may echo the request)."""
    import aiohttp

    try:
        async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout_s),
                                   **kwargs) as resp:
            status, headers = resp.status, resp.headers
            if status < 400:
                body = await read_body(resp, max_bytes, limit_name=limit_name)
            else:
                body = await read_body(resp, min(max_bytes, 4 * detail_chars + 8192), cut=True)
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
        text = scrub(body.decode("utf-8", "replace"), secrets)
        raise RequestFailed(f"HTTP {status}: {text[:detail_chars]}")
    return Response(status, headers, body)


def json_body(body: bytes) -> Any:
    """The JSON of an answer; a broken body is a retryable failure."""
    import json

    try:
        return json.loads(body)
    except ValueError as e:
        raise RequestFailed(f"invalid JSON ({len(body)} bytes): {e}", retryable=True) from None


# Retries ------------------------------------------------------------------------------------

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


# Rate limits --------------------------------------------------------------------------------

class TokenBucket:
    """Start slots on a fixed ``1/rate`` schedule with bounded catch-up (GCRA), first come first
    served; as a named Ray actor (``shared_bucket``) the one limit a whole cluster shares.

    A caller's slot is ``1/rate`` after the previous *slot*; it is granted when the clock reaches
    it. A grant made late (a sleep that overshot, a busy loop, a caller that came late) keeps its
    slot while at most ``tolerance/rate`` late, so the schedule does not drift and no throughput is
    given away; beyond that the schedule moves to ``now - tolerance/rate`` (the rest is lost, never
    spent in a burst: idle time earns at most that tolerance). Whatever the lateness, two starts
    are at least ``(1 - tolerance)/rate`` apart and ``n + 1`` starts span ``(n - tolerance)/rate``
    or more: a provider's own bucket at ``rate`` with room for 2 never refuses one. ``tolerance=0``
    is a strict capacity-1 bucket. ``clock``/``sleep`` are injectable (tests: a fake clock)."""

    def __init__(self, rate: float, *, tolerance: float = 0.5, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], Awaitable[Any]] | None = None):
        if not 0 <= tolerance <= 1:
            raise ValueError(f"tolerance must be within [0, 1] slots, got {tolerance!r}")
        self.clock, self.sleep, self.tolerance = clock or time.monotonic, sleep or asyncio.sleep, tolerance
        self.slot = float("-inf")  # the scheduled time of the latest grant
        self._lock = self._loop = None
        self.configure(rate)

    def configure(self, rate: float) -> None:
        """Change the rate; the spacing after the latest slot follows the new rate at once."""
        if not rate or rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        self.rate = float(rate)

    def get_rate(self) -> float:
        return self.rate

    async def acquire(self) -> float:
        """Wait for the next start slot and return the grant time on the bucket's clock (one slot
        per call: slots are never handed out ahead, so none can pile up and be spent together)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # asyncio.Lock binds to one loop (asyncio.run per call)
            self._lock, self._loop = asyncio.Lock(), loop
        async with self._lock:  # FIFO across callers
            while True:
                now = self.clock()
                slot = self.slot + 1.0 / self.rate
                if now >= slot:
                    self.slot = max(slot, now - self.tolerance / self.rate)
                    return now
                await self.sleep(slot - now + 1e-6)  # past the slot, so rounding can't wake us short


class ProcessRateLimit:
    """Request starts ``1/qps`` apart within this process (a ``TokenBucket``, its bounds; no limit
    for ``qps=None``). ``acquire`` returns the grant time (``None`` when unlimited). Not
    aiolimiter: it reads the event loop's clock, which a test cannot drive."""

    def __init__(self, qps: float | None, *, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], Awaitable[Any]] | None = None):
        self.qps, self.bucket = qps, (TokenBucket(qps, clock=clock, sleep=sleep) if qps else None)

    async def acquire(self) -> float | None:
        return None if self.bucket is None else await self.bucket.acquire()


def shared_bucket(name: str, qps: float):
    """The cluster-wide ``TokenBucket`` actor called ``name`` (created once, reconfigured to
    ``qps``; its schedule is ``1/qps`` a slot whatever the number of callers)."""
    import ray

    actor = ray.remote(TokenBucket).options(
        name=name, namespace="cm_ray", get_if_exists=True,
        num_cpus=0, max_concurrency=1000).remote(qps)
    ray.get(actor.configure.remote(qps))
    return actor


class SharedRateLimit:
    """One process's side of a shared ``TokenBucket`` (its actor handle, or the bucket itself).

    Each waiting request asks the bucket for its own slot when it is ready to start (nothing is
    fetched ahead, so nothing is left over to spend in a burst); a local ``TokenBucket`` at the
    same rate makes grants that reach this process together (its loop was stalled while they were
    delivered) start within the same bounds here: it can delay a start, never add a burst."""

    def __init__(self, bucket: Any, *, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], Awaitable[Any]] | None = None):
        self.bucket, self.remote = bucket, hasattr(bucket.acquire, "remote")
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
