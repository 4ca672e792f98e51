"""Request limits of the ingress: JSON bodies only, body size and read time while reading, Serve's
back-pressure and deadlines as 503 + ``Retry-After`` (from the backlog's drain estimate), errors
relayed from the adapter servers and OpenAI-shaped 404/405/400 from FastAPI itself, the
tokenizer that counts prompts.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time

from fastapi import Request

from cm_ray.serve.api import ApiError


def check_content_type(request: Request) -> None:
    """A body declared as anything but JSON (``application/json``, ``*/*+json``) is a 400."""
    declared = request.headers.get("content-type")
    if declared is None:
        return
    kind = declared.split(";", 1)[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        raise ApiError(400, f"Content-Type: {declared[:64]!r} is not JSON; send application/json",
                       "Content-Type")


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body, refused with a 413 past ``limit`` bytes: from Content-Length before
    reading anything, and while reading (chunked bodies, a lying Content-Length); a client that
    sends nothing for ``timeout_s`` between two pieces gets a 408."""
    too_big = ApiError(413, f"request body is larger than {limit} bytes (serve.max_body_bytes)")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, f"Content-Length: {declared[:32]!r} is not a byte count")
        if int(declared) > limit:
            raise too_big
    chunks, n = [], 0
    pieces = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(pieces.__anext__(), timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise ApiError(408, f"request body: nothing received for {timeout_s:g} s "
                                "(serve.body_read_timeout_s)") from None
        n += len(chunk)
        if n > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class DrainEstimate:
    """How long the ingress's backlog takes to drain: requests in flight over the rate answers
    left recently (``window`` of the latest completions). ``retry_after_s()`` is that estimate,
    at least ``serve.retry_after_s``. ``clock`` is injectable (tests)."""

    def __init__(self, s, clock=time.monotonic, window: int = 32):
        self.floor, self.clock, self.window = s.retry_after_s, clock, window
        self.inflight, self.done = 0, []
        self._lock = threading.Lock()

    def started(self) -> None:
        with self._lock:
            self.inflight += 1

    def finished(self) -> None:
        with self._lock:
            self.inflight -= 1
            self.done = [*self.done[-(self.window - 1):], self.clock()]

    def retry_after_s(self) -> float:
        with self._lock:
            span = self.clock() - self.done[0] if len(self.done) >= 2 else 0.0
            rate = (len(self.done) - 1) / span if span > 0 else None
            return max(self.floor, self.inflight / rate if rate else self.floor)


def framing_problem(scope: dict) -> ApiError | None:
    """A 400 for a request whose framing is malformed even though the proxy passed it on: a
    raw path with ``.`` / ``..`` segments or a header with bytes that are not ASCII."""
    raw = scope.get("raw_path") or scope.get("path", "").encode()
    if any(seg in (b".", b"..") for seg in raw.split(b"?", 1)[0].split(b"/")):
        return ApiError(400, "request path: '.' and '..' segments are not allowed")
    for name, value in scope.get("headers") or ():
        if not (name.isascii() and value.isascii()):
            shown = "-".join(w.capitalize() for w in name.decode("latin-1")[:64].split("-"))
            return ApiError(400, f"header {shown!r}: only ASCII bytes are allowed", shown)
    return None


def install_error_handlers(app) -> None:
    """ApiError, and FastAPI's own 404 / 405 / request validation, as OpenAI's error object;
    malformed framing (``framing_problem``) as a 400 before any route runs."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.middleware("http")
    async def _framing(request: Request, call_next):
        if err := framing_problem(request.scope):
            return JSONResponse(err.body(), status_code=400)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        what = {404: f"no route {request.url.path[:200]!r}",
                405: f"method {request.method} is not allowed on {request.url.path[:200]!r}"}
        err = ApiError(e.status_code, what.get(e.status_code, str(e.detail)), None,
                       "not_found_error" if e.status_code == 404 else "invalid_request_error",
                       dict(e.headers or {}) or None)
        return JSONResponse(err.body(), status_code=e.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = (e.errors() or [{}])[0]
        where = ".".join(str(p)[:64] for p in first.get("loc", ())) or None
        return JSONResponse(ApiError(400, f"{where}: {first.get('msg', 'invalid')}", where).body(),
                            status_code=400)


def overload_error(e: Exception, retry_after_s: float) -> ApiError | None:
    """ApiError 503/429 + Retry-After for Serve's back-pressure / unavailable errors, else None."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    retry = {"Retry-After": str(max(0, math.ceil(retry_after_s)))}
    if isinstance(e, BackPressureError):
        return ApiError(e.status_code, "the adapter servers are at capacity (serve.max_ongoing_"
                        "requests + serve.max_queued_requests); retry later", None,
                        "overloaded_error", retry)
    if isinstance(e, DeploymentUnavailableError):
        return ApiError(503, "the adapter servers are not available; retry later", None,
                        "overloaded_error", retry)
    return None


def timeout_error(s, retry_after_s: float | None = None) -> ApiError:
    retry = s.retry_after_s if retry_after_s is None else retry_after_s
    return ApiError(503, f"request did not finish within {s.generation_timeout_s:g} s "
                         "(serve.generation_timeout_s); retry later", None, "timeout_error",
                    {"Retry-After": str(max(0, math.ceil(retry)))})


def replica_error(body: dict) -> dict:
    """ApiError's arguments from an adapter server's ``ApiError.relay()``."""
    err = body["error"]
    return {"status": body.get("status", 500), "message": err["message"], "param": err["param"],
            "type_": err["type"], "code": err.get("code")}


def load_tokenizer(base: str, cache_dir):
    """The base model's tokenizer (with its chat template), to count prompt tokens as the
    adapter servers will."""
    from transformers import AutoTokenizer

    from cm_ray.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(base, cache_dir))
