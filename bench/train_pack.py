"""Packed training vs one trial per culture: wall time of the train stage for all adapters.

    python bench/train_pack.py --cultures 50                       # both modes, one process
    python bench/train_pack.py --cultures 50 --mode trials --chunk 0/4 --state /tmp/tp.json
    python bench/train_pack.py --cultures 50 --mode packed --state /tmp/tp.json

Both modes train the same adapters on the same data: ``--cultures`` cultures with realistic
per-culture sizes (``rows_for``: 20-200 synth rows, spread deterministically), the 2-layer random
Llama of the tests, ``--seq``-token rows, one epoch, Ray Train + DeepSpeed ZeRO-2, 4 logical CPUs.
The figure is the wall time of ``run_training`` (the train stage: Tune, Train workers, model loads,
DeepSpeed, Ray Data tokenization, training, publishing) until every adapter is published.
``trials`` = ``train.trials: per_adapter`` (the baseline), ``packed`` = ``train.trials: packed``.

On a small machine the baseline can be run in chunks (``--chunk K/N``: every N-th culture from
K, so each chunk spans the sizes), one command each; their wall times add up, and ``--state``
collects them. When the state holds every chunk and the packed run (or, with ``--extrapolate``,
some chunks: their seconds per adapter times ``--cultures``, marked ``trials_extrapolated``), the
figures are merged into ``bench/results/train.json``:
``packed_vs_trials_<N>`` (trials wall ÷ packed wall), ``s_per_adapter_packed``, ``s_per_adapter_trials``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def rows_for(i: int) -> int:
    """Synth rows of the i-th culture: 20-200, spread over the range."""
    return 20 + (i * 97) % 181


def write_data(store, cultures: list[str]) -> int:
    from cm_ray.tasks import load_task

    specs = [load_task("offensive"), load_task("survey")]
    total = 0
    for i, c in enumerate(cultures):
        rows = []
        for k in range(rows_for(i)):
            spec = specs[k % 2]
            msgs = spec.messages(spec.examples[k % len(spec.examples)])
            msgs[0]["content"] += f"\nRespondent {k}: answer as people in {c} usually would."
            rows.append({"id": f"{c}-{k}", "culture": c, "task": "bench",
                         "split": "validation" if k % 10 == 9 else "train", "input": msgs[0]["content"],
                         "output": msgs[1]["content"], "messages": msgs, "label": None})
        store.write_table(rows, "synth", f"culture={c}", "task=bench", "part-0.parquet")
        total += len(rows)
    return total


def run_mode(mode: str, cultures: list[str], all_cultures: list[str], model_dir: str, args) -> dict:
    from cm_ray.config import load_config
    from cm_ray.ray_utils import init_ray
    from cm_ray.storage import ArtifactStore
    from cm_ray.train.tune import run_training

    root = tempfile.mkdtemp(prefix=f"cm-ray-bench-pack-{mode}-")
    store = ArtifactStore(root)
    write_data(store, all_cultures)  # same sizes per culture in every chunk
    cfg = load_config(None, [
        f"root={root}", f"cultures=[{', '.join(cultures)}]", "tasks=[bench]", f"models.base={model_dir}",
        "ray.num_cpus=4", "train.joint_baseline=false", "train.lora_r=4", "train.lora_alpha=8",
        "train.epochs=1", "train.batch_size=4", f"train.max_steps={args.max_steps}", f"train.max_seq_len={args.seq}", "train.lr=5.0e-4",
        "train.trials=" + ("packed" if mode == "packed" else "per_adapter")])
    init_ray(cfg)
    t0 = time.time()
    summary = run_training(cfg, store, force=True)
    wall = time.time() - t0
    if summary["failed"] or len(summary["trained"]) != len(cultures):
        raise RuntimeError(f"{mode}: not every adapter trained: {summary['failed']}")
    from cm_ray.artifacts import published_adapter

    pack_s = {}
    for c in cultures:
        m = store.read_json(*published_adapter(store, c)[0], "metrics.json")
        if m.get("pack"):
            pack_s[m["pack"]["index"]] = m["pack"]["seconds"]
    return {"wall_s": round(wall, 1), "adapters": len(cultures), "worker_seconds_per_pack": pack_s or None,
            "packs": summary.get("packs") and
            [len(p) for p in summary["packs"]], "load_avg_end": round(os.getloadavg()[0], 1)}


def tiny_model(out: Path) -> str:
    from scale import build_tiny_model

    return build_tiny_model(out) if not (out / "config.json").exists() else str(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cultures", type=int, default=50)
    p.add_argument("--mode", choices=["both", "trials", "packed"], default="both")
    p.add_argument("--chunk", default="0/1", help="trials: K/N, every N-th culture from K")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--max-steps", type=int, default=4, help="optimizer steps per adapter (0 = one epoch)")
    p.add_argument("--state", default=None, help="JSON collecting the parts of a chunked run")
    p.add_argument("--extrapolate", action="store_true",
                   help="write figures from the trials chunks measured so far, scaled to --cultures")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/cm_ray/torch_extensions"))

    from cm_ray.config import load_config

    all_cultures = load_config(str(REPO / "configs" / "scale.yaml"), []).cultures[:args.cultures]
    model_dir = tiny_model(Path(tempfile.gettempdir()) / "cm-ray-bench-tiny-llama")
    state_path = Path(args.state) if args.state else None
    state = json.loads(state_path.read_text()) if state_path and state_path.exists() else {}
    state.setdefault("trials", {})
    k, n = (int(x) for x in args.chunk.split("/"))
    if args.mode in ("both", "trials"):
        got = run_mode("trials", all_cultures[k::n] if args.mode == "trials" else all_cultures,
                       all_cultures, model_dir, args)
        state["trials"][args.chunk if args.mode == "trials" else "0/1"] = got
        print(f"trials {args.chunk}: {got}", flush=True)
    if args.mode in ("both", "packed"):
        state["packed"] = run_mode("packed", all_cultures, all_cultures, model_dir, args)
        print(f"packed: {state['packed']}", flush=True)
    state["commands"] = state.get("commands", []) + [
        "python bench/train_pack.py " + " ".join(argv if argv is not None else sys.argv[1:])]
    if state_path:
        state_path.write_text(json.dumps(state, indent=2))
    chunks = state["trials"]
    n_chunks = {int(c.split("/")[1]) for c in chunks}
    complete = len(n_chunks) == 1 and len(chunks) == n_chunks.pop()
    if "packed" not in state or not chunks or not (complete or args.extrapolate):
        print("partial run recorded; figures are written when every part is in", flush=True)
        return 0
    sizes = [rows_for(i) for i in range(args.cultures)]
    measured = sum(c["adapters"] for c in chunks.values())
    # Extrapolated (only with --extrapolate): the measured chunks' wall time per adapter, x cultures.
    trials_wall = sum(c["wall_s"] for c in chunks.values()) * args.cultures / measured
    packed_wall = state["packed"]["wall_s"]
    figures = {f"packed_vs_trials_{args.cultures}": round(trials_wall / packed_wall, 2),
               "s_per_adapter_packed": round(packed_wall / args.cultures, 2),
               "s_per_adapter_trials": round(trials_wall / args.cultures, 2),
               "packed_trials": {"cultures": args.cultures, "rows_per_culture": {"min": min(sizes), "max": max(sizes), "total": sum(sizes)},
                                 "trials_wall_s": round(trials_wall, 1), "packed_wall_s": packed_wall,
                                 "trials_parts": chunks, "packed": state["packed"], "seq": args.seq,
                                 "max_steps": args.max_steps, "trials_measured_adapters": measured,
                                 "trials_extrapolated": measured < args.cultures,
                                 "model": "tiny 2-layer Llama", "commands": state["commands"]}}
    out = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {"name": "train", "figures": {}}
    out["figures"].update(figures)
    out["packed_date"] = time.strftime("%Y-%m-%d")
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'mode':<10} {'wall s':>8} {'s/adapter':>10}")
    print(f"{'trials':<10} {trials_wall:>8.1f} {trials_wall / args.cultures:>10.2f}")
    print(f"{'packed':<10} {packed_wall:>8.1f} {packed_wall / args.cultures:>10.2f}")
    print(f"packed_vs_trials_{args.cultures} = {figures[f'packed_vs_trials_{args.cultures}']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
