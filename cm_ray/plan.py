"""``cm-ray plan CONFIG``: what each stage will ask Ray for, where it lands, what it costs; starts nothing.

    cm-ray plan configs/paper.yaml                       # node types from ray.cluster_config
    cm-ray plan configs/paper.yaml --cluster cluster.yaml --json
    cm-ray plan configs/paper.yaml --connect 20          # the cluster at ray.address, 20 s to answer

Per stage: the requests of ``cm_ray.resources`` (actors / trial worker groups / replicas, their
bundles, how many at once, CPU and GPU totals) and the node types of the cluster config that can
host each bundle (GPU-bound requests must land on a GPU node type); the work (cultures x tasks x
partitions, adapters, trials); and the time/cost estimate of ``cm_ray.estimate`` from measured
figures, the unmeasured ones named. A request no node type can hold is an error naming the stage
and the resource. Without a cluster file or a running cluster to join, the plan is for the local
cluster ``cm-ray run`` would start (one node, ``ray.num_cpus`` CPUs, no GPUs). ``ray.address`` /
``RAY_ADDRESS`` is contacted only with ``--connect``, which gives up after its timeout with a message.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

from cm_ray.cluster import Cluster, NodeType, discover, load_cluster_file
from cm_ray.resources import PlacementError, check, stage_requests


def plan_cluster(cfg, cluster_file: str | None = None, connect: float | None = None) -> Cluster:
    """The cluster to plan for: ``--cluster``, ``ray.cluster_config``, the cluster at ``ray.address``
    (only with ``connect``: seconds to wait for it), or the local cluster ``cm-ray run`` starts."""
    path = cluster_file or cfg.ray.cluster_config
    if path:
        return load_cluster_file(path)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address and connect is not None:
        return _connect(cfg, address, connect)
    cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
    source = "local cluster (ray.init)" + (f"; {address} not contacted (--connect plans for it)" if address else "")
    return Cluster([NodeType("local", {"CPU": float(cpus)}, head=True)], source)


def _connect(cfg, address: str, timeout_s: float) -> Cluster:
    """Join the cluster at ``address`` and read its node types, or TimeoutError after ``timeout_s``."""
    netloc = urlsplit(address if "://" in address else f"ray://{address}").netloc
    host, _, port = netloc.rpartition(":")
    if host and port.isdigit():  # refused or unroutable: say so now rather than let ray.init retry
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
        except OSError as e:
            raise TimeoutError(f"ray.address {address}: cannot reach it ({e.strerror or e})") from None
    got: dict = {}

    def join() -> None:
        try:
            from cm_ray.ray_utils import init_ray

            init_ray(cfg)
            got["cluster"] = discover()
        except Exception as e:  # noqa: BLE001 - reported by the caller
            got["error"] = e

    worker = threading.Thread(target=join, daemon=True, name="plan-connect")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(f"ray.address {address}: no Ray cluster answered within {timeout_s:g} s "
                           f"(--connect SECONDS waits longer; --cluster FILE plans from a cluster file)")
    if "error" in got:
        raise TimeoutError(f"ray.address {address}: cannot join: {got['error']}")
    return got["cluster"]


def work_counts(cfg) -> dict:
    """Partitions each stage writes and the adapters it trains."""
    from cm_ray.train.tune import adapter_names

    pairs = len(cfg.cultures) * len(cfg.tasks)
    adapters = adapter_names(cfg)
    return {"cultures": len(cfg.cultures), "tasks": len(cfg.tasks), "recipe": cfg.recipe,
            "query_partitions": pairs if cfg.recipe == "culturemanager" else 0,
            "search_partitions": pairs if cfg.recipe == "culturemanager" else 0,
            "synth_partitions": pairs, "adapters": len(adapters), "trials": len(adapters)}


def make_plan(cfg, cluster_file: str | None = None, prices: dict | None = None,
              connect: float | None = None) -> dict:
    """The plan as data (``--json``); raises ``PlacementError`` for a request nothing can host."""
    from cm_ray.estimate import RESULTS_DIR, estimate, load_results

    cluster = plan_cluster(cfg, cluster_file, connect)
    work = work_counts(cfg)
    requests = stage_requests(cfg, cluster, work["trials"])
    check(requests, cluster)
    stages = []
    for r in requests:
        hosts = sorted({h for b in r.placed() for h in cluster.hosts(b)})
        stages.append(r.to_dict() | {"node_types": hosts,
                                     "gpu_node_types": [h for h in hosts if _gpus(cluster, h) > 0]})
    max_res = cluster.max_resources()
    prices = {"gpus": int(max_res.get("GPU", 0)), "gpu_hour_usd": 3.0, "cpu_node_hour_usd": 0.5,
              "search_per_1k_usd": 0.0, "serve_rps": 10.0, **(prices or {})}
    est = estimate(cfg, load_results(RESULTS_DIR), prices)
    return {"config": cfg.name, "cluster": {"source": cluster.source, "max_resources": max_res,
                                            "node_types": [vars(t) for t in cluster.node_types]},
            "work": work, "stages": stages, "estimate": est}


def _gpus(cluster: Cluster, name: str) -> float:
    return next(t.resources.get("GPU", 0.0) for t in cluster.node_types if t.name == name)


def _fmt(res: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in res.items() if k in ("CPU", "GPU")) or "-"


def format_plan(plan: dict) -> str:
    """The plan as the table ``cm-ray plan`` prints."""
    w, c = plan["work"], plan["cluster"]
    lines = [f"plan for {plan['config']}: {w['cultures']} cultures x {w['tasks']} tasks ({w['recipe']}); "
             f"partitions: queries {w['query_partitions']}, search {w['search_partitions']}, "
             f"synth {w['synth_partitions']}; {w['adapters']} adapters",
             f"cluster: {c['source']} — at most {_fmt(c['max_resources'])}",
             f"{'stage':<10} {'request':<44} {'at once':>7}  {'per group':<24} {'total':<16} lands on"]
    for s in plan["stages"]:
        b = s["bundles"]
        per = ("driver" if not b else _fmt(b[0]) if len(b) == 1 else
               f"{len(b)} x ({_fmt(b[0])})" if all(x == b[0] for x in b) else " + ".join(map(_fmt, b)))
        lands = ", ".join(s["node_types"]) or "(driver)"
        lines.append(f"{s['stage']:<10} {s['what'][:44]:<44} {s['count']:>7}  {per[:24]:<24} "
                     f"{_fmt(s['totals'])[:16]:<16} {lands}" + (f"  [{s['note']}]" if s["note"] else ""))
    est = plan["estimate"]
    lines.append("estimate (measured figures only; prices are inputs):")
    for r in est["rows"]:
        if r["hours"] is not None:
            lines.append(f"  {r['stage']:<10} {r['hours']:>8.2f} h {r['usd']:>9.2f} USD  {r['work']}")
        else:
            why = f"not measured: {', '.join(r['missing'])}" if r["missing"] else r["note"]
            lines.append(f"  {r['stage']:<10} {'-':>8}   {'-':>9}      {r['work']} — {why}")
    lines.append(f"  total of measured stages: {est['total_hours_available']:.2f} h, "
                 f"{est['total_usd_available']:.2f} USD; unavailable: "
                 f"{', '.join(est['stages_unavailable']) or 'none'}")
    return "\n".join(lines)


def run_plan(cfg, cluster_file: str | None = None, as_json: bool = False,
             connect: float | None = None) -> tuple[int, str]:
    """(exit code, text) for the CLI: 2 and one line for a request nothing can host, a cluster file
    that cannot be read, a cluster that does not answer."""
    import json

    try:
        plan = make_plan(cfg, cluster_file, connect=connect)
    except PlacementError as e:
        return 2, f"cm-ray plan: cannot place: {e}"
    except (OSError, ValueError) as e:
        return 2, "cm-ray plan: " + " ".join(str(e).split())
    return 0, json.dumps(plan, indent=2, default=str) if as_json else format_plan(plan)


def gpu_stages(plan: dict) -> dict[str, list[str]]:
    """GPU-bound requests and the node types they land on (for checks and the README)."""
    return {f"{s['stage']}: {s['what']}": s["node_types"] for s in plan["stages"] if s["gpu_bound"]}

