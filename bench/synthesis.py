"""Synthesis volume: the demo's synthesis stage, and output tokens/s through the Ray Data pipeline
against the same engine called directly, measured side by side in one run.

Same prompts (task-sample requests with the offensive task's JSON schema, guided decoding), same
model (SmolLM2-135M-Instruct, float32), greedy decoding, all prompts in flight at once:

  transformers  direct: TransformersEngine.generate per batch, in this process
                pipeline: cm_ray.generation.generate.generate(engine="transformers") on local Ray (1 actor)
  vllm-cpu      direct: VLLMEngine (vllm.LLM.chat over all prompts), in a spawned process
                pipeline: generate(engine="vllm") -> ray.data.llm vLLM processor (1 engine actor),
                batch_size = max_num_seqs = --prompts (the same concurrency as the direct call)
  demo stage    cm_ray.data.synthesize.run_synthesis on --stage-config (default configs/demo.yaml),
                after its queries and search stages: kept samples per minute of the stage's wall
                time (engine start included) and kept / candidates, by the stage's own counts.

Engine start is excluded from tok/s on both sides: direct = the generate calls only; pipeline = the
engine busy window from the rows' own timestamps (first request start to last finish,
``busy_window_s``). Wall times including start are reported next to them, and the load average.

python bench/synthesis.py --prompts 48 --max-new-tokens 96

``--gpu`` (a GPU machine with vLLM): a Llama-architecture model (``--gpu-model``) through the
pipeline against vLLM's own offline benchmark (``vllm bench throughput``) on the same model, prompt
count and output length: output tok/s per GPU for both.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

TOPICS = ["football", "food", "weddings", "traffic", "politics", "school", "music", "weather", "tea",
          "trains", "neighbours", "holidays"]


def conversations(n: int) -> list[list[dict]]:
    """n sample requests sharing their system prompt, task text and example (as the synthesis
    stage's prompts share theirs); the topic asked for comes last."""
    from cm_ray.tasks import load_task

    spec = load_task("offensive")
    head = (f"{spec.description} Reply with one sample as JSON with the fields text and label. Example:\n"
            f"{spec.example_json(1)}\n")
    return [[{"role": "system", "content": "You write training data. You reply with one JSON object."},
             {"role": "user", "content": head + f"Write one new sample about {TOPICS[i % len(TOPICS)]} "
                                                f"(number {i})."}] for i in range(n)]


def config(args, engine: str):
    from cm_ray.config import load_config

    batch = args.batch_size or args.prompts  # default: every prompt in one batch, all in flight
    return load_config(None, [f"synthesis.engine={engine}", f"synthesis.batch_size={batch}",
                              "synthesis.concurrency=1", f"synthesis.threads_per_replica={args.threads}",
                              f"synthesis.vllm.max_num_seqs={args.prompts}", "synthesis.vllm.max_model_len=1024"])


def schema(cfg) -> dict:
    from cm_ray.generation.generate import row_schema
    from cm_ray.tasks import load_task

    return row_schema(json.dumps(load_task("offensive").json_schema()), cfg.synthesis)


def direct_transformers(args) -> dict:
    from cm_ray.generation.base import GenerationParams
    from cm_ray.generation.engines import make_engine

    cfg = config(args, "transformers")
    t0 = time.perf_counter()
    eng = make_engine(cfg)
    start = time.perf_counter() - t0
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0, json_schema=schema(cfg))
    convs = conversations(args.prompts)
    t1 = time.perf_counter()
    gens = []
    batch = cfg.synthesis.batch_size
    for i in range(0, len(convs), batch):  # the batches the pipeline forms
        gens += eng.generate(convs[i:i + batch], params)
    busy = time.perf_counter() - t1
    return summarize([g.output_tokens for g in gens], [g.text for g in gens], busy, start + busy)


def _direct_vllm_child(args, queue) -> None:
    from cm_ray.generation.base import GenerationParams
    from cm_ray.generation.engines import VLLMEngine

    cfg = config(args, "vllm")
    t0 = time.perf_counter()
    eng = VLLMEngine(cfg)
    start = time.perf_counter() - t0
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0, json_schema=schema(cfg))
    t1 = time.perf_counter()
    gens = eng.generate(conversations(args.prompts), params)
    busy = time.perf_counter() - t1
    queue.put({**summarize([g.output_tokens for g in gens], [g.text for g in gens], busy, start + busy),
               "prompt_tokens": sum(g.prompt_tokens for g in gens),
               "cached_prompt_tokens": sum(g.cached_prompt_tokens for g in gens),
               "prefix_caching": cfg.synthesis.vllm.prefix_caching})


