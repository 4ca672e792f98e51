"""``cm-ray status CONFIG``: where a run stands, culture by culture, without running anything.

One row per culture (plus the joint adapter and the router), one column per stage of the
recipe; a cell is ``done``, ``stale`` with the changed field, ``missing`` or ``failed`` with the
reason the last attempt gave, ``degraded`` (done, but the stage summary names a degradation under
its threshold: ``cm_ray.checks``), or ``adopted`` (written before fingerprints; taken as current by the
next run) (``cm_ray.fingerprints``). Then totals per stage and the store.
"""

from __future__ import annotations

import json
from collections import Counter

from cm_ray import checks
from cm_ray.artifacts import JOINT

ORDER = ("failed", "degraded", "stale", "missing", "adopted", "done")
"""A cell holding several partitions (one per task) shows the first of these it has."""


def status_rows(cfg, store) -> dict:
    """``{"stages": [...], "rows": {row: {stage: cell}}, "totals": {stage: {state: n}}, "root"}``;
    a cell is ``{"state", "reason", "parts": {partition: {"state", "reason"}}}``."""
    from cm_ray import fingerprints as FP
    from cm_ray.stages import DATA_STAGES

    stages = [*DATA_STAGES[cfg.recipe], "train", "route", "evaluate"]
    records = FP.Records(store)
    rows: dict[str, dict] = {c: {} for c in cfg.cultures}
    totals: dict[str, Counter] = {}
    for stage in stages:
        totals[stage] = Counter()
        degraded = checks.by_key((store.read_manifest(stage) or {}).get("degradations"))
        for p in FP.plan(stage, cfg, store, records=records):
            if p.state == "done" and p.key in degraded:
                p.state, p.reason = "degraded", "; ".join(checks.describe(d) for d in degraded[p.key])
            totals[stage][p.state] += 1
            row = "router" if stage == "route" else p.key.split("/")[0]
            cell = rows.setdefault(row, {}).setdefault(stage, {"parts": {}})
            cell["parts"][p.key] = {"state": p.state, "reason": p.reason}
    for row in rows.values():
        for cell in row.values():
            parts = cell["parts"]
            state = next(s for s in ORDER if any(v["state"] == s for v in parts.values()))
            why = [f"{k.split('/', 1)[1]}: {v['reason']}" if "/" in k else v["reason"]
                   for k, v in parts.items() if v["state"] == state and v["reason"]]
            cell.update(state=state, reason="; ".join(dict.fromkeys(why)) if state != "done" else "")
    return {"name": cfg.name, "recipe": cfg.recipe, "stages": stages, "rows": rows,
            "totals": {s: dict(c) for s, c in totals.items()}, "root": store.root}


def _cell(cell: dict | None, width: int) -> str:
    if not cell:
        return "-"
    text = cell["state"] if cell["state"] in ("done", "missing", "adopted") else f"{cell['state']}: {cell['reason']}"
    return text if len(text) <= width else text[:width - 3] + "..."


def format_status(st: dict, width: int = 34) -> str:
    """The culture x stage table, totals per stage, and the store location."""
    stages = st["stages"]
    head = f"{'culture':<8} " + " ".join(f"{s:<{width}}" for s in stages)
    lines = [f"cm_ray {st['name']} ({st['recipe']}): {len(st['rows'])} rows x {len(stages)} stages", head]
    order = [r for r in st["rows"] if r not in (JOINT, "router")] + [r for r in (JOINT, "router") if r in st["rows"]]
    for row in order:
        cells = st["rows"][row]
        lines.append(f"{row:<8} " + " ".join(f"{_cell(cells.get(s), width):<{width}}" for s in stages).rstrip())
    lines.append("totals:")
    for s in stages:
        t = st["totals"].get(s, {})
        n = sum(t.values())
        lines.append(f"  {s:<11} {t.get('done', 0)}/{n} done"
                     + "".join(f", {t[k]} {k}" for k in ("adopted", "degraded", "stale", "missing", "failed") if t.get(k)))
    lines.append(f"store: {st['root']}")
    return "\n".join(lines)


def run_status(cfg, store, as_json: bool = False) -> str:
    st = status_rows(cfg, store)
    return json.dumps(st, indent=2, default=str) if as_json else format_status(st)
