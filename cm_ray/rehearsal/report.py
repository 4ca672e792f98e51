"""The rehearsal report: what ran where, what degraded, and whether a user would accept it.

``build`` reads what the run left: each stage's manifest under the root (its summary, with its
``per_culture`` counts and its ``degradations``: ``cm_ray.checks``), the placements Ray's state API
shows after each job, the answers served over HTTP, the credentials each node type got. Every
degradation is judged against the *production* config's ``checks`` thresholds (the rehearsal
itself runs with ``checks.fail: false`` so that every stage runs). A failure is any of: a job that
failed, a partition a stage gave up on (an adapter that did not train), a degradation past its threshold, a placement on a node type that does not declare what it
asked for, a served answer from another engine than ``serve.engine`` or a refused request, a node
type started without a credential the config needs. ``format_md`` renders it; ``save`` writes
``rehearsal.md`` and ``rehearsal.json`` under the root.
"""

from __future__ import annotations

import json
from collections import Counter

from cm_ray import checks

STAGES = ("queries", "search", "synthesize", "culturespa", "clca", "train", "route", "serve", "evaluate")
LIMITATIONS = ("speed and memory on real GPUs: the work runs on CPU underneath, with a small stand-in model",
               "CUDA-only code paths (bf16 kernels, NCCL, CUDA graphs): their CPU stand-ins run instead",
               "the real providers' ranking and content: the stand-ins answer in their documented formats",
               "autoscaling up from zero: the nodes are started up front, a few of each type")


def new_placements(cluster, cluster_file: str, seen: set) -> list[dict]:
    """Placements that appeared since the last call (by Ray's ids), each listed once."""
    from cm_ray.rehearsal.placement import placements

    out = []
    for r in placements(cluster.dashboard_url, cluster_file):
        key = (r["kind"], r.get("id") or (r["name"], r["node_id"], json.dumps(r["requested"], sort_keys=True)))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _placement_rows(rows: list[dict]) -> list[dict]:
    """Placements grouped by (kind, name, node type, request, ok), counted."""
    groups = Counter((r["kind"], r["name"], r["node_type"], json.dumps(r["requested"], sort_keys=True), r["ok"])
                     for r in rows if r["node_id"])
    return [{"kind": k, "name": n, "node_type": t, "requested": json.loads(req), "ok": ok, "count": c}
            for (k, n, t, req, ok), c in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))]


def build(*, prod, cfg, store, jobs, placed, served, stand_ins, need, provisioned, web, specs,
          cluster_file, config_file, seconds, unchecked) -> dict:
    from cm_ray.rehearsal.placement import placement_degradation
    from cm_ray.rehearsal.secrets import missing
    from cm_ray.rehearsal.secrets import provisioned as provision

    stages, degradations, failures = {}, [], []
    for name in STAGES:
        m = store.read_manifest(name)
        if not m:
            continue
        stages[name] = {"headline": m.get("headline"), "seconds": m.get("seconds"),
                        "per_culture": m.get("per_culture") or {}}
        failed = m.get("failed") if isinstance(m.get("failed"), dict) else {}  # partitions it gave up on
        failed.update({k: "no data" for k in m.get("no_data") or []})
        if failed:
            failures.append({"stage": name, "cultures": sorted(k.split("/")[0] for k in failed),
                             "what": "; ".join(f"{k}: {(str(v).strip().splitlines() or [''])[-1]}"
                                               for k, v in sorted(failed.items()))[:600]})
        degradations += [{**d, "stage": name} for d in m.get("degradations") or []]
    for job, rows in placed.items():
        if rows:
            degradations.append({**placement_degradation(rows, job), "stage": job})
    if served:
        wrong = [s for s in served if s.get("status") == 200 and s.get("engine") != cfg.serve.engine]
        ok = [s for s in served if s.get("status") == 200]
        if ok:
            degradations.append({**checks.degradation(
                "wrong_engine", "serve", len(wrong), len(ok),
                f"answers by {dict(Counter(s.get('engine') for s in ok))}, serve.engine {cfg.serve.engine}"),
                "stage": "serve"})
        refused = [s for s in served if s.get("status") != 200]
        if refused:
            failures.append({"stage": "serve", "cultures": sorted(s["model"] for s in refused),
                             "what": f"{len(refused)} of {len(served)} requests refused: {refused[0].get('error')}"})
    over = checks.over_threshold(prod.checks, degradations)
    for d in over:
        failures.append({"stage": d.get("stage"), "cultures": [d["culture"]], "what": checks.describe(d)})
    for j in jobs:
        if not j["ok"]:
            failures.append({"stage": j["job"], "cultures": [], "what": f"job failed: {j['error']}"})
    for node_type, names in missing(need, provision(provisioned)).items():
        failures.append({"stage": "cluster", "cultures": [],
                         "what": f"node type {node_type} is given none of {', '.join(names)} ({cluster_file})"})
    return {"config": config_file, "cluster_file": cluster_file, "root": cfg.root, "seconds": seconds,
            "cultures": cfg.cultures, "tasks": cfg.tasks, "passed": not failures, "failures": failures,
            "nodes": [{"name": s.name, "node_type": s.node_type, "resources": s.resources} for s in specs],
            "jobs": jobs, "stages": stages, "degradations": degradations,
            "placements": {job: _placement_rows(rows) for job, rows in placed.items()},
            "served": served, "secrets_needed": need, "web": web,
            "stand_ins": [s.as_dict() for s in stand_ins], "unchecked_overrides": unchecked,
            "cannot_tell": list(LIMITATIONS)}


