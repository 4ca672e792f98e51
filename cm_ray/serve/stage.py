"""Stage ``serve``: deploy the Serve app, send one routed demo request over HTTP, summarise.

The summary names the engine that answered (the response's ``system_fingerprint`` /
``X-CM-Ray-Engine``); an answer from another engine than ``serve.engine`` is a ``wrong_engine``
degradation (``cm_ray.checks``), which fails the stage past ``checks.wrong_engine``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from cm_ray import artifacts, checks
from cm_ray.artifacts import AUTO


def _demo_prompt(cfg, store) -> str:
    if cfg.serve.demo_prompt:
        return cfg.serve.demo_prompt
    if store.exists(*artifacts.synth_dir()):
        for r in artifacts.read_synth(store, columns=["split", "input"]).to_pylist():
            if r["split"] == "validation" and r["input"]:
                return r["input"]
    return "¿Qué se suele comer en una fiesta de cumpleaños en Ciudad de México?"


def _auth_headers(s) -> dict[str, str]:
    """The Authorization header of the app's own requests (``serve.api_key_env``), or none."""
    if not s.api_key_env:
        return {}
    return {"Authorization": f"Bearer {os.environ[s.api_key_env]}"}


def client_url(s) -> str:
    """The app's base URL for a client on this host (a wildcard bind is reached on loopback)."""
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    return f"http://{host}:{s.port}{s.route_prefix.rstrip('/')}"


def smoke_request(url: str, s, prompt: str) -> dict:
    """One routed chat request to the app at ``url``: the answer, its routing, the engine that
    generated it (None when the response names none) and the latency."""
    import urllib.request

    from cm_ray.serve.responses import engine_of

    body = json.dumps({"model": AUTO, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": s.max_new_tokens}).encode()
    t1 = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(
            f"{url}/v1/chat/completions", body, {"Content-Type": "application/json", **_auth_headers(s)}),
            timeout=s.request_timeout_s) as r:
        answer, headers = json.loads(r.read()), r.headers
    return {"answer": answer["choices"][0]["message"]["content"], "culture": answer["culture"],
            "router_confidence": answer["router_confidence"], "routed_by": answer["routed_by"],
            "engine": engine_of(answer.get("system_fingerprint"), headers),
            "system_fingerprint": answer.get("system_fingerprint"),
            "latency_ms": round((time.perf_counter() - t1) * 1000, 1)}


def engine_degradations(configured: str, engines: list[str | None]) -> list[dict]:
    """A ``wrong_engine`` record when any of the answers' ``engines`` is not ``configured``."""
    wrong = [e or "an unnamed engine" for e in engines if e != configured]
    if not wrong:
        return []
    return [checks.degradation("wrong_engine", "serve", len(wrong), len(engines),
                               f"{len(wrong)} of {len(engines)} answers from {', '.join(sorted(set(wrong)))}, "
                               f"not serve.engine {configured}")]


def run_serve(cfg, store, force: bool = False, keep_serving: bool = False) -> dict:
    """Stage ``serve``: deploy the app, send one routed demo request over HTTP, summarise.

    Serve is shut down afterwards (only this app when others share the instance) unless
    ``keep_serving``, which blocks until Ctrl-C.
    """
    import urllib.request

    from ray import serve

    from cm_ray.ray_utils import init_ray, owns_cluster
    from cm_ray.serve.app import build_app

    init_ray(cfg)
    # On a cluster (ray job submit, ray.address) Serve outlives this driver: a kept app stays up.
    leave_deployed = keep_serving and not owns_cluster()
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port}, proxy_location=s.proxy_location)
    t0 = time.time()
    serve.run(build_app(cfg), name=s.app_name, route_prefix=s.route_prefix, blocking=False)
    deploy_s = time.time() - t0
    url = client_url(s)
    try:
        prompt = _demo_prompt(cfg, store)
        got = smoke_request(url, s, prompt)  # every request of its own carries the key when auth is on
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/models", headers=_auth_headers(s)),
                                    timeout=30) as r:
            n_adapters = len(json.loads(r.read())["data"]) - 2
        text, engine = got["answer"], got["engine"]
        summary = {"url": url, "prompt": prompt, **got, "engine_configured": s.engine,
                   "deploy_s": round(deploy_s, 1), "adapters": n_adapters,
                   "degradations": engine_degradations(s.engine, [engine]),
                   "headline": f"{got['culture']} (p={got['router_confidence']:.2f}) answered "
                               f"on {engine} in {got['latency_ms']:.0f} ms: {text[:40]!r}"}
        if leave_deployed:
            print(f"cm_ray: deployed at {url}/v1", file=sys.stderr, flush=True)
        elif keep_serving:
            print(f"cm_ray: serving at {url}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return summary
    finally:
        if not leave_deployed:
            serve.delete(s.app_name)
            if not serve.status().applications:
                serve.shutdown()
