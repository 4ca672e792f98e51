"""Request limits of the ingress: body size while reading, Serve's back-pressure and deadlines as
503 + ``Retry-After``, errors relayed from the adapter servers, the tokenizer that counts prompts.
"""

from __future__ import annotations

import math

from fastapi import Request

from cm_ray.serve.api import ApiError


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 past ``limit`` bytes: from Content-Length before
    reading anything, and while reading (chunked bodies, a lying Content-Length)."""
    too_big = ApiError(413, f"request body is larger than {limit} bytes (serve.max_body_bytes)")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, f"Content-Length: {declared[:32]!r} is not a byte count")
        if int(declared) > limit:
            raise too_big
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


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


def timeout_error(s) -> ApiError:
    return ApiError(503, f"request did not finish within {s.generation_timeout_s:g} s "
                         "(serve.generation_timeout_s); retry later", None, "timeout_error",
                    {"Retry-After": str(max(0, math.ceil(s.retry_after_s)))})


def replica_error(body: dict) -> dict:
    err = body["error"]
    return {"status": err["code"], "message": err["message"], "param": err["param"],
            "type_": err["type"]}


def load_tokenizer(base: str, cache_dir):
    """The base model's tokenizer (with its chat template), to count prompt tokens as the
    adapter servers will."""
    from transformers import AutoTokenizer

    from cm_ray.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(base, cache_dir))
