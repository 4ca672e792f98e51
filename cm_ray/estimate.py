"""Per-stage time and cost of a run config, from MEASURED throughput only (``bench/results``).

Reads the figures in bench/results/*.json and the counts a config implies (cultures x tasks x
queries, prompts x samples x tokens, epochs, GPUs) and gives, per stage, the work, the measured
figure used, the time and the cost. Prices are INPUTS, not measurements. A stage whose throughput
was never measured on the config's hardware is unavailable, with the bench command that would
measure it: no figure is guessed, and no model size or CPU figure is scaled to another model or
to a GPU. Used by ``cm-ray plan`` and ``bench/estimate.py``.

Figures read (file: key):
  search.json:    qps_ratio, p50_ms                 (HTTP provider under a qps limit)
  synthesis.json: tokens_per_s_gpu_8b               (vLLM, 8B, one GPU; output tok/s)
                  kept_fraction                     (samples kept / candidates)
  train.json:     tokens_per_s_gpu_8b, workers      (Ray Train + DeepSpeed, 8B, LoRA)
  serve.json:     rps_multi8_gpu_8b                 (req/s per adapter-server replica, 8B, one GPU)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"
"""The checkout's measured figures (absent in an installed wheel: every stage is then unavailable)."""

# What measures each missing figure (the commands are run on a host with the named hardware).
COMMANDS = {
    "synthesis.tokens_per_s_gpu_8b":
        "no bench measures it yet: bench/synthesis.py has no --model/--gpu option; it needs one that "
        "runs generate(engine='vllm') with the 8B generator on one GPU and writes "
        "figures.tokens_per_s_gpu_8b (output tok/s, engine busy window)",
    "synthesis.kept_fraction": "python bench/synthesis.py --stage-config configs/demo.yaml",
    "train.tokens_per_s_gpu_8b": "python bench/train.py --gpu --arch llama-8b   (GPU host)",
    "serve.rps_multi8_gpu_8b":
        "python bench/serve.py --clients 32 --seconds 30 --base meta-llama/Llama-3.1-8B-Instruct "
        "--num-gpus 1 --max-tokens 64   (GPU host; the bench must record it as rps_multi8_gpu_8b)",
}


def load_results(results_dir: Path) -> dict[str, dict]:
    """``{bench name: {"figures": {...}, "machine": str, "date": str}}`` for every results JSON."""
    out = {}
    for path in sorted(results_dir.glob("*.json")):
        if path.stem == "estimate":
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        out[path.stem] = {"figures": data.get("figures") or {}, "machine": data.get("machine", "?"),
                          "date": data.get("date", "?")}
    return out


def figure(results: dict, name: str):
    """The measured value of ``bench.key`` (None when absent)."""
    bench, key = name.split(".", 1)
    return (results.get(bench) or {}).get("figures", {}).get(key)


def counts(cfg, tokens_per_sample: int | None = None) -> dict:
    """The work a config implies (upper bounds where a count depends on what the model writes)."""
    q, s, t = cfg.queries, cfg.synthesis, cfg.train
    pairs = len(cfg.cultures) * len(cfg.tasks)
    per_pair = sum(q.n_specific if k == "specific" else q.n_agnostic for k in q.kinds)
    candidates = pairs * s.prompts_per_pair * s.samples_per_prompt
    return {"cultures": len(cfg.cultures), "tasks": len(cfg.tasks), "pairs": pairs,
            "query_generations": pairs * len(q.kinds),
            "query_output_tokens_max": pairs * len(q.kinds) * q.generation_tokens(),
            "queries": pairs * per_pair,
            "page_fetches": pairs * per_pair * cfg.search.fetch.top_k if cfg.search.fetch.enabled else 0,
            "synthesis_generations": candidates,
            "synthesis_output_tokens_max": candidates * s.max_new_tokens,
            "tokens_per_sample": tokens_per_sample or s.max_new_tokens,
            "tokens_per_sample_is_bound": tokens_per_sample is None,
            "epochs": t.epochs, "train_workers": t.num_workers, "use_gpu": t.use_gpu}


def _row(stage, work, used, hours=None, usd=None, note="", missing=()):
    return {"stage": stage, "work": work, "figures_used": used,
            "hours": None if hours is None else round(hours, 3),
            "usd": None if usd is None else round(usd, 2),
            "available": not missing, "missing": list(missing),
            "how_to_measure": [COMMANDS[m] for m in missing if m in COMMANDS], "note": note}


