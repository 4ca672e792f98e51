"""Evaluation report: ``eval/results.json`` (strict JSON), ``eval/results.md`` (one table per
benchmark and metric: culture x system, value [95% CI]) and PNG plots (``eval/<benchmark>.png``
per-culture bars of the headline metric, ``eval/router_confusion.png``), plus the stage headline.
"""

from __future__ import annotations

import math
from typing import Any

from cm_ray import artifacts

HEADLINE = {"wvs": "alignment_score", "culture_tasks": "macro_f1", "blend": "accuracy"}
"""Each benchmark's headline metric (tables' means, plots, the ablation comparison)."""


def finite(obj):
    """NaN -> None, so results.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def mean_of(rows, bench, system, metric) -> float | None:
    vals = [r["value"] for r in rows if (r["benchmark"], r["system"], r["metric"]) == (bench, system, metric)
            and not math.isnan(r["value"])]
    return sum(vals) / len(vals) if vals else None


def _cell(r: dict) -> str:
    if math.isnan(r["value"]):
        return "n/a"
    ci = "" if math.isnan(r["ci_low"]) else f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
    return f"{r['value']:.2f}{ci}"


def _diff(a: dict | None, b: dict | None) -> str:
    if not a or not b or math.isnan(a["value"]) or math.isnan(b["value"]):
        return "-"
    return f"{a['value'] - b['value']:+.2f}"


def format_tables(rows: list[dict], cultures: list[str], systems: list[str], skipped: dict,
                  confusion: dict | None, sig: list[dict] | None = None) -> str:
    """Markdown: one table per benchmark and metric, cultures × systems, value [95% CI] and the
    marks of significant paired differences (``eval.stats``), then the pooled differences."""
    from cm_ray.eval.stats import POOLED, mark

    sig = sig or []
    out = ["Marks: +b / -b = significantly above / below `base`, +p / -p = above / below `prompted` "
           "(paired bootstrap over the same questions, 95%).", ""] if sig else []
    for (bench, metric) in dict.fromkeys((r["benchmark"], r["metric"]) for r in rows):
        cols = [s for s in (systems if bench != "router" else ["router", "language_only"]) if s not in skipped]
        cost = "oracle" in cols and "culturemanager" in cols  # what routing loses vs perfect routing
        extra = ["router cost (oracle - culturemanager)"] if cost else []
        out += [f"### {bench}: {metric} (95% bootstrap CI)", "",
                "| culture | n | " + " | ".join(cols + extra) + " |",
                "|---|---|" + "---|" * len(cols + extra)]
        for c in cultures:
            got = {r["system"]: r for r in rows if (r["benchmark"], r["metric"], r["culture"]) == (bench, metric, c)}
            if got:
                n = next(iter(got.values()))["n"]
                cells = [_cell(got[s]) + mark(sig, bench, metric, c, s) if s in got else "-" for s in cols]
                if cost:
                    cells.append(_diff(got.get("oracle"), got.get("culturemanager")))
                out.append(f"| {c} | {n} | " + " | ".join(cells) + " |")
        means = [mean_of(rows, bench, s, metric) for s in cols]
        if cost:
            o, m = means[cols.index("oracle")], means[cols.index("culturemanager")]
            means.append(None if o is None or m is None else o - m)
        marks = [mark(sig, bench, metric, POOLED, s) for s in cols] + [""] * len(extra)
        out.append("| mean | | " + " | ".join(("-" if m is None else f"{m:.2f}") + k
                                             for m, k in zip(means, marks)) + " |")
        out.append("")
        pooled = [x for x in sig if (x["benchmark"], x["metric"], x["culture"]) == (bench, metric, POOLED)]
        if pooled:
            out += [f"pooled over cultures, paired difference [95% CI] ({bench}: {metric}):", "",
                    "| system | vs | difference | significant |", "|---|---|---|---|"]
            out += [f"| {x['system']} | {x['vs']} | {x['diff']:+.3f} [{x['ci_low']:+.3f}, "
                    f"{x['ci_high']:+.3f}] | {'yes' if x['significant'] else 'no'} |" for x in pooled]
            out.append("")
    if confusion:
        out += ["### router confusion (rows: true culture, columns: routed to)", "",
                "| true \\ routed | " + " | ".join(confusion["labels"]) + " |",
                "|---|" + "---|" * len(confusion["labels"])]
        out += [f"| {t} | " + " | ".join(str(v) for v in row) + " |"
                for t, row in zip(confusion["true"], confusion["matrix"])]
        out.append("")
        for name in ("router", "language_only"):
            if m := confusion.get(name):
                out.append(f"- {name}: top-1 accuracy {m['accuracy']:.3f}, ECE {m['ece']:.3f}, "
                           f"decided by {m['decided_by']}")
        out.append("")
    for s, why in skipped.items():
        out.append(f"- system `{s}` skipped: {why}")
    return "\n".join(out) + "\n"


def make_plots(rows: list[dict], confusion: dict | None) -> dict[str, bytes]:
    """PNG bytes: per-culture bars of each benchmark's headline metric; router confusion matrix."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs = {}
    for bench, metric in HEADLINE.items():
        sel = [r for r in rows if r["benchmark"] == bench and r["metric"] == metric]
        if not sel:
            continue
        cultures = list(dict.fromkeys(r["culture"] for r in sel))
        systems = list(dict.fromkeys(r["system"] for r in sel))
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(cultures), 3.2))
        w = 0.8 / len(systems)
        for j, s in enumerate(systems):
            vals = [next((r for r in sel if r["culture"] == c and r["system"] == s), None) for c in cultures]
            ys = [v["value"] if v else float("nan") for v in vals]
            err = [[max(0.0, v["value"] - v["ci_low"]) if v and not math.isnan(v["ci_low"]) else 0 for v in vals],
                   [max(0.0, v["ci_high"] - v["value"]) if v and not math.isnan(v["ci_high"]) else 0 for v in vals]]
            ax.bar([i + j * w for i in range(len(cultures))], ys, w, yerr=err, label=s, capsize=2)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(cultures))], cultures)
        ax.set_title(f"{bench}: {metric}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        pngs[f"{bench}.png"] = buf.getvalue()
    if confusion:
        fig, ax = plt.subplots(figsize=(1 + 0.8 * len(confusion["labels"]), 1 + 0.8 * len(confusion["true"])))
        ax.imshow(confusion["matrix"], cmap="Blues")
        ax.set_xticks(range(len(confusion["labels"])), confusion["labels"])
        ax.set_yticks(range(len(confusion["true"])), confusion["true"])
        for i, row in enumerate(confusion["matrix"]):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center")
        ax.set_xlabel("routed to")
        ax.set_ylabel("true culture")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        pngs["router_confusion.png"] = buf.getvalue()
    return pngs


def write_report(store: Any, summary: dict, rows: list[dict], confusion: dict | None,
                 cultures: list[str], systems: list[str]) -> None:
    """results.json, results.md and the plots under ``eval/``."""
    store.write_json(finite({**summary, "rows": rows, "confusion": confusion}),
                     *artifacts.eval_dir("results.json"))
    md = format_tables(rows, cultures, systems, summary["skipped_systems"], confusion,
                       summary.get("significance"))
    store.write_bytes(md.encode(), *artifacts.eval_dir("results.md"))
    for name, png in make_plots(rows, confusion).items():
        store.write_bytes(png, *artifacts.eval_dir(name))


def headline_summary(rows: list[dict], active: list[str], confusion: dict | None) -> dict:
    """``means`` (benchmark/system -> mean headline metric), ``headline`` and ``router_accuracy``."""
    means = {f"{b}/{s}": mean_of(rows, b, s, HEADLINE[b]) for b in HEADLINE for s in active
             if mean_of(rows, b, s, HEADLINE[b]) is not None}
    out: dict = {"means": means}
    best = {b: max(((s, v) for (k, v) in means.items() for s in [k.split("/")[1]] if k.startswith(b + "/")),
                   key=lambda t: t[1], default=None) for b in HEADLINE}
    out["headline"] = "; ".join(f"{b}: best {t[0]} {t[1]:.2f}" for b, t in best.items() if t) or "no rows"
    if confusion:
        out["router_accuracy"] = confusion["accuracy"]
    return out
