"""Synthesis engines: output tokens/s through the Ray Data pipeline ÷ the same engine called directly.

Same prompts (task-sample requests with the offensive task's JSON schema, guided decoding), same
model (SmolLM2-135M-Instruct, float32), greedy decoding, same batch size, measured in one run:

  transformers  direct: TransformersEngine.generate per batch, in this process
                pipeline: cm_ray.generation.generate.generate(engine="transformers") on local Ray (1 actor)
  vllm-cpu      direct: VLLMEngine (vllm.LLM.chat over all prompts), in a spawned process
                pipeline: generate(engine="vllm") -> ray.data.llm vLLM processor (1 engine actor)

Engine start is excluded from tok/s on both sides: direct = the generate calls only; pipeline = the
engine busy window from the rows' own timestamps (first request start to last finish,
``busy_window_s``). Wall times including start are reported next to them. When the synthesis stage
(``cm_ray.data.synthesize.run_synthesis``) exists, ``--stage-config`` also runs it for
samples_per_min and kept_fraction.

python bench/synthesis.py --prompts 24 --max-new-tokens 96
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
    from cm_ray.tasks import load_task

    spec = load_task("offensive")
    return [[{"role": "user", "content": f"{spec.description} Write one new sample about {TOPICS[i % len(TOPICS)]} "
                                         f"(number {i}) as JSON with the fields text and label. Example:\n"
                                         f"{spec.example_json(1)}"}] for i in range(n)]


def config(args, engine: str):
    from cm_ray.config import load_config

    return load_config(None, [f"synthesis.engine={engine}", f"synthesis.batch_size={args.batch_size}",
                              "synthesis.concurrency=1", f"synthesis.threads_per_replica={args.threads}", f"synthesis.vllm.max_num_seqs={args.prompts}",
                              "synthesis.vllm.max_model_len=1024"])


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
    for i in range(0, len(convs), args.batch_size):  # the batches the pipeline forms
        gens += eng.generate(convs[i:i + args.batch_size], params)
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
    queue.put(summarize([g.output_tokens for g in gens], [g.text for g in gens], busy, start + busy))


def direct_vllm(args) -> dict:
    # Own process: the direct engine's memory and its engine-core child are gone before the pipeline runs.
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_direct_vllm_child, args=(args, queue))
    proc.start()
    out = queue.get(timeout=1200)
    proc.join(60)
    if proc.is_alive():  # seen: the engine core's shutdown can hang the child after its result is in
        proc.kill()
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
    """samples_per_min and kept_fraction from the synthesis stage on a config (when it exists)."""
    import importlib.util

    if importlib.util.find_spec("cm_ray.data.synthesize") is None:
        return {}
    import tempfile

    from cm_ray.config import load_config
    from cm_ray.stages import run_stage
    from cm_ray.storage import ArtifactStore

    root = tempfile.mkdtemp(prefix="bench-synthesis-")
    cfg = load_config(config_path, [f"root={root}"])
    store = ArtifactStore(root)
    for stage in ("queries", "search"):
        run_stage(stage, cfg, store)
    t0 = time.perf_counter()
    summary = run_stage("synthesize", cfg, store)
    minutes = (time.perf_counter() - t0) / 60
    kept = summary.get("rows_out", summary.get("samples", 0))
    candidates = summary.get("rows_in", summary.get("candidates", 0))
    return {"samples_per_min": round(kept / minutes, 2),
            "kept_fraction": round(kept / candidates, 3) if candidates else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the transformers engine on both paths (1 = robust on a busy machine)")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--stage-config", default=None, help="also run the synthesis stage on this config")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "synthesis.json"))
    args = parser.parse_args()

    from cm_ray._imports import is_vllm_available
    from cm_ray.generation.engines import vllm_cpu_env
    from cm_ray.ray_utils import init_ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(vllm_cpu_env())
    res: dict[str, dict] = {}

    def record(name: str, r: dict) -> None:  # progress on stderr: a killed run still shows its figures
        res[name] = r
        print(f"[bench] {name}: {json.dumps(r)}", file=sys.stderr, flush=True)

    record("transformers_direct", direct_transformers(args))
    vllm = is_vllm_available() and not args.skip_vllm
    if vllm:
        record("vllm_cpu_direct", direct_vllm(args))
    init_ray(None, num_cpus=4, include_dashboard=False)
    record("transformers_pipeline", pipeline(args, "transformers"))
    if vllm:
        record("vllm_cpu_pipeline", pipeline(args, "vllm"))

    print(f"{'engine/path':24} {'rows':>5} {'out tok':>8} {'busy s':>8} {'tok/s':>8} {'wall s':>8} "
          f"{'tok/s incl start':>17} {'json ok':>8}")
    for k, r in res.items():
        print(f"{k:24} {r['rows']:5d} {r['output_tokens']:8d} {r['busy_s']:8.1f} {r['tok_s']:8.1f} "
              f"{r['wall_s']:8.1f} {r['tok_s_incl_start']:17.1f} {r['json_valid']:8.0%}")
    figures: dict = {"pipeline_vs_direct_transformers":
                     round(res["transformers_pipeline"]["tok_s"] / res["transformers_direct"]["tok_s"], 3)}
    if vllm:
        figures["pipeline_vs_direct_vllm_cpu"] = round(res["vllm_cpu_pipeline"]["tok_s"] / res["vllm_cpu_direct"]["tok_s"], 3)
        figures["pipeline_vs_direct_vllm_cpu_incl_start"] = round(
            res["vllm_cpu_pipeline"]["tok_s_incl_start"] / res["vllm_cpu_direct"]["tok_s_incl_start"], 3)
    figures["pipeline_vs_direct_transformers_incl_start"] = round(
        res["transformers_pipeline"]["tok_s_incl_start"] / res["transformers_direct"]["tok_s_incl_start"], 3)
    if args.stage_config:
        figures.update(stage_figures(args.stage_config))
    figures["runs"] = res
    for k, v in figures.items():
        if k != "runs":
            print(f"{k}: {v}")
    result = {"name": "synthesis", "date": time.strftime("%Y-%m-%d"),
              "command": "python " + " ".join(["bench/synthesis.py", *sys.argv[1:]]),
              "machine": f"{os.cpu_count()} cores, no GPU", "figures": figures}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
