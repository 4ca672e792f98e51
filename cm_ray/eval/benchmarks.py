"""The benchmarks: each system on each culture's items, scored with bootstrap 95% CIs.

- ``wvs``: World Values Survey questions (closed form over option numbers): majority accuracy,
  alignment score, 1 - JS distance, KL, individual accuracy.
- ``culture_tasks``: offensive-style classification (closed form over the labels): accuracy, macro F1.
- ``blend``: BLEnD short answers (greedy generation): accuracy against the annotated answers.
- ``router``: the router alone on held-out culture-marked texts: per-culture accuracy and the
  confusion matrix.

Every row is ``{benchmark, culture, system, metric, value, ci_low, ci_high, n}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cm_ray.eval import data as D
from cm_ray.eval import metrics as M
from cm_ray.eval import systems as S


@dataclass
class Answerer:
    """Answers of one system for one culture's samples: scores per choice (closed form) or
    generated texts, one per sample, memoized across systems and benchmarks (same adapter,
    system prompt, input and choices = same answer)."""

    model: Any
    router: Any
    max_new_tokens: int
    recipe: str = "culturemanager"
    memo: dict = field(default_factory=dict)

    def __call__(self, system: str, culture: str, task, samples: list[dict],
                 choices: list[list[str]] | None = None) -> list:
        inputs = [task.render_input(s) for s in samples]
        routes = S.plan_routes(system, culture, inputs, self.model.adapters, self.router,
                                self.recipe)
        todo: dict[Any, list[int]] = {}
        keys = []
        for i, (r, text) in enumerate(zip(routes, inputs)):
            key = (r.adapter, r.system, text, tuple(choices[i]) if choices else None)
            keys.append(key)
            if key not in self.memo:
                todo.setdefault(r.adapter, []).append(i)
        for adapter, idx in todo.items():
            convs = [([{"role": "system", "content": routes[i].system}] if routes[i].system else [])
                     + [{"role": "user", "content": inputs[i]}] for i in idx]
            outs = (self.model.score(convs, [choices[i] for i in idx], adapter) if choices
                    else self.model.generate(convs, adapter, max_new_tokens=self.max_new_tokens))
            for i, o in zip(idx, outs):
                self.memo[keys[i]] = o
        return [self.memo[k] for k in keys]


def _row(bench: str, culture: str, system: str, metric: str, res: dict) -> dict:
    return {"benchmark": bench, "culture": culture, "system": system, "metric": metric, **res}


def _mean(values, B: int, seed: int) -> dict:
    """``M.mean_ci`` + ``_stat`` (the mean over item indices: the paired tests, ``eval.stats``)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {**M.mean_ci(v, B, seed), "_stat": lambda ix: float(v[ix].mean())}


def _stat(fn, n: int, B: int, seed: int) -> dict:
    return {**M.stat_ci(fn, n, B, seed), "_stat": fn}


def _softmax(logps: list[float]) -> list[float]:
    m = max(logps)
    e = [math.exp(x - m) for x in logps]
    return [x / sum(e) for x in e]


def wvs_rows(items: list[dict], culture: str, systems: list[str], answer: Answerer,
             B: int, seed: int) -> list[dict]:
    from cm_ray.tasks import load_task

    survey = load_task("survey")
    rows = []
    samples = [{"question": it["question"], "options": it["options"]} for it in items]
    choices = [[str(k) for k in range(1, len(it["options"]) + 1)] for it in items]
    for system in systems:
        dists = [_softmax(s) for s in answer(system, culture, survey, samples, choices)]
        pred = [max(range(len(d)), key=d.__getitem__) for d in dists]
        gold = [it["majority"] for it in items]
        n_opt = [len(it["options"]) for it in items]

        def add(metric, res):
            rows.append(_row("wvs", culture, system, metric, res))

        add("majority_accuracy", _mean([p == g for p, g in zip(pred, gold)], B, seed))
        add("alignment_score", _stat(
            lambda ix, pred=pred: M.alignment_score([pred[i] for i in ix], [gold[i] for i in ix],
                                         [n_opt[i] for i in ix]), len(items), B, seed))
        add("one_minus_jsd", _mean([1 - M.js_distance(d, it["dist"]) for d, it in zip(dists, items)], B, seed))
        add("kl", _mean([M.kl_divergence(it["dist"], d) for d, it in zip(dists, items)], B, seed))
        # Share of respondents whose own answer is the model's (CLCA's individual-level
        # accuracy for a culture-level persona; no per-respondent demographics in the data).
        add("individual_accuracy", _mean([it["dist"][p] for p, it in zip(pred, items)], B, seed))
    return rows