def direct_vllm(args) -> dict:
    # Own process: the direct engine's memory and its engine-core child are gone before the pipeline runs.
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_direct_vllm_child, args=(args, queue))
    proc.start()
    out = queue.get(timeout=1200)
    proc.join(60)
    if proc.is_alive():  # seen: the engine core's shutdown can hang the child after its result is in
        import psutil

        # its engine-core (and worker) processes too: killed alone, the child left them running,
        # holding 4 GB and CPU under the pipeline measured next
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()
        proc.join(10)
    return out


def pipeline(args, engine: str) -> dict:
    import ray

    from cm_ray.generation.generate import busy_window_s, generate

    cfg = config(args, engine)
    text = json.dumps(__import__("cm_ray.tasks", fromlist=["load_task"]).load_task("offensive").json_schema())
    rows = [{"id": i, "messages": c, "json_schema": text} for i, c in enumerate(conversations(args.prompts))]
    t0 = time.perf_counter()
    out = generate(ray.data.from_items(rows, override_num_blocks=1), cfg, max_new_tokens=args.max_new_tokens,
                   temperature=0.0).take_all()
    wall = time.perf_counter() - t0
    out.sort(key=lambda r: r["id"])
    return summarize([r["output_tokens"] for r in out], [r["generated_text"] for r in out], busy_window_s(out), wall)


def summarize(tokens: list[int], texts: list[str], busy: float, wall: float) -> dict:
    valid = 0
    for t in texts:
        try:
            valid += isinstance(json.loads(t), dict)
        except ValueError:
            pass
    return {"output_tokens": sum(tokens), "busy_s": round(busy, 2), "wall_s": round(wall, 2),
            "tok_s": round(sum(tokens) / busy, 2), "tok_s_incl_start": round(sum(tokens) / wall, 2),
            "json_valid": valid / max(1, len(texts)), "rows": len(texts)}


def stage_figures(config_path: str) -> dict:
    """The synthesis stage of ``config_path`` (after its queries and search stages), fresh root."""
    import tempfile

    from cm_ray.config import load_config
    from cm_ray.stages import run_stage
    from cm_ray.storage import ArtifactStore

    root = tempfile.mkdtemp(prefix="bench-synthesis-")
    cfg = load_config(config_path, [f"root={root}"])
    store = ArtifactStore(root)
    for stage in ("queries", "search"):
        run_stage(stage, cfg, store)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    summary = run_stage("synthesize", cfg, store)
    seconds = time.perf_counter() - t0
    kept, candidates = summary["rows"], summary["candidates"]
    drops: dict[str, int] = {}
    for entry in summary["per_culture"].values():
        for step, e in entry["filters"].items():
            for reason, n in e["dropped"].items():
                drops[f"{step}:{reason}"] = drops.get(f"{step}:{reason}", 0) + n
    assert kept + sum(drops.values()) == candidates, (kept, drops, candidates)  # every drop counted
    return {"kept_per_min_demo": round(kept / (seconds / 60), 2),
            "keep_rate_demo": round(kept / candidates, 3) if candidates else 0.0,
            "demo_stage": {"config": config_path, "engine": cfg.synthesis.engine, "kept": kept,
                           "candidates": candidates, "seconds": round(seconds, 1), "drops": drops,
                           "loadavg_1m_start": round(load, 2), "loadavg_1m_end": round(os.getloadavg()[0], 2)}}