def estimate(cfg, results: dict, prices: dict, tokens_per_sample: int | None = None) -> dict:
    """Per-stage rows (time, cost or what is missing) and totals for ``cfg``."""
    c = counts(cfg, tokens_per_sample)
    gpus, gpu_usd, cpu_usd = prices["gpus"], prices["gpu_hour_usd"], prices["cpu_node_hour_usd"]
    rows = []
    gen_tps = figure(results, "synthesis.tokens_per_s_gpu_8b")
    engines = max(1, min(cfg.synthesis.concurrency, gpus))
    # 1. queries: LLM generations on the synthesis engines.
    if gen_tps:
        h = c["query_output_tokens_max"] / (gen_tps * engines) / 3600
        rows.append(_row("queries", f"{c['query_generations']} generations, <= {c['query_output_tokens_max']:,} "
                         "output tokens", {"synthesis.tokens_per_s_gpu_8b": gen_tps}, h, h * engines * gpu_usd,
                         "upper bound: every generation at max_new_tokens"))
    else:
        rows.append(_row("queries", f"{c['query_generations']} generations", {},
                         missing=["synthesis.tokens_per_s_gpu_8b"]))
    # 2. search: bounded by the provider's qps limit or by in-flight requests x latency.
    ratio, p50 = figure(results, "search.qps_ratio"), figure(results, "search.p50_ms")
    sc = cfg.search
    if ratio and p50:
        by_qps = c["queries"] / (sc.qps * ratio) if sc.qps else 0.0
        by_latency = c["queries"] * p50 / 1000 / (sc.concurrency * sc.max_in_flight)
        h = max(by_qps, by_latency) / 3600
        provider_usd = c["queries"] / 1000 * prices["search_per_1k_usd"]
        note = (f"{'qps limit' if by_qps >= by_latency else 'latency'} bound; "
                f"{c['page_fetches']} page fetches not included (not measured)" if c["page_fetches"]
                else f"{'qps limit' if by_qps >= by_latency else 'latency'} bound")
        rows.append(_row("search", f"{c['queries']:,} queries at qps={sc.qps}",
                         {"search.qps_ratio": ratio, "search.p50_ms": p50}, h,
                         h * cpu_usd + provider_usd, note))
    else:
        rows.append(_row("search", f"{c['queries']:,} queries", {}, missing=["search.qps_ratio"]))
    # 3. synthesis.
    kept = figure(results, "synthesis.kept_fraction")
    if gen_tps:
        h = c["synthesis_output_tokens_max"] / (gen_tps * engines) / 3600
        rows.append(_row("synthesize", f"{c['synthesis_generations']:,} generations, <= "
                         f"{c['synthesis_output_tokens_max']:,} output tokens",
                         {"synthesis.tokens_per_s_gpu_8b": gen_tps}, h, h * engines * gpu_usd,
                         f"{engines} vLLM replicas, 1 GPU each; upper bound (max_new_tokens)"))
    else:
        rows.append(_row("synthesize", f"{c['synthesis_generations']:,} generations, <= "
                         f"{c['synthesis_output_tokens_max']:,} output tokens", {},
                         missing=["synthesis.tokens_per_s_gpu_8b"]))
    # 4. train: one trial per culture, num_workers GPUs each, as many trials at once as GPUs allow.
    train_tps, workers = figure(results, "train.tokens_per_s_gpu_8b"), figure(results, "train.workers") or 1
    missing = [m for m, v in (("synthesis.kept_fraction", kept), ("train.tokens_per_s_gpu_8b", train_tps)) if not v]
    if not missing:
        samples = c["synthesis_generations"] * kept
        tokens = samples * c["tokens_per_sample"] * c["epochs"]
        per_gpu = train_tps / workers
        at_once = max(1, gpus // c["train_workers"])
        waves = math.ceil(c["cultures"] / at_once)
        h = waves * (tokens / c["cultures"]) / (per_gpu * c["train_workers"]) / 3600
        rows.append(_row("train", f"{samples:,.0f} samples x {c['tokens_per_sample']} tok x {c['epochs']:g} epochs",
                         {"train.tokens_per_s_gpu_8b": train_tps, "synthesis.kept_fraction": kept}, h,
                         h * min(gpus, at_once * c["train_workers"]) * gpu_usd,
                         f"{waves} waves of {at_once} trials; worker start-up not included"))
    else:
        rows.append(_row("train", f"{c['cultures']} adapters x {c['epochs']:g} epochs", {}, missing=missing))
    # 5. route: the router trains on the driver's CPU; no bench measures it.
    rows.append(_row("route", f"router over {c['cultures']} cultures", {},
                     note="not estimated: no bench measures router training (minutes on CPU)"))
    # 6. serve: capacity per replica.
    rps = figure(results, "serve.rps_multi8_gpu_8b")
    router_p99 = figure(results, "serve.router_p99_ms")
    if rps:
        replicas = math.ceil(prices["serve_rps"] / rps)
        rows.append(_row("serve", f"{prices['serve_rps']:g} req/s sustained", {"serve.rps_multi8_gpu_8b": rps},
                         1.0, replicas * gpu_usd, f"{replicas} replicas; cost per hour of serving"))
    else:
        rows.append(_row("serve", f"{prices['serve_rps']:g} req/s sustained",
                         {"serve.router_p99_ms (CPU ingress)": router_p99} if router_p99 else {},
                         missing=["serve.rps_multi8_gpu_8b"]))
    batch = [r for r in rows if r["stage"] != "serve"]
    done = [r for r in batch if r["hours"] is not None]
    return {"config": cfg.name, "counts": c, "prices_are_inputs": prices, "rows": rows,
            "total_hours_available": round(sum(r["hours"] for r in done), 3),
            "total_usd_available": round(sum(r["usd"] for r in done), 2),
            "stages_unavailable": [r["stage"] for r in batch if r["hours"] is None],
            "reference_not_applicable": reference(results)}


# Measured figures shown for context only: other hardware or model than the paper path.
REFERENCE = ["synthesis.samples_per_min", "synthesis.pipeline_vs_direct_vllm_cpu", "train.tokens_per_s_cpu",
             "train.model", "serve.rps_multi8", "serve.rps_single", "scale.s_per_culture_10",
             "scale.s_per_culture_200", "scale.driver_peak_mb_200"]


def reference(results: dict) -> dict:
    """Figures measured on other hardware / models (e.g. CPU, tiny Llama): context, never used."""
    out = {}
    for name in REFERENCE:
        v = figure(results, name)
        if v is not None:
            out[name] = {"value": v, "machine": results[name.split(".")[0]]["machine"]}
    return out