def _cell(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_cell(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def format_md(rep: dict) -> str:
    out = [f"# Rehearsal: {rep['config']} on {rep['cluster_file']}", "",
           f"**{'PASSED' if rep['passed'] else 'FAILED'}** in {rep['seconds']:.0f} s; cultures "
           f"{', '.join(rep['cultures'])}; tasks {', '.join(rep['tasks'])}; root {rep['root']}", ""]
    if rep["failures"]:
        out += ["## Failures", ""] + [f"- **{f['stage']}**" + (f" ({', '.join(f['cultures'])})" if f["cultures"] else "")
                                      + f": {f['what']}" for f in rep["failures"]] + [""]
    out += ["## Stand-ins", "", "| what | production | rehearsal | why |", "|---|---|---|---|"]
    out += [f"| {s['what']} | {s['production']} | {s['rehearsal']} | {s['why']} |" for s in rep["stand_ins"]]
    if rep["unchecked_overrides"]:
        out += ["", "Overrides set to provoke a degradation: " + ", ".join(rep["unchecked_overrides"])]
    out += ["", "## Nodes", ""] + [f"- {n['name']} ({n['node_type']}): {_cell(n['resources'])}" for n in rep["nodes"]]
    out += ["", "## Jobs", "", "| job | result | seconds |", "|---|---|---|"]
    out += [f"| {j['job']} | {'ok' if j['ok'] else 'FAILED'} | {j['seconds']:.0f} |" for j in rep["jobs"]]
    out += ["", "## Placements", ""]
    for job, rows in rep["placements"].items():
        out += [f"### {job}", "", "| kind | name | node type | requested | n | ok |", "|---|---|---|---|---|---|"]
        out += [f"| {r['kind']} | {r['name']} | {r['node_type']} | {_cell(r['requested'])} | {r['count']} | "
                f"{'yes' if r['ok'] else '**NO**'} |" for r in rows] + [""]
    out += ["## Per culture", ""]
    for name, st in rep["stages"].items():
        out += [f"### {name}: {st.get('headline') or ''}", ""]
        for c, row in (st["per_culture"] or {}).items():
            out.append(f"- {c}: {_cell(row)}")
        out.append("")
    out += ["## Degradations", ""] + ([f"- {d['stage']}: {checks.describe(d)}" for d in rep["degradations"]
                                       if d["bad"]] or ["none"])
    if rep["served"]:
        out += ["", "## Served answers", ""] + [
            f"- model {s['model']}: status {s.get('status')}, culture {s.get('culture')}, engine {s.get('engine')}"
            for s in rep["served"]]
    out += ["", "## What a rehearsal cannot tell", ""] + [f"- {x}" for x in rep["cannot_tell"]]
    return "\n".join(out) + "\n"


def summary_line(rep: dict) -> str:
    if rep["passed"]:
        return f"rehearsal passed: {len(rep['jobs'])} jobs, {len(rep['cultures'])} cultures, {rep['seconds']:.0f} s"
    parts = [f"{f['stage']}" + (f" [{', '.join(f['cultures'])}]" if f["cultures"] else "") + f": {f['what']}"
             for f in rep["failures"]]
    return "rehearsal FAILED: " + "; ".join(parts)


def save(rep: dict, store, workdir) -> None:
    md = format_md(rep)
    store.write_json(rep, "rehearsal.json")
    store.write_bytes(md.encode(), "rehearsal.md")
    (workdir / "rehearsal.json").write_text(json.dumps(rep, indent=2, default=str))
    (workdir / "rehearsal.md").write_text(md)