def gpu_figures(args) -> dict:
    """``--gpu``: pipeline output tok/s on a GPU vs ``vllm bench throughput`` on the same model."""
    import re
    import subprocess

    import ray

    from cm_ray.config import load_config
    from cm_ray.generation.generate import busy_window_s, generate

    n, out_len = args.prompts, args.max_new_tokens
    cmd = ["vllm", "bench", "throughput", "--model", args.gpu_model, "--dataset-name", "random",
           "--input-len", str(args.gpu_input_len), "--output-len", str(out_len), "--num-prompts", str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    m = re.search(r"([\d.]+) output tokens/s", proc.stdout + proc.stderr)
    ref = float(m.group(1)) if m else None
    cfg = load_config(None, ["synthesis.engine=vllm", "synthesis.accelerator=gpu", f"models.generator={args.gpu_model}",
                             f"synthesis.batch_size={n}", f"synthesis.vllm.max_num_seqs={n}"])
    rows = [{"id": i, "messages": c, "json_schema": ""} for i, c in enumerate(conversations(n))]
    out = generate(ray.data.from_items(rows, override_num_blocks=1), cfg, max_new_tokens=out_len,
                   temperature=0.0).take_all()
    tok_s = sum(r["output_tokens"] for r in out) / busy_window_s(out)
    return {"gpu_model": args.gpu_model, "gpu_pipeline_tok_s": round(tok_s, 1),
            "gpu_vllm_bench_tok_s": ref, "gpu_pipeline_vs_vllm_bench": round(tok_s / ref, 3) if ref else None,
            "gpu_reference_command": " ".join(cmd)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48, help="prompts per engine (vLLM: all in flight)")
    parser.add_argument("--tf-prompts", type=int, default=16, help="prompts for the transformers baseline")
    parser.add_argument("--batch-size", type=int, default=None, help="default: all prompts in one batch")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the transformers engine on both paths (1 = robust on a busy machine)")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--stage-config", default="configs/demo.yaml", help="'' = skip the demo stage")
    parser.add_argument("--gpu", action="store_true", help="also the GPU figures (needs a GPU and vLLM)")
    parser.add_argument("--gpu-model", default="meta-llama/Llama-3.2-1B-Instruct")
    parser.add_argument("--gpu-input-len", type=int, default=512)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "synthesis.json"))
    args = parser.parse_args()

    from cm_ray._imports import is_vllm_available
    from cm_ray.generation.engines import vllm_cpu_env
    from cm_ray.ray_utils import init_ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(vllm_cpu_env(worker_in_core=False))  # the pipeline sets its own per stage
    res: dict[str, dict] = {}
    load_start = os.getloadavg()

    def record(name: str, r: dict) -> None:  # progress on stderr: a killed run still shows its figures
        res[name] = {**r, "loadavg_1m": round(os.getloadavg()[0], 2)}
        print(f"[bench] {name}: {json.dumps(res[name])}", file=sys.stderr, flush=True)

    tf_args = argparse.Namespace(**{**vars(args), "prompts": args.tf_prompts})
    record("transformers_direct", direct_transformers(tf_args))
    vllm = is_vllm_available() and not args.skip_vllm
    if vllm:
        record("vllm_cpu_direct", direct_vllm(args))
    init_ray(None, num_cpus=4, include_dashboard=False)
    record("transformers_pipeline", pipeline(tf_args, "transformers"))
    if vllm:
        record("vllm_cpu_pipeline", pipeline(args, "vllm"))

    print(f"{'engine/path':24} {'rows':>5} {'out tok':>8} {'busy s':>8} {'tok/s':>8} {'wall s':>8} "
          f"{'tok/s incl start':>17} {'json ok':>8}")
    for k, r in res.items():
        print(f"{k:24} {r['rows']:5d} {r['output_tokens']:8d} {r['busy_s']:8.1f} {r['tok_s']:8.1f} "
              f"{r['wall_s']:8.1f} {r['tok_s_incl_start']:17.1f} {r['json_valid']:8.0%}")
    figures: dict = {}
    if vllm:
        figures["pipeline_tok_s_vllm_cpu"] = res["vllm_cpu_pipeline"]["tok_s"]
        figures["direct_tok_s_vllm_cpu"] = res["vllm_cpu_direct"]["tok_s"]
        figures["pipeline_vs_direct_vllm_cpu"] = round(res["vllm_cpu_pipeline"]["tok_s"] / res["vllm_cpu_direct"]["tok_s"], 3)
        figures["pipeline_vs_direct_vllm_cpu_incl_start"] = round(
            res["vllm_cpu_pipeline"]["tok_s_incl_start"] / res["vllm_cpu_direct"]["tok_s_incl_start"], 3)
        d = res["vllm_cpu_direct"]
        figures["prefix_cache_hit_vllm_cpu"] = round(d["cached_prompt_tokens"] / max(1, d["prompt_tokens"]), 3)
        figures["vllm_cpu_vs_transformers_pipeline"] = round(
            res["vllm_cpu_pipeline"]["tok_s"] / res["transformers_pipeline"]["tok_s"], 3)
    figures["direct_tok_s_transformers"] = res["transformers_direct"]["tok_s"]
    figures["pipeline_tok_s_transformers"] = res["transformers_pipeline"]["tok_s"]
    figures["pipeline_vs_direct_transformers"] = round(
        res["transformers_pipeline"]["tok_s"] / res["transformers_direct"]["tok_s"], 3)
    figures["pipeline_vs_direct_transformers_incl_start"] = round(
        res["transformers_pipeline"]["tok_s_incl_start"] / res["transformers_direct"]["tok_s_incl_start"], 3)
    if args.stage_config:
        figures.update(stage_figures(args.stage_config))
        figures["samples_per_min"], figures["kept_fraction"] = figures["kept_per_min_demo"], figures["keep_rate_demo"]
    if args.gpu:
        figures.update(gpu_figures(args))
    figures["runs"] = res
    for k, v in figures.items():
        if k != "runs":
            print(f"{k}: {v}")
    result = {"name": "synthesis", "date": time.strftime("%Y-%m-%d"),
              "command": "python " + " ".join(["bench/synthesis.py", *sys.argv[1:]]),
              "machine": f"{os.cpu_count()} cores, no GPU" if not args.gpu else f"{os.cpu_count()} cores + GPU",
              "loadavg_start": [round(x, 2) for x in load_start],
              "loadavg_end": [round(x, 2) for x in os.getloadavg()], "figures": figures}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