def culture_task_rows(items: list[dict], culture: str, systems: list[str], answer: Answerer,
                      B: int, seed: int) -> list[dict]:
    from cm_ray.tasks import load_task

    offensive = load_task("offensive")
    labels = list(offensive.labels)
    rows = []
    for system in systems:
        scores = answer(system, culture, offensive, [{"text": it["text"]} for it in items],
                        [labels] * len(items))
        pred = [labels[max(range(len(s)), key=s.__getitem__)] for s in scores]
        gold = [it["label"] for it in items]
        rows.append(_row("culture_tasks", culture, system, "accuracy",
                         _mean([p == g for p, g in zip(pred, gold)], B, seed)))
        rows.append(_row("culture_tasks", culture, system, "macro_f1", _stat(
            lambda ix, pred=pred: M.macro_f1([pred[i] for i in ix], [gold[i] for i in ix], labels),
            len(items), B, seed)))
    return rows


def blend_rows(items: list[dict], culture: str, systems: list[str], answer: Answerer,
               B: int, seed: int) -> list[dict]:
    from cm_ray.tasks import load_task

    qa = load_task("cultural_qa")
    rows = []
    for system in systems:
        texts = answer(system, culture, qa, [{"question": it["question"]} for it in items])
        rows.append(_row("blend", culture, system, "accuracy", _mean(
            [M.answer_matches(t, it["answers"]) for t, it in zip(texts, items)], B, seed)))
    return rows


def router_rows(items: list[dict], cultures: list[str], router, B: int, seed: int) -> tuple[list[dict], dict]:
    """Per-culture routing accuracy of the router (at its threshold) and of the language-ID-only
    baseline beside it, the confusion matrix (columns: cultures + ``none``), top-1 accuracy and
    calibration (ECE) of both, and which evidence decided."""
    import numpy as np

    from cm_ray.router.metrics import routing_metrics
    from cm_ray.router.model import CultureRouter

    texts = [it["text"] for it in items]
    picks = [c for c, _ in router(texts)]
    labels = [*cultures, "none"]
    matrix = [[sum(1 for it, p in zip(items, picks) if it["culture"] == t and p == q)
               for q in labels] for t in cultures]
    acc = M.mean_ci([p == it["culture"] for p, it in zip(picks, items)], B, seed)
    confusion = {"labels": labels, "true": list(cultures), "matrix": matrix, "accuracy": acc["value"]}
    baseline = CultureRouter(list(cultures), np.zeros((1, 1)), np.zeros(1), evidence=("language",))
    lang = [c for c, _ in baseline.predict(texts)]
    rows = []
    for system, got in (("router", picks), ("language_only", lang)):
        rows += [_row("router", c, system, "accuracy", M.mean_ci(
            [p == c for p, it in zip(got, items) if it["culture"] == c], B, seed)) for c in cultures]
    for name, r in (("router", getattr(router, "router", None)), ("language_only", baseline)):
        if r is not None:  # top-1 (no threshold) and ECE over the evaluated cultures
            y = np.array([r.cultures.index(it["culture"]) if it["culture"] in r.cultures else -1
                          for it in items])
            m = routing_metrics(r, texts, y)
            confusion[name] = {k: m[k] for k in ("accuracy", "ece", "coverage", "decided_by")}
    return rows, confusion


def run_benchmarks(cfg, root, model, systems: list[str], router) -> tuple[list[dict], dict | None]:
    """Every configured benchmark on every culture and system; (rows, router confusion or None)."""
    ev = cfg.evaluate
    subset = None
    if ev.wvs_subset == "clca" or (ev.wvs_subset == "auto" and cfg.recipe == "clca"):
        subset = D.CLCA_WVS
    answer = Answerer(model, router, ev.max_new_tokens, cfg.recipe)
    B, seed, k = ev.bootstrap, cfg.seed, ev.max_questions
    rows: list[dict] = []
    for culture in cfg.cultures:
        if "wvs" in ev.benchmarks and (items := D.wvs_items(root, culture, subset, k, seed)):
            rows += wvs_rows(items, culture, systems, answer, B, seed)
        if "culture_tasks" in ev.benchmarks and (items := D.culture_task_items(root, culture, k, seed)):
            rows += culture_task_rows(items, culture, systems, answer, B, seed)
        if "blend" in ev.benchmarks and (items := D.blend_items(root, culture, k, seed)):
            rows += blend_rows(items, culture, systems, answer, B, seed)
    confusion = None
    if "router" in ev.benchmarks and router is not None:
        if items := D.router_items(root, cfg.cultures, k, seed):
            more, confusion = router_rows(items, list(cfg.cultures), router, B, seed)
            rows += more
    return rows, confusion
