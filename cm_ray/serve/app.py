"""The Ray Serve application: the ingress bound to the adapter servers (vLLM or transformers,
``serve.engine``), built from a run config.

    serve run deploy/serve.yaml            # or: cm-ray serve configs/demo.yaml --keep-serving

Each deployment is bound with its own config sections only: the adapter servers get the serve
section, the model refs and the root; the ingress gets the serve and router sections, the model
refs, the root and the hash of the API key (the key itself never ships). Both deployments have
bounded queues: past them a request gets 503 + Retry-After at once (``serve.max_queued_requests``,
``serve.ingress_max_queued_requests``, ``serve.retry_after_s``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any


def _backpressure(s):
    """Requests past a queue bound get 503 + Retry-After (Serve's BackpressureConfig)."""
    from ray.serve.config import BackpressureConfig

    return BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s)


def ingress_options(s) -> dict:
    """Deployment options of CultureIngress: its own concurrency and proxy-side queue bounds."""
    return {"max_ongoing_requests": s.ingress_max_ongoing_requests,
            "max_queued_requests": s.ingress_max_queued_requests,
            "backpressure_config": _backpressure(s)}


def adapter_server_options(s) -> dict:
    """Deployment options of AdapterServer from ServeConfig (``num_replicas: auto`` = autoscaling)."""
    opts: dict = {"max_ongoing_requests": s.max_ongoing_requests,
                  "max_queued_requests": s.max_queued_requests,
                  "backpressure_config": _backpressure(s),
                  "ray_actor_options": {"num_cpus": s.ray_actor_cpus}}
    if s.num_gpus:
        opts["ray_actor_options"]["num_gpus"] = s.num_gpus
    if s.num_replicas == "auto":
        opts["autoscaling_config"] = {"min_replicas": s.min_replicas,
                                      "max_replicas": s.max_replicas,
                                      "target_ongoing_requests": s.target_ongoing_requests}
    else:
        opts["num_replicas"] = s.num_replicas
    return opts


def vllm_server_options(s) -> dict:
    """Deployment options of VLLMServer: those of the adapter servers, and with GPUs one bundle
    of {GPU: 1, CPU: 1} per tensor-parallel shard (the engine's Ray workers take them). From the
    config only: the driver may run on a head node without GPUs."""
    opts = adapter_server_options(s)
    tp = s.vllm.tensor_parallel_size
    if s.num_gpus and tp > 1:
        opts["ray_actor_options"] = {"num_cpus": min(s.ray_actor_cpus, 1.0), "num_gpus": 0}
        opts["placement_group_bundles"] = [{"GPU": 1, "CPU": 1} for _ in range(tp)]
        opts["placement_group_strategy"] = "PACK"
    return opts


def build_app(cfg) -> Any:
    """The unexecuted Serve application (ingress bound to the adapter servers) for ``cfg``:
    ``serve.engine`` vllm binds VLLMServer, transformers binds AdapterServer."""
    from cm_ray.serve.ingress import CultureIngress

    s = cfg.serve
    key_sha256 = None
    if s.api_key_env:
        key = os.environ.get(s.api_key_env)
        if not key:
            raise ValueError(f"serve.api_key_env: environment variable {s.api_key_env} is not set")
        key_sha256 = hashlib.sha256(key.encode()).hexdigest()  # the key itself never ships
    if s.engine == "vllm":
        from cm_ray.serve.vllm_server import VLLMServer

        adapters = VLLMServer.options(**vllm_server_options(s)).bind(s, cfg.models, cfg.root)
    else:
        from cm_ray.serve.adapters import AdapterServer

        adapters = AdapterServer.options(**adapter_server_options(s)).bind(s, cfg.models, cfg.root)
    return CultureIngress.options(**ingress_options(s)).bind(s, cfg.router, cfg.models, cfg.root, adapters, key_sha256)


def app_builder(args: dict) -> Any:
    """Entry point for ``serve run`` / ``serve deploy`` YAML: args {config, overrides}."""
    from cm_ray.config import load_config

    return build_app(load_config(args.get("config"), list(args.get("overrides") or [])))
