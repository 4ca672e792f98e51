"""Per-stage time and cost of a run config, from MEASURED throughput only (cm_ray/estimate.py).

Reads the figures in bench/results/*.json and the counts a config implies (cultures x tasks x
queries, prompts x samples x tokens, epochs, GPUs) and prints, per stage, the work, the measured
figure used, the time and the cost. Prices are INPUTS (flags), not measurements. A stage whose
throughput was never measured on the config's hardware is printed as unavailable, with the bench
command that would measure it: no figure is guessed, and no model size or CPU figure is scaled to
another model or to a GPU.

The figures it reads are listed in cm_ray/estimate.py.

    python bench/estimate.py                                   # configs/paper.yaml
    python bench/estimate.py --config configs/paper.yaml --gpu-hour-usd 2.5 --gpus 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cm_ray.estimate import estimate, load_results  # noqa: E402  (the arithmetic lives in the package)


def main(argv: list[str] | None = None) -> int:
    from cm_ray.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "paper.yaml"))
    p.add_argument("--results", default=str(REPO / "bench" / "results"))
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the cluster (input)")
    p.add_argument("--gpu-hour-usd", type=float, default=3.0, help="price of one GPU-hour (input)")
    p.add_argument("--cpu-node-hour-usd", type=float, default=0.5, help="price of the CPU head node per hour (input)")
    p.add_argument("--search-per-1k-usd", type=float, default=0.0,
                   help="search provider price per 1,000 queries (input; 0 = self-hosted SearXNG)")
    p.add_argument("--serve-rps", type=float, default=10.0, help="traffic to size Serve for (input)")
    p.add_argument("--tokens-per-sample", type=int, default=None,
                   help="training tokens per sample (default: synthesis.max_new_tokens, an upper bound)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "estimate.json"))
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    prices = {"gpus": args.gpus, "gpu_hour_usd": args.gpu_hour_usd, "cpu_node_hour_usd": args.cpu_node_hour_usd,
              "search_per_1k_usd": args.search_per_1k_usd, "serve_rps": args.serve_rps}
    results = load_results(Path(args.results))
    est = estimate(cfg, results, prices, args.tokens_per_sample)
    print(f"estimate for {args.config}: {est['counts']['cultures']} cultures x {est['counts']['tasks']} tasks")
    print("prices are INPUTS, not measurements: " + ", ".join(f"{k}={v}" for k, v in prices.items()))
    print(f"{'stage':<11} {'hours':>8} {'USD':>9}  work / figure used")
    for r in est["rows"]:
        hours = f"{r['hours']:.2f}" if r["hours"] is not None else "-"
        usd = f"{r['usd']:.2f}" if r["usd"] is not None else "-"
        print(f"{r['stage']:<11} {hours:>8} {usd:>9}  {r['work']}")
        for k, v in r["figures_used"].items():
            print(f"{'':<31}uses {k} = {v}")
        if r["missing"]:
            print(f"{'':<31}UNAVAILABLE: not measured: {', '.join(r['missing'])}")
            for cmd in r["how_to_measure"]:
                print(f"{'':<31}  measure with: {cmd}")
        if r["note"]:
            print(f"{'':<31}{r['note']}")
    print(f"total of the stages with a measured figure: {est['total_hours_available']:.2f} h, "
          f"{est['total_usd_available']:.2f} USD; unavailable: {', '.join(est['stages_unavailable']) or 'none'}")
    if est["reference_not_applicable"]:
        print("measured on other hardware or models (context only, not used above):")
        for k, v in est["reference_not_applicable"].items():
            print(f"  {k} = {v['value']}  ({v['machine']})")
    est["results_read"] = {k: {"machine": v["machine"], "date": v["date"]} for k, v in results.items()}
    out = {"name": "estimate", "date": time.strftime("%Y-%m-%d"),
           "command": "python bench/estimate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": "computed (no run)", "figures": est}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
