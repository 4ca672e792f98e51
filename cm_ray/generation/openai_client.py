"""Generation through any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM serve, ...).

Async (aiohttp) with a request-rate limit, bounded concurrency, retries with exponential backoff on
429/5xx and network errors (honouring ``Retry-After``) - all through ``cm_ray.http`` - and
per-request token and cost accounting. The API key is read from the environment variable the
config names, never stored on the engine, and scrubbed from error messages.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Callable

from cm_ray.generation.base import Generation, GenerationParams
from cm_ray.http import ProcessRateLimit, RequestFailed, RetryPolicy, json_body, send, with_retries


class OpenAIEngine:
    """Chat completions over HTTP; ``generate`` is sync, ``agenerate`` async (for Ray Data UDFs)."""

    name = "openai"

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 qps: float | None = None, max_in_flight: int = 8, max_retries: int = 4,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0, timeout_s: float = 60.0,
                 price_in_per_1m: float = 0.0, price_out_per_1m: float = 0.0,
                 session_factory: Callable[[], Any] | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.qps, self.max_in_flight, self.timeout_s = qps, max_in_flight, timeout_s
        self.retry = RetryPolicy(max_retries, backoff_base_s, backoff_max_s)
        self.price_in, self.price_out = price_in_per_1m, price_out_per_1m
        self.session_factory = session_factory
        self.usage = {"requests": 0, "retries": 0, "errors": 0, "prompt_tokens": 0, "output_tokens": 0,
                      "cost_usd": 0.0}
        self.limiter = ProcessRateLimit(qps)

    @classmethod
    def from_synthesis(cls, s: Any, model: str, replicas: int = 1) -> "OpenAIEngine":
        """Engine for the synthesis section ``s`` (``model``: ``models.generator``, used when
        ``s.openai.model`` is unset); the qps limit is shared evenly by ``replicas`` actors."""
        qps = s.openai.qps / max(1, replicas) if s.openai.qps else None
        return cls(s.openai.base_url or "https://api.openai.com/v1", s.openai.model or model,
                   api_key_env=s.openai.api_key_env, qps=qps, max_in_flight=s.openai.max_in_flight,
                   max_retries=s.openai.max_retries, backoff_base_s=s.openai.backoff_base_s,
                   backoff_max_s=s.openai.backoff_max_s, timeout_s=s.openai.timeout_s,
                   price_in_per_1m=s.openai.price_in_per_1m, price_out_per_1m=s.openai.price_out_per_1m)

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
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        factory = self.session_factory or (lambda: aiohttp.ClientSession(headers=headers))

        async def one(conv: list[dict]) -> Generation:
            async with sem:
                return await self._request(session, self.payload(conv, params), key)

        async with factory() as session:
            return list(await asyncio.gather(*(one(c) for c in conversations)))

    async def _request(self, session: Any, body: dict, key: str | None = None) -> Generation:
        t0 = time.perf_counter()
        attempts = 0

        async def attempt() -> dict:
            nonlocal attempts
            attempts += 1
            await self.limiter.acquire()
            self.usage["requests"] += 1
            resp = await send(session, "POST", self.url, json=body, timeout_s=self.timeout_s,
                              secrets=[key], detail_chars=300)
            return json_body(resp.body)

        try:
            data = await with_retries(attempt, self.retry)
        except RequestFailed as e:
            retries = attempts - 1
            self.usage["retries"] += retries
            self.usage["errors"] += 1
            return Generation(text="", finish_reason="error", retries=retries, error=e.reason,
                              latency_s=time.perf_counter() - t0)
        g = self._parse(data, attempts - 1)
        g.latency_s = time.perf_counter() - t0
        return g

    def _parse(self, data: dict, retries: int) -> Generation:
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        p_tok, o_tok = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        cost = (p_tok * self.price_in + o_tok * self.price_out) / 1e6
        for k, v in (("retries", retries), ("prompt_tokens", p_tok), ("output_tokens", o_tok), ("cost_usd", cost)):
            self.usage[k] += v
        return Generation(text=choice["message"].get("content") or "", prompt_tokens=p_tok,
                          output_tokens=o_tok, finish_reason=choice.get("finish_reason") or "stop",
                          retries=retries, cost_usd=cost)
