"""cm-ray (also python -m cm_ray and jobs/<command>.py): run pipeline stages from a config.

    cm-ray run configs/demo.yaml                 # every stage in order, finished stages skipped
    cm-ray synthesize configs/demo.yaml search.qps=10
    cm-ray train configs/demo.yaml --force
    cm-ray evaluate configs/demo.yaml evaluate.data_dir=../shared/data
    cm-ray plan configs/paper.yaml --cluster cluster.yaml   # requests, node types, estimate
    cm-ray status configs/demo.yaml --json       # what is done, stale (and why), missing, failed
    cm-ray export configs/demo.yaml --to out/    # the data as a Hugging Face dataset + card
    cm-ray rehearse configs/paper.yaml --cluster cluster.yaml cultures=[MX,CN]   # the production
                                                 # run on a local cluster shaped like the file

The job scripts take the same arguments (python jobs/train.py --config configs/paper.yaml ...):
each is this entry point with its command filled in.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

COMMANDS = {
    "run": "every stage in order: data, train, route, serve (finished stages are skipped)",
    "synthesize": "the recipe's data stages: queries -> search -> synthesize (or CultureSPA / CLCA data)",
    "train": "one LoRA adapter per culture as parallel Ray Tune trials (Ray Train + DeepSpeed)",
    "route": "fit the culture router (encoder + linear head) on the synthesized inputs",
    "serve": "fit the router if missing, deploy the Ray Serve app, answer one request through it",
    "evaluate": "score base / prompted / joint / culturemanager / oracle on the public benchmarks",
    "ablation": "the paper's ablations as config variants, each through the same stages, one table",
    "plan": "print what every stage will request, where it lands and what it costs; starts nothing",
    "export": "the synthesized data as a Hugging Face dataset (one config per task) with a card",
    "status": "culture x stage table: done / stale (changed field) / missing / failed; starts nothing",
    "rehearse": "the config's whole run on a local cluster shaped like --cluster, with loopback stand-ins; "
                "a report of where everything ran and what degraded (exit 1 on a degradation)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cm-ray", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           title="commands (cm-ray COMMAND --help for its flags)")
    for name, help_ in COMMANDS.items():
        c = sub.add_parser(name, help=help_, description=help_)
        c.add_argument("config", nargs="?", help="run YAML, e.g. configs/demo.yaml")
        c.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.lora_r=16")
        c.add_argument("--config", dest="config_flag", metavar="CONFIG",
                       help="the run YAML, as a flag (what jobs/*.py are given)")
        c.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
        c.add_argument("--json", action="store_true", help="print the summary as JSON")
        if name in ("plan", "rehearse"):
            c.add_argument("--cluster", metavar="FILE",
                           help="cluster.yaml or a KubeRay manifest (default: ray.cluster_config)")
        if name == "rehearse":
            c.add_argument("--workdir", metavar="DIR", help="logs, the rehearsal config and report (default: a temp dir)")
            c.add_argument("--stages", default="synthesize,train,serve,evaluate",
                           help="jobs to run, comma-separated (default: all four)")
            c.add_argument("--down", default="", metavar="PROVIDERS",
                           help="search providers whose stand-ins answer 503 (rehearse an outage)")
        if name == "plan":
            c.add_argument("--connect", metavar="SECONDS", type=float, nargs="?", const=30.0, default=None,
                           help="read the node types of the cluster at ray.address / RAY_ADDRESS "
                                "(default: never connect), giving up after SECONDS (30)")
        if name == "export":
            c.add_argument("--to", metavar="DIR", required=True,
                           help="a new or empty directory outside the artifact root")
            c.add_argument("--overwrite", action="store_true",
                           help="let DIR hold other files: only the export's own files are replaced")
            c.add_argument("--license", default="other",
                           help="license id of the dataset card (a Hub license id; default: other)")
            c.add_argument("--push-to-hub", metavar="REPO",
                           help="also upload it to this Hugging Face dataset repo (token: HF_TOKEN)")
        if name in ("run", "serve"):
            c.add_argument("--keep-serving", action="store_true",
                           help="keep the Serve app up after the demo request: blocks here until "
                                "Ctrl-C on a local cluster, leaves it deployed on a remote one")
            c.add_argument("--smoke-only", dest="keep_serving", action="store_false",
                           help="deploy, answer one request, shut the app down (the default)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    if args.config_flag:
        if args.config:  # with --config, every positional word is an override
            args.overrides.insert(0, args.config)
        args.config = args.config_flag
    if not args.config:
        p.error(f"{args.command}: a config is required (cm-ray {args.command} CONFIG or --config CONFIG)")
    return args


def usage_text(usage: dict | None) -> str:
    """``; 12,345 tokens, $0.0123, 3 retries`` from a stage summary's ``usage`` (empty without)."""
    if not usage:
        return ""
    parts = []
    tokens = (usage.get("prompt_tokens") or 0) + (usage.get("output_tokens") or 0)
    if "prompt_tokens" in usage:
        parts.append(f"{tokens:,} tokens")
    if usage.get("cost_usd"):
        parts.append(f"${usage['cost_usd']:.4f}")
    if "provider_calls" in usage:
        parts.append(f"{usage['provider_calls']} calls")
    parts.append(f"{usage.get('retries') or 0} retries")
    return "; " + ", ".join(parts)


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
            if k not in {"complete", "stage", "seconds", "skipped", "status", "headline", "usage"}
            and isinstance(v, (int, float, str)) and len(str(v)) < 40)
        lines.append(f"{name:<12} {status:<9} {secs:>7}  {shown}{usage_text(s.get('usage'))}")
    lines.append(f"artifacts: {store_uri}")
    return "\n".join(lines)


