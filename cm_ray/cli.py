"""``cm-ray`` / ``python -m cm_ray``: run pipeline stages from a config.

    cm-ray run configs/demo.yaml                 # every stage in order, existing outputs skipped
    cm-ray synthesize configs/demo.yaml search.qps=10
    cm-ray train configs/demo.yaml --force
    cm-ray evaluate configs/demo.yaml evaluate.data_dir=../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
import time

COMMANDS = ["run", "synthesize", "train", "route", "serve", "evaluate"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cm-ray", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=COMMANDS)
    p.add_argument("config", help="run YAML, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lora_r=16")
    p.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    p.add_argument("--keep-serving", action="store_true",
                   help="serve/run: keep the Serve app up after the demo request (Ctrl-C stops)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def format_summary(cfg, summaries: dict[str, dict], store_uri: str) -> str:
    """The final table: one line per stage with its key counts, then where artifacts are."""
    lines = [f"cm_ray {cfg.name}  ({cfg.recipe}, {len(cfg.cultures)} cultures: "
             f"{', '.join(cfg.cultures[:8])}{' ...' if len(cfg.cultures) > 8 else ''})",
             f"{'stage':<12} {'status':<9} {'time':>7}  result"]
    for name, s in summaries.items():
        status = s.get("status") or ("skipped" if s.get("skipped") else "done")
        secs = f"{s['seconds']:.0f}s" if isinstance(s.get("seconds"), (int, float)) else "-"
        shown = s.get("headline") or ", ".join(
            f"{k}={v}" for k, v in s.items()
            if k not in {"complete", "stage", "seconds", "skipped", "status", "headline"}
            and isinstance(v, (int, float, str)) and len(str(v)) < 40)
        lines.append(f"{name:<12} {status:<9} {secs:>7}  {shown}")
    lines.append(f"artifacts: {store_uri}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from cm_ray.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"cm-ray: invalid config: {e}", file=sys.stderr)
        return 2

    from cm_ray.stages import StageMissing, pipeline, run_stage
    from cm_ray.storage import ArtifactStore, ensure_bucket

    ensure_bucket(cfg.root)
    store = ArtifactStore(cfg.root)
    summaries: dict[str, dict] = {}
    t0 = time.time()
    rc = 0
    for name in pipeline(cfg, args.command):
        print(f"==> {name}", file=sys.stderr, flush=True)
        kwargs = {"keep_serving": args.keep_serving} if name == "serve" else {}
        try:
            if name == "evaluate" and cfg.evaluate.ablation:
                # The ablation is a driver over the stages (it reruns them per variant), not a stage.
                from cm_ray.eval.ablation import run_ablation

                summaries[name] = run_ablation(cfg, store, force=args.force)
            else:
                summaries[name] = run_stage(name, cfg, store, force=args.force, **kwargs)
        except StageMissing as e:
            print(f"cm-ray: {e}", file=sys.stderr)
            summaries[name] = {"status": "missing", "headline": "not implemented yet"}
            rc = 3
            break
    total = time.time() - t0
    if args.json:
        print(json.dumps({"summaries": summaries, "seconds": total, "root": store.root},
                         indent=2, default=str))
    else:
        print(format_summary(cfg, summaries, store.root))
        print(f"total: {total:.0f}s")
    return rc


def job_main(command: str, description: str | None = None, argv: list[str] | None = None) -> int:
    """Entry point of ``jobs/<command>.py``: ``--config CONFIG [key=value ...] [--force]``."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run YAML, e.g. configs/paper.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lora_r=16")
    p.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    if command == "serve":
        # A job leaves the app deployed on the cluster after its smoke request, unless asked not to.
        p.add_argument("--smoke-only", action="store_true", help="deploy, answer one request, shut down")
    args = p.parse_args(argv)
    forwarded = [command, args.config, *args.overrides] + (["--force"] if args.force else [])
    if command == "serve" and not args.smoke_only:
        forwarded.append("--keep-serving")
    return main(forwarded)


if __name__ == "__main__":
    raise SystemExit(main())
