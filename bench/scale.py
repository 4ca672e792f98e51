"""Scale: every stage over 10 / 50 / 200 cultures with a tiny model; time per culture, driver memory.

Each point runs in a fresh subprocess (the driver: the process that runs the stages), so memory
peaks do not carry over. A thread samples the driver's RSS (psutil) every 0.1 s and the 1-minute
load average, and attributes each sample to the stage running then. Stages, as the CLI runs them:

  queries -> search (BM25, shipped corpus) -> synthesize (guided JSON) -> train (the scale config
  packs the cultures by token count into a few trials, many adapters per base-model load:
  `train.trials: packed`) -> route (router over all cultures) -> serve (the app `cm-ray serve`
  builds, `serve.max_adapters_per_replica` adapters per replica, LRU)

The generator and the adapters' base are a 2-layer random Llama with SmolLM2's tokenizer (built
once, in the parent). ``--train-cap K`` trains only K cultures per point, spread evenly over the
list (with one trial per culture, each costs 20-30 s of worker start-up on 2 cores); 0, the
default, trains all. ``--merge`` keeps the points of the existing results file that this run
does not measure (each point carries its own date). Serve then answers
requests pinned to the trained cultures in two cyclic rounds: with more of them than the replica
holds, every request of the second round must report ``X-Adapter-Cold: 1`` (LRU eviction).

``s_per_culture_N`` = sum over the stages of (stage seconds / cultures that stage processed): N for
queries, search, synthesize and route, the trained count for train; serve (deploy + requests) is a
fixed cost and reported apart. Linear time = flat s_per_culture; flat memory = flat driver peak.

    python bench/scale.py --points 200                          # every culture trained (packed)
    python bench/scale.py --points 10 50 --merge                # the smaller points, kept beside it
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE = ["queries", "search", "synthesize", "train", "route"]
PER_CULTURE_STAGES = ["queries", "search", "synthesize", "route"]


def spread(items: list, k: int) -> list:
    """``k`` items spread evenly over ``items`` (first and last included); k <= 0 or >= len: all."""
    n = len(items)
    if k <= 0 or k >= n:
        return list(items)
    if k == 1:
        return [items[0]]
    return [items[round(i * (n - 1) / (k - 1))] for i in range(k)]


def per_culture_seconds(seconds: dict[str, float], units: dict[str, int]) -> float:
    """Sum over stages of seconds / cultures processed (stages without units are left out)."""
    return sum(seconds[s] / units[s] for s in seconds if units.get(s))


class Sampler(threading.Thread):
    """Peak RSS of this process (overall and per stage label) and mean load average."""

    def __init__(self, interval: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.label, self.peak, self.loads = "start", {}, []
        self._halt = threading.Event()

    def run(self) -> None:
        last_load = 0.0
        while not self._halt.is_set():
            rss = self.proc.memory_info().rss / 2**20
            self.peak[self.label] = max(self.peak.get(self.label, 0.0), rss)
            if time.monotonic() - last_load >= 5:
                self.loads.append(os.getloadavg()[0])
                last_load = time.monotonic()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def build_tiny_model(out: Path) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template (as tests/conftest.py)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cm_ray.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("embedded:smollm2-135m-instruct"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 300) -> tuple[int, dict, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read() or b"{}")


def serve_check(cfg, store, pinned: list[str], untrained: str | None) -> dict:
    """Deploy the app (``build_app``, as the serve stage does), send pinned and routed requests."""
    from ray import serve

    from cm_ray.serve.app import build_app

    s = cfg.serve
    t0 = time.time()
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(build_app(cfg), name=s.app_name, route_prefix="/", blocking=False)
    deploy_s = time.time() - t0
    url = f"http://{s.host}:{s.port}/v1/chat/completions"
    out: dict = {"deploy_s": round(deploy_s, 1), "errors": 0}
    try:
        t1 = time.time()
        rounds = []
        for _ in range(2):  # cyclic order: with more adapters than slots, LRU evicts every one
            cold = []
            for c in pinned:
                code, h, _ = _post(url, {"model": c, "max_tokens": 4,
                                         "messages": [{"role": "user", "content": f"Hello from {c}"}]})
                out["errors"] += code != 200
                cold.append(h.get("x-adapter-cold") == "1" and h.get("x-culture") == c)
            rounds.append(cold)
        out["pinned_requests"] = 2 * len(pinned)
        out["cold_first_round"] = sum(rounds[0])
        out["cold_second_round"] = sum(rounds[1])
        out["lru_evicted"] = len(pinned) > s.max_adapters_per_replica and all(rounds[1])
        handle = serve.get_deployment_handle("AdapterServer", app_name=s.app_name)
        out["adapters_loaded_after"] = len(handle.loaded_adapters.remote().result())
        # Routed requests: the router chooses among all N cultures; those without an adapter
        # fall back to the base model.
        routed = {}
        rows = store.read_table("synth").select(["culture", "input"]).to_pylist()
        for r in spread(rows, 6):
            code, h, body = _post(url, {"model": "auto", "max_tokens": 4,
                                        "messages": [{"role": "user", "content": r["input"]}]})
            out["errors"] += code != 200
            by = h.get("x-routed-by", f"http_{code}")
            routed[by] = routed.get(by, 0) + 1
        out["routed_by"] = routed
        if untrained:
            code, _, _ = _post(url, {"model": untrained, "max_tokens": 4,
                                     "messages": [{"role": "user", "content": "hi"}]})
            out["untrained_pinned_status"] = code
        out["requests_s"] = round(time.time() - t1, 1)
    finally:
        serve.delete(s.app_name)
        serve.shutdown()
    return out


def search_coverage(store, cultures: list[str]) -> dict:
    """Cultures whose queries all found passages, and cultures with no passage of their own."""
    from cm_ray.data.providers import load_corpus

    own = {(p.get("culture") or "").upper() for p in load_corpus(None)} - {""}
    with_hits = 0
    for c in cultures:  # one partition at a time: the check keeps driver memory flat too
        rows = store.read_table("search", "results", f"culture={c}").select(["hits"]).to_pylist()
        with_hits += all(r["hits"] for r in rows)
    return {"cultures_all_queries_hit": with_hits,
            "cultures_without_own_passages": sum(c not in own for c in cultures)}


def run_point(args) -> dict:
    """One scale point, in this (fresh) process: every stage over the first ``args.point`` cultures."""
    from cm_ray.config import load_config
    from cm_ray.ray_utils import init_ray
    from cm_ray.stages import run_stage
    from cm_ray.storage import ArtifactStore

    sampler = Sampler()
    sampler.start()
    root = tempfile.mkdtemp(prefix=f"cm-ray-scale-{args.point}-")
    cfg = load_config(args.config, [f"root={root}", f"models.generator={args.model}",
                                    f"models.base={args.model}", f"serve.port={_free_port()}"])
    cultures = cfg.cultures[:args.point]
    if len(cultures) < args.point:
        raise SystemExit(f"{args.config} lists {len(cfg.cultures)} cultures, fewer than {args.point}")
    cfg = cfg.replace(cultures=cultures)
    trained = spread(cultures, args.train_cap)
    store = ArtifactStore(root)
    seconds, summaries = {}, {}
    t_all = time.time()
    try:
        sampler.label = "ray_init"
        init_ray(cfg, dashboard_port=_free_port())
        for stage in PIPELINE:
            sampler.label = stage
            stage_cfg = cfg.replace(cultures=trained) if stage == "train" else cfg
            t0 = time.time()
            summaries[stage] = run_stage(stage, stage_cfg, store)
            seconds[stage] = time.time() - t0
            print(f"[scale {args.point}] {stage}: {seconds[stage]:.1f}s  "
                  f"{summaries[stage].get('headline', '')}", file=sys.stderr, flush=True)
        sampler.label = "serve"
        t0 = time.time()
        untrained = next((c for c in cultures if c not in trained), None)
        try:
            # Pinned requests to 8 trained cultures (twice the replica's slots: LRU evicts).
            serve = serve_check(cfg, store, spread(trained, 2 * cfg.serve.max_adapters_per_replica), untrained)
        except Exception as e:  # recorded: the stage timings above still count
            serve = {"error": f"{type(e).__name__}: {e}"[:500]}
        seconds["serve"] = time.time() - t0
        sampler.label = "checks"
        try:
            coverage = search_coverage(store, cultures)
        except Exception as e:
            coverage = {"coverage_error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        import ray

        ray.shutdown()
        sampler.stop()
    units = {s: len(cultures) for s in PER_CULTURE_STAGES} | {"train": len(trained)}
    stage_peaks = {k: round(v, 1) for k, v in sampler.peak.items()}
    return {
        "cultures": len(cultures), "trained": len(trained), "wall_s": round(time.time() - t_all, 1),
        "s_per_culture": round(per_culture_seconds(seconds, units), 3),
        "stage_s": {k: round(v, 1) for k, v in seconds.items()},
        "stage_s_per_culture": {k: round(seconds[k] / units[k], 3) for k in units},
        "driver_peak_mb": max(v for k, v in stage_peaks.items() if k != "checks"),
        "driver_peak_mb_per_stage": stage_peaks,
        "load_avg_mean": round(sum(sampler.loads) / max(1, len(sampler.loads)), 1),
        "queries": summaries["queries"]["queries"], "search_hits": summaries["search"]["hits"],
        "synth_rows": summaries["synthesize"]["rows"],
        "synth_kept_fraction": summaries["synthesize"]["kept_fraction"],
        "train_failed": sorted(summaries["train"].get("failed") or {}),
        "train_trained_ok": len(summaries["train"].get("trained") or []),
        "train_packs": [len(p) for p in summaries["train"].get("packs") or []] or None,
        "router_cultures": summaries["route"]["cultures"], **coverage, "serve": serve}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, nargs="+", default=[10, 50, 200], help="culture counts")
    p.add_argument("--train-cap", type=int, default=0,
                   help="cultures trained per point, spread over the list (0 = all)")
    p.add_argument("--config", default=str(REPO / "configs" / "scale.yaml"))
    p.add_argument("--model", default=None, help="generator/base dir (default: build the tiny Llama)")
    p.add_argument("--point-timeout", type=float, default=3600)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    p.add_argument("--merge", action="store_true", help="keep the other points of the results file")
    p.add_argument("--point", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.point is not None:
        Path(args.result).write_text(json.dumps(run_point(args)))
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_TRAIN_V2_ENABLED": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(Path.home() / ".cache/cm_ray/torch_extensions"))}
    tmp = Path(tempfile.mkdtemp(prefix="cm-ray-scale-"))
    model = args.model or build_tiny_model(tmp / "tiny-llama")
    points: dict[int, dict] = {}
    for n in args.points:
        result = tmp / f"point-{n}.json"
        cmd = [sys.executable, __file__, "--point", str(n), "--result", str(result), "--model", model,
               "--config", args.config, "--train-cap", str(args.train_cap)]
        load0 = os.getloadavg()[0]
        try:
            rc = subprocess.run(cmd, env=env, timeout=args.point_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0 or not result.exists():
            print(f"point {n} failed (exit {rc})", file=sys.stderr)
            continue
        points[n] = json.loads(result.read_text())
        points[n]["load_avg_at_start"] = round(load0, 1)
        points[n]["date"] = time.strftime("%Y-%m-%d")
        print(f"[scale] {n} cultures: {json.dumps(points[n])}", file=sys.stderr, flush=True)
        write_results(args, argv, points)
    if not points:
        return 1
    figures = write_results(args, argv, points)
    print(f"{'cultures':>8} {'trained':>7} {'wall s':>7} {'s/culture':>9} {'peak MB':>8} {'load':>5}  "
          + " ".join(f"{s[:6]:>7}" for s in [*PIPELINE, "serve"]))
    for n, r in points.items():
        print(f"{n:>8} {r['trained']:>7} {r['wall_s']:>7.0f} {r['s_per_culture']:>9.2f} "
              f"{r['driver_peak_mb']:>8.0f} {r['load_avg_mean']:>5.1f}  "
              + " ".join(f"{r['stage_s'].get(s, 0):>7.0f}" for s in [*PIPELINE, "serve"]))
    lo, hi = min(points), max(points)
    if lo != hi:
        print(f"growth {lo}->{hi}: s_per_culture x{figures['s_per_culture_growth']}, "
              f"driver peak x{figures['driver_peak_growth']}")
    print(f"wrote {args.out}")
    return 0


def write_results(args, argv, points: dict[int, dict]) -> dict:
    """bench/results/scale.json from the points done so far (rewritten after each point)."""
    figures: dict = {}
    if not points:
        return figures
    measured = dict(points)
    if args.merge and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        kept = {int(n): {"date": old.get("date"), "train_cap": old["figures"].get("train_cap"), **r}
                for n, r in old["figures"].get("points", {}).items() if int(n) not in points}
        points = dict(sorted({**kept, **points}.items()))
    for n, r in points.items():
        figures[f"s_per_culture_{n}"] = r["s_per_culture"]
        figures[f"driver_peak_mb_{n}"] = round(r["driver_peak_mb"], 1)
    lo, hi = min(measured), max(measured)  # growth: over the points of this run only
    if lo != hi:
        figures["s_per_culture_growth"] = round(measured[hi]["s_per_culture"] / measured[lo]["s_per_culture"], 3)
        figures["driver_peak_growth"] = round(measured[hi]["driver_peak_mb"] / measured[lo]["driver_peak_mb"], 3)
    figures["train_cap"] = args.train_cap
    figures["train_trials"] = "packed"  # configs/scale.yaml: train.trials
    figures["points"] = {str(n): r for n, r in points.items()}
    out = {"name": "scale", "date": time.strftime("%Y-%m-%d"),
           "command": "python bench/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": f"{os.cpu_count()} cores, no GPU (shared)", "figures": figures}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