class InputError(ValueError):
    """Bad input a command found itself (an unknown task, ...): one line, exit code 2."""


def bad_input() -> tuple[type[BaseException], ...]:
    """What the error boundary of ``main`` turns into one line and exit code 2: a config, override,
    cluster file or task spec that cannot be read or is invalid, bookkeeping that cannot be read,
    an export target that must not be written."""
    from cm_ray.config import ConfigError
    from cm_ray.export import ExportTargetError
    from cm_ray.safe_yaml import YAMLInputError
    from cm_ray.storage import UnreadableRecord

    return InputError, ConfigError, YAMLInputError, UnreadableRecord, ExportTargetError


def check_tasks(cfg) -> None:
    """Every task of the config names a spec that loads (``tasks[i]: ...`` when one does not)."""
    from cm_ray.config import ConfigError
    from cm_ray.tasks import load_task

    for i, task in enumerate(cfg.tasks):
        try:
            load_task(task)
        except ConfigError as e:
            raise InputError(f"tasks[{i}]: {e}") from None


def cmd_plan(args, cfg) -> int:
    from cm_ray.plan import run_plan

    code, text = run_plan(cfg, args.cluster, as_json=args.json, connect=args.connect)
    print(text, file=sys.stderr if code else sys.stdout)
    return code


def cmd_export(args, cfg) -> int:
    from cm_ray.export import build_export, push_to_hub
    from cm_ray.storage import ArtifactStore

    try:
        card = build_export(cfg, ArtifactStore(cfg.root), args.to, overwrite=args.overwrite, license=args.license)
        where = push_to_hub(args.to, args.push_to_hub, card["files"]) if args.push_to_hub else None
    except (FileNotFoundError, RuntimeError) as e:
        if isinstance(e, bad_input()):
            raise
        print(f"cm-ray export: {e}", file=sys.stderr)
        return 1
    rows = sum(n for s in card["rows"].values() for per in s.values() for n in per.values())
    print(json.dumps(card, indent=2) if args.json else
          f"{rows} rows, {len(card['rows'])} configs ({', '.join(card['rows'])}) -> {args.to}"
          + (f"; pushed: {where}" if where else ""))
    return 0


