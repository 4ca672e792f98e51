"""The HTTP ingress of the Serve app: an OpenAI-shaped FastAPI deployment that routes each request
to a culture and forwards it to the adapter servers (``cm_ray.serve.adapters``).

    CultureIngress (FastAPI, router)  --multiplexed_model_id=<culture>-->  AdapterServer (LoRA)

    CultureIngress  --multiplexed_model_id=<culture>@<version>-->  VLLMServer (serve.engine: vllm)

Endpoints: POST /v1/chat/completions and /v1/completions (``stream: true`` = SSE, with a usage
chunk for ``stream_options.include_usage``; ``n`` choices per prompt, several prompts), GET
/v1/models and /v1/models/{id} (auto, base, every usable adapter on the store; the store is read
at most once per ``serve.adapter_cache_ttl_s``), /healthz, /metrics (Prometheus, per culture),
/docs and /openapi.json. With an API key every route but ``serve.public_paths`` (/healthz) needs
it. Every error, 404 and 405 included, is OpenAI's ``{"error": {...}}``; bodies must be JSON
(``Content-Type: application/json``). ``response_format`` json_object / json_schema is guided decoding on
both engines; fields the server does not implement (tools, logprobs, ...) are a 400 naming them.
``model="auto"`` asks the router (unless an ``X-Culture`` header or ``culture`` field names the
culture); ``model="<culture>"`` pins an adapter; ``model="base"`` uses no adapter. Responses carry
``culture``, ``router_confidence`` and ``routed_by`` fields and ``X-Culture`` / ``X-Router-*``
headers, and name the engine that generated them (``system_fingerprint``, ``X-CM-Ray-Engine``;
see ``cm_ray.serve.responses``).

Limits (serve section): body bytes (413), messages and prompt tokens of the rendered chat (400),
max_new_tokens (422); a full adapter-server queue or a request past ``generation_timeout_s`` is a
503 with ``Retry-After``. Every error is JSON and names no path, URI or artifact root.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve

from cm_ray import artifacts
from cm_ray.artifacts import AUTO, BASE, NONE
from cm_ray.serve.api import (ApiError, ChatRequest, CompletionRequest, check_adapter_id,
                              check_prompt_tokens, decode_json, parse_request, scrub)
from cm_ray.serve.catalog import AdapterCatalog
from cm_ray.serve.limits import (DrainEstimate, check_content_type, install_error_handlers, load_tokenizer, overload_error,
                                 read_body, replica_error, timeout_error)
from cm_ray.serve.responses import completion_body, model_entry, route_headers
from cm_ray.serve.stream import IngressMetrics, sse_events

log = logging.getLogger("cm_ray.serve")

fastapi_app = FastAPI(title="cm_ray", description="Culture-routed LoRA adapters, OpenAI-shaped",
                      docs_url=None, redoc_url=None, openapi_url=None)  # served below, with auth


install_error_handlers(fastapi_app)


def pick_culture(req, header: str | None, has_adapter: Callable[[str], bool],
                 predict: Callable[[str, dict | None], tuple[str, float]] | None,
                 usable: Callable[[str], bool] | None = None) -> dict:
    """Decide which adapter answers. Pure: the adapter check and the router are injected.

    Order: pinned model (``base`` or a culture) > ``X-Culture`` header > ``culture`` field >
    router (which itself honours a declared metadata country). A routed culture without an
    adapter falls back to the base model (``none``).

    Returns:
        {"culture": key or "none", "router_confidence": float, "routed_by": str}
    """
    from cm_ray.cultures import normalize_culture

    def explicit(value: str, param: str) -> str:
        key = check_adapter_id(value, param)
        try:
            key = normalize_culture(key) if not key.startswith("_") else key
        except KeyError:
            raise ApiError(404, f"{param}: unknown culture {value!r}", param, "not_found_error",
                           code="model_not_found")
        if not has_adapter(key):
            raise ApiError(404, f"{param}: no adapter for culture {key!r}", param, "not_found_error",
                           code="model_not_found")
        return key

    if req.model == BASE:
        return {"culture": NONE, "router_confidence": 1.0, "routed_by": "pinned"}
    if req.model != AUTO:
        return {"culture": explicit(req.model, "model"), "router_confidence": 1.0,
                "routed_by": "pinned"}
    for value, param, by in ((header, "X-Culture", "header"), (req.culture, "culture", "field")):
        if value:
            return {"culture": explicit(value, param), "router_confidence": 1.0, "routed_by": by}
    if predict is None:
        return {"culture": NONE, "router_confidence": 0.0, "routed_by": "no_router"}
    culture, conf, *why = predict(req.router_text(), req.metadata)  # (+ the deciding evidence)
    extra = {"router_evidence": why[0]} if why else {}
    if culture != NONE and not (usable or has_adapter)(culture):  # a broken one: the base model
        return {"culture": NONE, "router_confidence": conf, "routed_by": "router_no_adapter", **extra}
    return {"culture": culture, "router_confidence": conf, "routed_by": "router", **extra}


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(fastapi_app)
class CultureIngress:
    """HTTP ingress: validates, routes to a culture, forwards to the adapter servers."""

    def __init__(self, serve_cfg, router_cfg, models, root: str, adapters,
                 api_key_sha256: str | None = None):
        """``serve_cfg``/``router_cfg``: the serve and router sections; ``models``: the model refs
        (named by /v1/models); ``root``: the artifact root holding ``router/`` and ``adapters/``."""
        from cm_ray.router.model import load_router
        from cm_ray.storage import ArtifactStore

        self.serve_cfg = serve_cfg
        self.base_model = models.base or models.generator
        self.store = ArtifactStore(root)
        self.adapters = adapters
        self.key_sha256 = api_key_sha256
        self.metrics = IngressMetrics()
        self.tokenizer = load_tokenizer(self.base_model, models.cache_dir)
        self.root = root
        self.router = None
        has_router = artifacts.published_router(self.store) is not None
        if router_cfg.kind == "embedding" and has_router:
            self.router = load_router(self.store, threshold=router_cfg.threshold)
            self.router.use_metadata = router_cfg.use_metadata
            self.router.warm()  # load the language ID and the encoder now, not on a request
        self.catalog = AdapterCatalog(self.store, serve_cfg.adapter_cache_ttl_s)
        self.catalog.ids()
        self.created = int(time.time())
        self.drain = DrainEstimate(serve_cfg)  # Retry-After from the backlog and the answer rate

    # -- helpers ---------------------------------------------------------------------------
    def _has_adapter(self, key: str) -> bool:
        return self.catalog.has(key)

    def _predict(self, text: str, metadata: dict | None) -> tuple[str, float, str]:
        t0 = time.perf_counter()
        out = self.router.route([text], [metadata] if metadata else None)[0]
        self.metrics.router.observe(time.perf_counter() - t0)
        return out["culture"], out["probability"], out["evidence"]

    def _auth(self, request: Request) -> None:
        prefix = request.scope.get("root_path", "").rstrip("/")
        if not self.key_sha256 or request.url.path.removeprefix(prefix) in self.serve_cfg.public_paths:
            return
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), self.key_sha256):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", None,
                           "authentication_error", code="invalid_api_key")

    # -- endpoints -------------------------------------------------------------------------
    @fastapi_app.get("/healthz")
    async def healthz(self, request: Request) -> dict:
        self._auth(request)
        return {"status": "ok", "router": self.router is not None, "engine": self.serve_cfg.engine,
                "adapters": len(await asyncio.to_thread(self.catalog.ids))}

    @fastapi_app.get("/openapi.json")
    async def openapi(self, request: Request) -> dict:
        self._auth(request)
        return fastapi_app.openapi()

    @fastapi_app.get("/docs")
    async def docs(self, request: Request) -> HTMLResponse:
        from fastapi.openapi.docs import get_swagger_ui_html

        self._auth(request)
        return get_swagger_ui_html(openapi_url=f"{request.scope.get('root_path', '')}/openapi.json",
                                   title="cm_ray")

    @fastapi_app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self._auth(request)
        try:  # the adapters held by the replica that answers (a scrape never fails for it)
            got = await asyncio.wait_for(self.adapters.loaded_adapters.remote(), 5)
            self.metrics.set_loaded([a.partition("@")[0] for a in got])
        except Exception as e:
            log.warning("loaded adapters unknown: %s", scrub(repr(e), self.root))
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _model_list(self) -> list[dict]:
        from cm_ray.cultures import registry

        known = await asyncio.to_thread(self.catalog.ids)
        data = [model_entry(AUTO, self.created, root="router"),
                model_entry(BASE, self.created, root=self.base_model)]
        for key in known:
            name = registry()[key].name if key in registry() else "all cultures"
            data.append(model_entry(key, self.created, root=self.base_model, parent=BASE,
                                    culture_name=name))
        return data

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._auth(request)
        return {"object": "list", "data": await self._model_list()}

    @fastapi_app.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request) -> dict:
        """One model entry (the official client's ``models.retrieve``); 404 for any other id."""
        self._auth(request)
        for m in await self._model_list():
            if m["id"] == model_id or (len(model_id) == 2 and m["id"] == model_id.upper()):
                return m
        raise ApiError(404, f"model: no model {model_id[:64]!r} (see /v1/models)", "model",
                       "not_found_error", code="model_not_found")

    @fastapi_app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._complete(request, ChatRequest, "chat")

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._complete(request, CompletionRequest, "completions")

    async def _complete(self, request: Request, cls, endpoint: str) -> Response:
        t0 = time.perf_counter()
        culture, status = "-", 500
        try:
            self._auth(request)
            s = self.serve_cfg
            check_content_type(request)
            req = parse_request(cls, decode_json(await read_body(request, s.max_body_bytes, s.body_read_timeout_s)), s)
            await asyncio.to_thread(check_prompt_tokens, req, self.tokenizer, s.max_prompt_tokens)
            route = await asyncio.to_thread(
                pick_culture, req, request.headers.get("x-culture"), self._has_adapter,
                self._predict if self.router else None, lambda k: k in self.catalog.ids())
            culture = route["culture"]
            model_id = "" if culture == NONE else await asyncio.to_thread(self.catalog.model_id, culture)
            handle = self.adapters.options(multiplexed_model_id=model_id)
            payloads = [{"payload": p, "max_new_tokens": req.new_tokens(),
                         "temperature": req.temperature, "top_p": req.top_p, "stop": req.stop,
                         "json_schema": req.json_schema(s.guided_max_string_chars)}
                        for p in req.payloads() for _ in range(req.n)]  # choice i*n + j
            chat = cls is ChatRequest
            deadline = time.monotonic() + s.generation_timeout_s
            self.drain.started()
            try:
                if req.stream:
                    resp = await self._stream(handle, payloads, chat, req, route, deadline, model_id, t0)
                else:
                    results = await asyncio.gather(*[self._call(handle.generate.remote(p), deadline)
                                                     for p in payloads])
                    for result in results:
                        if "error" in result:
                            raise self._refused(result["error"], model_id)
                        self.metrics.answered(culture, result)
                    resp = JSONResponse(completion_body(chat, req.model, results, route, req.n),
                                        headers=route_headers(route, results[0]))
            finally:
                self.drain.finished()
            status = resp.status_code
            return resp
        except ApiError as e:
            status = e.status
            body = e.body()
            body["error"]["message"] = scrub(e.message, self.root)
            return JSONResponse(body, status_code=e.status, headers=e.headers)
        except Exception as e:  # a bug or a dead replica: JSON, no details (they may name paths)
            log.exception("request failed: %s", scrub(repr(e), self.root))
            return JSONResponse(ApiError(500, "internal error", None, "server_error").body(),
                                status_code=500)
        finally:
            self.metrics.requests.labels(endpoint, culture, str(status)).inc()
            self.metrics.latency.labels(culture).observe(time.perf_counter() - t0)

    async def _call(self, awaitable, deadline: float, cancel=None):
        """Await a handle call until ``deadline``; overload / timeout become 503 + Retry-After."""
        s = self.serve_cfg
        try:
            return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            if cancel is not None:
                cancel()
            elif hasattr(awaitable, "cancel"):
                awaitable.cancel()
            raise timeout_error(s, self.drain.retry_after_s()) from None
        except Exception as e:
            err = overload_error(e, self.drain.retry_after_s())
            if err is None:
                raise
            raise err from None

    def _refused(self, error: dict, model_id: str) -> ApiError:
        """The adapter servers' error as an ApiError; a refused adapter version is no longer
        advertised (until another version is published)."""
        if error["error"].get("type") == "invalid_adapter_error" and model_id:
            self.catalog.refuse(model_id)
        return ApiError(**replica_error(error))

    async def _stream(self, handle, payloads: list[dict], chat: bool, req, route: dict,
                      deadline: float, model_id: str, t0: float) -> Response:
        """One stream per choice (``n`` per prompt), merged into one SSE response."""
        gens = [handle.options(stream=True).generate_stream.remote(p) for p in payloads]
        try:
            firsts = await asyncio.gather(*[self._call(g.__anext__(), deadline, cancel=g.cancel) for g in gens])
            for first in firsts:
                if "error" in first:  # fails before any token: a plain JSON error, not a broken stream
                    raise self._refused(first["error"], model_id)
        except BaseException:
            for g in gens:
                g.cancel()
            raise
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        culture = route["culture"]
        events = sse_events(gens, firsts, chat, cid, req.model, route, deadline, self.serve_cfg,
                            req.include_usage(), lambda r, ttft: self.metrics.answered(culture, r, ttft), t0,
                            n=req.n)
        return StreamingResponse(events, media_type="text/event-stream", headers=route_headers(route, firsts[0]))
