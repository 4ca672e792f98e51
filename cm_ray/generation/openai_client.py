"""Generation through any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM serve, ...).

Async (aiohttp) with a request-rate limit, bounded concurrency, retries with exponential backoff on
429/5xx and network errors (honouring ``Retry-After``) - all through ``cm_ray.http`` - and
per-request token and cost accounting. The API key is read from the environment variable the
config names (or from the driver's ``cm_ray.ray_utils.Secrets`` handed to the worker), never
stored on the engine, and scrubbed (with local paths) from every error text and from the text
(every spelling: raw, JSON-escaped, URL-encoded, base64). An answer body over
``synthesis.openai.max_response_bytes`` is refused while it streams: that row's error, not retried.

Every 200 answer is validated (``ChatAnswer``, pydantic): an answer that is not JSON or was cut
off is retried; one that parses but has no choice, a null message, no text content, or token
counts that are not non-negative integers is that row's error (``gen_error`` names the field),
never an exception that fails the batch.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from cm_ray.generation.base import Generation, GenerationParams
from cm_ray.http import (ProcessRateLimit, RequestFailed, RetryPolicy, SharedRateLimit, error_text, json_body,
                         scrub, send, with_retries)


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AnswerMessage(_Answer):
    content: StrictStr


class AnswerChoice(_Answer):
    message: AnswerMessage
    finish_reason: Optional[StrictStr] = None


class AnswerUsage(_Answer):
    prompt_tokens: StrictInt = Field(0, ge=0)
    completion_tokens: StrictInt = Field(0, ge=0)


class ChatAnswer(_Answer):
    """The part of a chat-completions answer we use; anything else in it is ignored."""

    choices: list[AnswerChoice] = Field(min_length=1)
    usage: Optional[AnswerUsage] = None


def validate_answer(data: Any) -> ChatAnswer:
    """``data`` as a ``ChatAnswer``, or a non-retryable ``RequestFailed`` naming the bad field."""
    try:
        return ChatAnswer.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "answer"
        raise RequestFailed(f"malformed answer: {where}: {err['msg']}") from None


class OpenAIEngine:
    """Chat completions over HTTP; ``generate`` is sync, ``agenerate`` async (for Ray Data UDFs)."""

    name = "openai"

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 qps: float | None = None, max_in_flight: int = 8, max_retries: int = 4,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0, timeout_s: float = 60.0,
                 max_response_bytes: int = 16_000_000, price_in_per_1m: float = 0.0, price_out_per_1m: float = 0.0,
                 session_factory: Callable[[], Any] | None = None, secrets: Any = None,
                 limiter: Any = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.qps, self.max_in_flight, self.timeout_s = qps, max_in_flight, timeout_s
        self.max_response_bytes = max_response_bytes
        self.retry = RetryPolicy(max_retries, backoff_base_s, backoff_max_s)
        self.price_in, self.price_out = price_in_per_1m, price_out_per_1m
        self.session_factory = session_factory
        self.secrets = secrets  # a ray_utils.Secrets (prints names only) or None: the environment
        self.usage = {"requests": 0, "retries": 0, "errors": 0, "prompt_tokens": 0, "output_tokens": 0,
                      "cost_usd": 0.0}
        self.limiter = limiter or ProcessRateLimit(qps)

    @classmethod
    def from_synthesis(cls, s: Any, model: str, replicas: int = 1, secrets: Any = None,
                       bucket: Any = None) -> "OpenAIEngine":
        """Engine for the synthesis section ``s`` (``model``: ``models.generator``, used when
        ``s.openai.model`` is unset). With ``bucket`` (the cluster-wide ``http.shared_bucket``)
        every replica takes its start slots from it; without, the qps limit is split evenly by
        ``replicas`` processes."""
        qps = s.openai.qps / max(1, replicas) if s.openai.qps and bucket is None else s.openai.qps
        return cls(s.openai.base_url or "https://api.openai.com/v1", s.openai.model or model,
                   api_key_env=s.openai.api_key_env, qps=qps, max_in_flight=s.openai.max_in_flight,
                   max_retries=s.openai.max_retries, backoff_base_s=s.openai.backoff_base_s,
                   backoff_max_s=s.openai.backoff_max_s, timeout_s=s.openai.timeout_s,
                   max_response_bytes=s.openai.max_response_bytes,
                   price_in_per_1m=s.openai.price_in_per_1m, price_out_per_1m=s.openai.price_out_per_1m,
                   secrets=secrets, limiter=SharedRateLimit(bucket) if bucket is not None else None)

    def _key(self) -> str | None:
        return self.secrets.get(self.api_key_env) if self.secrets is not None else os.environ.get(self.api_key_env)

    def secret_values(self) -> list[str]:
        """What every text this engine hands out is scrubbed of: its API key and every other
        secret handed to it (every key in play)."""
        extra = self.secrets.values() if hasattr(self.secrets, "values") else []
        return list(dict.fromkeys(k for k in [self._key(), *extra] if k))

    def payload(self, conversation: list[dict], params: GenerationParams) -> dict:
        body: dict[str, Any] = {"model": self.model, "messages": conversation,
                                "max_tokens": params.max_new_tokens, "temperature": params.temperature,
                                "top_p": params.top_p}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.json_schema is not None:
            # Not "strict": OpenAI's strict mode demands every property be required, task schemas
            # have optional ones (sources); vLLM-served endpoints enforce the schema either way.
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "sample", "schema": params.json_schema}}
        return body

    def generate(self, conversations: list[list[dict]], params: GenerationParams) -> list[Generation]:
        return asyncio.run(self.agenerate(conversations, params))

    async def agenerate(self, conversations: list[list[dict]], params: GenerationParams) -> list[Generation]:
        import aiohttp

        sem = asyncio.Semaphore(self.max_in_flight)
        headers = {"Content-Type": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        factory = self.session_factory or (lambda: aiohttp.ClientSession(headers=headers))

        keys = self.secret_values()

        async def one(conv: list[dict]) -> Generation:
            async with sem:
                return await self._request(session, self.payload(conv, params), keys)

        async with factory() as session:
            return list(await asyncio.gather(*(one(c) for c in conversations)))

    async def _request(self, session: Any, body: dict, keys: list[str] = ()) -> Generation:
        t0 = time.perf_counter()
        attempts = 0

        async def attempt() -> ChatAnswer:
            nonlocal attempts
            attempts += 1
            await self.limiter.acquire()
            self.usage["requests"] += 1
            resp = await send(session, "POST", self.url, json=body, timeout_s=self.timeout_s,
                              secrets=keys, detail_chars=300, max_bytes=self.max_response_bytes,
                              limit_name="synthesis.openai.max_response_bytes")
            return validate_answer(json_body(resp.body))

        try:
            answer = await with_retries(attempt, self.retry)
        except Exception as e:  # noqa: BLE001 - one row's failure, never the batch's
            reason = e.reason if isinstance(e, RequestFailed) else error_text(e, keys)
            retries = max(0, attempts - 1)
            self.usage["retries"] += retries
            self.usage["errors"] += 1
            return Generation(text="", finish_reason="error", retries=retries, error=scrub(reason, keys),
                              latency_s=time.perf_counter() - t0)
        g = self._parse(answer, attempts - 1, keys)
        g.latency_s = time.perf_counter() - t0
        return g

    def _parse(self, answer: ChatAnswer, retries: int, keys: list[str] = ()) -> Generation:
        choice, usage = answer.choices[0], answer.usage or AnswerUsage()
        p_tok, o_tok = usage.prompt_tokens, usage.completion_tokens
        cost = (p_tok * self.price_in + o_tok * self.price_out) / 1e6
        for k, v in (("retries", retries), ("prompt_tokens", p_tok), ("output_tokens", o_tok), ("cost_usd", cost)):
            self.usage[k] += v
        # An endpoint that echoes the request must not put a key into the stored text either.
        return Generation(text=scrub(choice.message.content, keys, paths=False), prompt_tokens=p_tok,
                          output_tokens=o_tok, finish_reason=scrub(choice.finish_reason or "stop", keys, paths=False),
                          retries=retries, cost_usd=cost)
