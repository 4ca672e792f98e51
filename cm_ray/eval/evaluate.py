"""Evaluation stage: every system on every culture and benchmark, with bootstrap 95% CIs.

    cm-ray evaluate configs/demo.yaml evaluate.data_dir=../shared/data

Writes ``eval/results.json`` (one row per benchmark × culture × system × metric),
``eval/results.md`` (one table per benchmark: culture × system) and PNG plots
(``eval/<benchmark>.png`` per-culture bars, ``eval/router_confusion.png``). Without evaluation
data the stage says so and writes nothing else; a system whose artifact is missing (no joint
adapter, no router) is skipped with the reason in the tables.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from cm_ray.config import Config
from cm_ray.eval import data as D
from cm_ray.eval import metrics as M
from cm_ray.eval import systems as S

HEADLINE = {"wvs": "alignment_score", "culture_tasks": "macro_f1", "blend": "accuracy"}


def run_evaluate(cfg: Config, store: Any, force: bool = False, model: Any = None,
                 router: Any = None) -> dict:
    """Evaluate the run under ``store``; ``model``/``router`` are injectable (tests)."""
    ev = cfg.evaluate
    if ev.ablation:
        from cm_ray.eval.ablation import run_ablation

        return run_ablation(cfg, store, force=force)
    root = D.find_data_dir(ev.data_dir)
    if root is None:
        where = ev.data_dir or "../shared/data"
        return {"status": "no_data", "data_dir": where,
                "headline": f"no evaluation data found at {where} (set evaluate.data_dir)"}

    adapters_dirs, tmp = S.load_adapters(store, [*cfg.cultures, S.JOINT])
    router = router if router is not None else S.load_router_fn(store)
    skipped = {s: r for s in ev.systems
               if (r := S.missing_artifact(s, cfg.cultures, list(adapters_dirs), router))}
    active = [s for s in ev.systems if s not in skipped]
    try:
        if model is None:
            from cm_ray.models import resolve_model

            model = S.EvalModel(resolve_model(cfg.models.base or cfg.models.generator, cfg.models.cache_dir),
                                adapters_dirs, batch_size=ev.batch_size)
        rows, confusion = _evaluate(cfg, root, model, active, router)
    finally:
        S.cleanup(tmp)
    summary = {"data_dir": str(root), "systems": active, "skipped_systems": skipped,
               "n_rows": len(rows), "adapters": sorted(adapters_dirs)}
    store.write_json(_finite({**summary, "rows": rows, "confusion": confusion}), "eval", "results.json")
    md = format_tables(rows, cfg.cultures, ev.systems, skipped, confusion)
    store.write_bytes(md.encode(), "eval", "results.md")
    for name, png in make_plots(rows, confusion).items():
        store.write_bytes(png, "eval", name)
    means = {f"{b}/{s}": _mean(rows, b, s, HEADLINE[b]) for b in HEADLINE for s in active
             if _mean(rows, b, s, HEADLINE[b]) is not None}
    summary["means"] = means
    best = {b: max(((s, v) for (k, v) in means.items() for s in [k.split("/")[1]] if k.startswith(b + "/")),
                   key=lambda t: t[1], default=None) for b in HEADLINE}
    summary["headline"] = "; ".join(f"{b}: best {t[0]} {t[1]:.2f}" for b, t in best.items() if t) or "no rows"
    if confusion:
        summary["router_accuracy"] = confusion["accuracy"]
    return summary


def _evaluate(cfg: Config, root, model, systems: list[str], router) -> tuple[list[dict], dict | None]:
    from cm_ray.tasks import load_task

    ev = cfg.evaluate
    subset = None
    if ev.wvs_subset == "clca" or (ev.wvs_subset == "auto" and cfg.recipe == "clca"):
        subset = D.CLCA_WVS
    survey, offensive, qa = load_task("survey"), load_task("offensive"), load_task("cultural_qa")
    memo: dict = {}
    rows: list[dict] = []

    def answer(system, culture, task, samples, choices=None):
        """Scores per choice (closed form) or generated texts, one per sample, memoized."""
        inputs = [task.render_input(s) for s in samples]
        routes = S.plan_routes(system, culture, inputs, model.adapters, router,
                               None)
        todo: dict[Any, list[int]] = {}
        keys = []
        for i, (r, text) in enumerate(zip(routes, inputs)):
            key = (r.adapter, r.system, text, tuple(choices[i]) if choices else None)
            keys.append(key)
            if key not in memo:
                todo.setdefault(r.adapter, []).append(i)
        for adapter, idx in todo.items():
            convs = [([{"role": "system", "content": routes[i].system}] if routes[i].system else [])
                     + [{"role": "user", "content": inputs[i]}] for i in idx]
            outs = (model.score(convs, [choices[i] for i in idx], adapter) if choices
                    else model.generate(convs, adapter, max_new_tokens=ev.max_new_tokens))
            for i, o in zip(idx, outs):
                memo[keys[i]] = o
        return [memo[k] for k in keys]

    def add(bench, culture, system, metric, res):
        rows.append({"benchmark": bench, "culture": culture, "system": system, "metric": metric, **res})

    B = ev.bootstrap
    for culture in cfg.cultures:
        if "wvs" in ev.benchmarks and (items := D.wvs_items(root, culture, subset, ev.max_questions, cfg.seed)):
            samples = [{"question": it["question"], "options": it["options"]} for it in items]
            choices = [[str(k) for k in range(1, len(it["options"]) + 1)] for it in items]
            for system in systems:
                dists = [_softmax(s) for s in answer(system, culture, survey, samples, choices)]
                pred = [max(range(len(d)), key=d.__getitem__) for d in dists]
                gold = [it["majority"] for it in items]
                n_opt = [len(it["options"]) for it in items]
                add("wvs", culture, system, "majority_accuracy",
                    M.mean_ci([p == g for p, g in zip(pred, gold)], B, cfg.seed))
                add("wvs", culture, system, "alignment_score", M.stat_ci(
                    lambda ix: M.alignment_score([pred[i] for i in ix], [gold[i] for i in ix],
                                                 [n_opt[i] for i in ix]), len(items), B, cfg.seed))
                add("wvs", culture, system, "one_minus_jsd",
                    M.mean_ci([1 - M.js_distance(d, it["dist"]) for d, it in zip(dists, items)], B, cfg.seed))
                add("wvs", culture, system, "kl",
                    M.mean_ci([M.kl_divergence(it["dist"], d) for d, it in zip(dists, items)], B, cfg.seed))
                # Share of respondents whose own answer is the model's (CLCA's individual-level
                # accuracy for a culture-level persona; no per-respondent demographics in the data).
                add("wvs", culture, system, "individual_accuracy",
                    M.mean_ci([it["dist"][p] for p, it in zip(pred, items)], B, cfg.seed))
        if "culture_tasks" in ev.benchmarks and (
                items := D.culture_task_items(root, culture, ev.max_questions, cfg.seed)):
            labels = list(offensive.labels)
            for system in systems:
                scores = answer(system, culture, offensive, [{"text": it["text"]} for it in items],
                                [labels] * len(items))
                pred = [labels[max(range(len(s)), key=s.__getitem__)] for s in scores]
                gold = [it["label"] for it in items]
                add("culture_tasks", culture, system, "accuracy",
                    M.mean_ci([p == g for p, g in zip(pred, gold)], B, cfg.seed))
                add("culture_tasks", culture, system, "macro_f1", M.stat_ci(
                    lambda ix: M.macro_f1([pred[i] for i in ix], [gold[i] for i in ix], labels),
                    len(items), B, cfg.seed))
        if "blend" in ev.benchmarks and (items := D.blend_items(root, culture, ev.max_questions, cfg.seed)):
            for system in systems:
                texts = answer(system, culture, qa, [{"question": it["question"]} for it in items])
                add("blend", culture, system, "accuracy", M.mean_ci(
                    [M.answer_matches(t, it["answers"]) for t, it in zip(texts, items)], B, cfg.seed))
    confusion = None
    if "router" in ev.benchmarks and router is not None:
        items = D.router_items(root, cfg.cultures, ev.max_questions, cfg.seed)
        if items:
            picks = [c for c, _ in router([it["text"] for it in items])]
            labels = [*cfg.cultures, "none"]
            matrix = [[sum(1 for it, p in zip(items, picks) if it["culture"] == t and p == q)
                       for q in labels] for t in cfg.cultures]
            acc = M.mean_ci([p == it["culture"] for p, it in zip(picks, items)], B, cfg.seed)
            confusion = {"labels": labels, "true": list(cfg.cultures), "matrix": matrix, "accuracy": acc["value"]}
            for c in cfg.cultures:
                add("router", c, "router", "accuracy",
                    M.mean_ci([p == c for p, it in zip(picks, items) if it["culture"] == c], B, cfg.seed))
    return rows, confusion


def _finite(obj):
    """NaN -> None, so results.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _softmax(logps: list[float]) -> list[float]:
    m = max(logps)
    e = [math.exp(x - m) for x in logps]
    return [x / sum(e) for x in e]