def cmd_status(args, cfg) -> int:
    from cm_ray.status import run_status
    from cm_ray.storage import ArtifactStore

    print(run_status(cfg, ArtifactStore(cfg.root), as_json=args.json))
    return 0


def cmd_stages(args, cfg) -> int:
    """run / synthesize / train / route / serve / evaluate / ablation: the stages, then the table."""
    from cm_ray.stages import pipeline, run_stage
    from cm_ray.storage import ArtifactStore, ensure_bucket

    from cm_ray.fingerprints import Records
    from cm_ray.stages import STAGES

    ensure_bucket(cfg.root)
    store = ArtifactStore(cfg.root)
    records = Records(store)
    for name in STAGES:  # bookkeeping that cannot be read stops the run before any stage starts
        records.get(name)
        store.read_manifest(name)
    t0 = time.time()
    if args.command == "ablation" or (args.command == "evaluate" and cfg.evaluate.ablation):
        from cm_ray.eval.ablation import run_ablation

        summaries = {"ablation": run_ablation(cfg, store, force=args.force)}
    else:
        from cm_ray.checks import DegradedError

        summaries = {}
        for name in pipeline(cfg, args.command):
            print(f"==> {name}", file=sys.stderr, flush=True)
            kwargs = {"keep_serving": args.keep_serving} if name == "serve" else {}
            try:
                summaries[name] = run_stage(name, cfg, store, force=args.force, **kwargs)
            except DegradedError as e:  # outputs and summary saved; cm-ray status shows the cells
                print(f"cm-ray: {e}", file=sys.stderr)
                return 1
    total = time.time() - t0
    if args.json:
        print(json.dumps({"summaries": summaries, "seconds": total, "root": store.root},
                         indent=2, default=str))
    else:
        print(format_summary(cfg, summaries, store.root))
        print(f"total: {total:.0f}s")
    return 0


def cmd_rehearse(args, cfg) -> int:
    from cm_ray.rehearsal import report
    from cm_ray.rehearsal.run import JOBS, rehearse
    from cm_ray.rehearsal.standins import check_overrides

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    if unknown := [s for s in stages if s not in JOBS]:
        raise InputError(f"--stages: unknown {', '.join(unknown)} (jobs: {', '.join(JOBS)})")
    try:
        check_overrides(args.overrides)
    except ValueError as e:
        raise InputError(str(e)) from None
    code, rep = rehearse(args.config, args.cluster, args.overrides, stages=stages, workdir=args.workdir,
                         web_down=tuple(p for p in args.down.split(",") if p))
    print(json.dumps(rep, indent=2, default=str) if args.json else report.format_md(rep))
    print(report.summary_line(rep))
    return code


HANDLERS = {"plan": cmd_plan, "export": cmd_export, "status": cmd_status, "rehearse": cmd_rehearse}
"""Command -> handler(args, cfg) -> exit code; every other command of COMMANDS runs stages."""


def main(argv: list[str] | None = None) -> int:
    """Parse, load the config, run the command; the one error boundary: bad input (``bad_input``)
    is one line on stderr naming the file or field, exit code 2, never a traceback."""
    args = parse_args(argv)
    from cm_ray.config import ConfigError, load_config

    try:
        try:
            cfg = load_config(args.config, args.overrides)
        except ConfigError as e:
            raise ConfigError(f"invalid config: {e}") from None
        check_tasks(cfg)
        return HANDLERS.get(args.command, cmd_stages)(args, cfg)
    except bad_input() as e:
        print(f"cm-ray {args.command}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def job_main(command: str, argv: list[str] | None = None) -> int:
    """``jobs/<command>.py``: this CLI with the command filled in (same flags). A serve job leaves
    the app deployed on the cluster after its smoke request unless given ``--smoke-only``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main([command, *(["--keep-serving"] if command == "serve" else []), *argv])


if __name__ == "__main__":
    raise SystemExit(main())
