"""What the ingress sends besides plain JSON answers: the SSE stream of a ``stream: true``
request and the Prometheus metrics of ``/metrics`` (per culture adapter).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from cm_ray.serve.api import ApiError, scrub
from cm_ray.serve.limits import timeout_error
from cm_ray.serve.responses import chunk_body, engine_of, usage_body

log = logging.getLogger("cm_ray.serve")


class IngressMetrics:
    """Prometheus metrics of one ingress replica, in a registry of its own. Per culture (the
    adapter; ``none`` = base model): requests, latency, adapter loads and load time, prompt and
    output tokens, time to first token; answers per engine (``cm_ray_answers_total{engine}``); and
    the adapters the adapter servers hold."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        secs = (.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
        self.requests = Counter("cm_ray_requests", "Requests by endpoint, culture and status",
                                ["endpoint", "culture", "status"], registry=r)
        self.latency = Histogram("cm_ray_request_latency_seconds", "End-to-end latency",
                                 ["culture"], registry=r, buckets=secs)
        self.router = Histogram("cm_ray_router_latency_seconds", "Router decision latency",
                                registry=r, buckets=(.001, .0025, .005, .01, .02, .05, .1, .25, 1))
        self.loads = Counter("cm_ray_adapter_loads", "Adapter (re)loads seen by requests",
                             ["culture"], registry=r)
        self.load_time = Histogram("cm_ray_adapter_load_seconds", "Adapter load time",
                                   ["culture"], registry=r, buckets=secs)
        self.prompt_tokens = Counter("cm_ray_prompt_tokens", "Prompt tokens", ["culture"], registry=r)
        self.output_tokens = Counter("cm_ray_output_tokens", "Output tokens", ["culture"], registry=r)
        self.ttft = Histogram("cm_ray_time_to_first_token_seconds", "Time to first token",
                              ["culture"], registry=r, buckets=secs)
        self.engines = Counter("cm_ray_answers", "Answers by the engine that generated them",
                               ["engine"], registry=r)
        self.loaded = Gauge("cm_ray_adapters_loaded", "Adapters loaded on the adapter-server "
                            "replica that answered the scrape", ["culture"], registry=r)

    def answered(self, culture: str, result: dict, ttft_s: float | None = None) -> None:
        """Count one finished generation (``result``: the adapter server's summary)."""
        self.engines.labels(engine_of(result.get("system_fingerprint")) or "unknown").inc()
        if result.get("adapter_cold"):
            self.loads.labels(culture).inc()
            self.load_time.labels(culture).observe(result.get("adapter_load_ms", 0.0) / 1000)
        self.prompt_tokens.labels(culture).inc(result.get("prompt_tokens", 0))
        self.output_tokens.labels(culture).inc(result.get("completion_tokens", 0))
        if ttft_s is None and result.get("ttft_ms"):
            ttft_s = result["ttft_ms"] / 1000
        if ttft_s is not None:
            self.ttft.labels(culture).observe(ttft_s)

    def set_loaded(self, cultures: list[str]) -> None:
        self.loaded.clear()
        for c in cultures:
            self.loaded.labels(c).inc()


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def sse_events(gens: list, firsts: list[dict], chat: bool, cid: str, model: str, route: dict,
                     deadline: float, s, include_usage: bool = False, on_done=None,
                     t0: float | None = None, n: int = 1):
    """OpenAI-style SSE for one or more choices (``gens``: one adapter-server stream per choice,
    ``firsts`` their first items): one chunk per text delta with its choice's ``index``, a chunk
    with each choice's finish_reason, a usage chunk for all of them when ``include_usage`` (``n``
    choices per prompt share its prompt tokens), then [DONE]. Choices interleave as their tokens
    come. Past ``deadline`` (loop time) the stream ends with a timeout error event; an error in
    one choice ends the stream with that error. ``on_done(summary, ttft_s)`` is called with each
    choice's final summary (``t0``: perf_counter when the request arrived, for the time to first
    token)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for item in _items(gens[i], firsts[i], deadline, s):
                await queue.put((i, item))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(gens))]
    try:
        async for event in _events(queue, len(gens), firsts, chat, cid, model, route, include_usage,
                                   on_done, t0, n):
            yield event
    finally:  # the client went away (or the stream ended): the generations stop either way
        for t in tasks:
            t.cancel()
        for g in gens:
            g.cancel()


async def _items(gen, first: dict, deadline: float, s):
    """One generation's items: deltas, then its summary or an ``error`` item (a timeout, or a
    replica that died mid-stream, as the error body the client gets)."""
    item = first
    while True:
        yield item
        if "delta" not in item:
            return
        try:
            item = await asyncio.wait_for(gen.__anext__(), deadline - time.monotonic())
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            gen.cancel()
            yield {"error": timeout_error(s).body()}
            return
        except Exception as e:  # the replica died mid-stream: say so, without details
            log.warning("stream failed: %s", scrub(repr(e)))
            yield {"error": ApiError(503, "generation failed; retry later", None, "server_error").body()}
            return


async def _events(queue, open_: int, firsts, chat, cid, model, route, include_usage, on_done, t0, n):
    ttft, done = None, [None] * open_
    fp = firsts[0].get("system_fingerprint")  # the engine that answers, on every chunk
    t0 = time.perf_counter() if t0 is None else t0
    while open_:
        i, item = await queue.get()
        if item is None:
            open_ -= 1
            continue
        fp = item.get("system_fingerprint", fp)
        if "delta" in item:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            yield sse(chunk_body(chat, cid, model, item["delta"], None, route, fp, index=i))
        elif "error" in item:
            err = item["error"]["error"]
            yield sse({"error": {**err, "message": scrub(str(err.get("message")))}})
            break
        else:
            done[i] = item
            yield sse(chunk_body(chat, cid, model, None, item.get("finish_reason"), route, fp, index=i))
            if on_done:
                on_done(item, ttft)
    else:
        if include_usage and all(done):
            yield sse({**chunk_body(chat, cid, model, None, None, route, fp), "choices": [],
                       "usage": usage_body(done, n)})
    yield "data: [DONE]\n\n"