def _mean(rows, bench, system, metric) -> float | None:
    vals = [r["value"] for r in rows if (r["benchmark"], r["system"], r["metric"]) == (bench, system, metric)
            and not math.isnan(r["value"])]
    return sum(vals) / len(vals) if vals else None


def _cell(r: dict) -> str:
    if math.isnan(r["value"]):
        return "n/a"
    ci = "" if math.isnan(r["ci_low"]) else f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
    return f"{r['value']:.2f}{ci}"


def format_tables(rows: list[dict], cultures: list[str], systems: list[str], skipped: dict,
                  confusion: dict | None) -> str:
    """Markdown: one table per benchmark and metric, cultures × systems, value [95% CI]."""
    out = []
    for (bench, metric) in dict.fromkeys((r["benchmark"], r["metric"]) for r in rows):
        cols = [s for s in (systems if bench != "router" else ["router"]) if s not in skipped]
        out += [f"### {bench}: {metric} (95% bootstrap CI)", "",
                "| culture | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for c in cultures:
            got = {r["system"]: r for r in rows if (r["benchmark"], r["metric"], r["culture"]) == (bench, metric, c)}
            if got:
                n = next(iter(got.values()))["n"]
                out.append(f"| {c} | {n} | " + " | ".join(_cell(got[s]) if s in got else "-" for s in cols) + " |")
        means = [_mean(rows, bench, s, metric) for s in cols]
        out.append("| mean | | " + " | ".join("-" if m is None else f"{m:.2f}" for m in means) + " |")
        out.append("")
    if confusion:
        out += ["### router confusion (rows: true culture, columns: routed to)", "",
                "| true \\ routed | " + " | ".join(confusion["labels"]) + " |",
                "|---|" + "---|" * len(confusion["labels"])]
        out += [f"| {t} | " + " | ".join(str(v) for v in row) + " |"
                for t, row in zip(confusion["true"], confusion["matrix"])]
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


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from cm_ray.cli import main

    raise SystemExit(main(["evaluate", *__import__("sys").argv[1:]]))
