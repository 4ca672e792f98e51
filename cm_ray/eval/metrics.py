"""Metrics for the culture benchmarks, each with a bootstrap 95% confidence interval.

Classification: accuracy, macro-F1. Surveys: majority-answer accuracy, the CultureSPA alignment
score ``100·(1 − ‖a − g‖₂ / ‖max distance‖₂)`` over answer indices, 1 − Jensen–Shannon distance and
KL divergence between the model's and the survey's answer distributions. Short answers: normalized
match against any annotated answer (BLEnD).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from typing import Callable, Sequence

import numpy as np

EPS = 1e-12


def accuracy(pred: Sequence, gold: Sequence) -> float:
    if len(pred) != len(gold):
        raise ValueError(f"accuracy: {len(pred)} predictions for {len(gold)} gold labels")
    return float(np.mean([p == g for p, g in zip(pred, gold)])) if gold else float("nan")


def macro_f1(pred: Sequence, gold: Sequence, labels: Sequence | None = None) -> float:
    """Unweighted mean of per-label F1 over ``labels`` (default: labels seen in gold or pred)."""
    labels = list(labels) if labels is not None else sorted(set(gold) | set(pred), key=str)
    if not gold:
        return float("nan")
    f1s = []
    for lab in labels:
        tp = sum(p == lab and g == lab for p, g in zip(pred, gold))
        fp = sum(p == lab and g != lab for p, g in zip(pred, gold))
        fn = sum(p != lab and g == lab for p, g in zip(pred, gold))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def alignment_score(model_idx: Sequence[int], gold_idx: Sequence[int], n_options: Sequence[int]) -> float:
    """CultureSPA's score: 100·(1 − ‖a − g‖₂ / ‖max distance‖₂); indices 0-based, max = n − 1."""
    a, g, n = (np.asarray(x, dtype=float) for x in (model_idx, gold_idx, n_options))
    if a.size == 0:
        return float("nan")
    max_dist = math.sqrt(float(np.sum((n - 1) ** 2)))
    if max_dist == 0:
        return 100.0
    return float(100.0 * (1.0 - math.sqrt(float(np.sum((a - g) ** 2))) / max_dist))


def _normalize(p: Sequence[float]) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 0, None)
    s = p.sum()
    if s <= 0:
        raise ValueError("distribution sums to zero")
    return p / s


def kl_divergence(p: Sequence[float], q: Sequence[float], eps: float = 1e-6) -> float:
    """KL(p ‖ q) in nats; q is smoothed by ``eps`` so a zero in q stays finite."""
    p, q = _normalize(p), _normalize(np.asarray(q, dtype=float) + eps)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def js_distance(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen–Shannon distance (square root of the divergence, base 2): 0 = equal, 1 = disjoint."""
    p, q = _normalize(p), _normalize(q)
    m = (p + q) / 2

    def kl2(a, b):
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return float(math.sqrt(max(0.0, (kl2(p, m) + kl2(q, m)) / 2)))


# -- short answers (BLEnD) --------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, NFKC, strip punctuation (ASCII and CJK) and English articles, squash spaces."""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = "".join(" " if (ch in string.punctuation or unicodedata.category(ch).startswith("P"))
                   else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_matches(prediction: str, answers: Sequence[str]) -> bool:
    """True when the normalized prediction equals, contains or is contained in an annotation.

    Containment both ways, on word boundaries for spaced scripts, mirrors BLEnD's lenient
    exact match (a model answering "fish and chips, usually" still names "fish and chips").
    """
    pred = normalize_answer(prediction)
    if not pred:
        return False
    for ans in answers:
        a = normalize_answer(ans)
        if not a:
            continue
        if a == pred:
            return True
        if " " in pred or " " in a or a.isascii():
            if re.search(rf"(^|\s){re.escape(a)}(\s|$)", pred) or (
                    len(pred) >= 3 and re.search(rf"(^|\s){re.escape(pred)}(\s|$)", a)):
                return True
        elif a in pred:  # unspaced scripts (zh, ja): substring match
            return True
    return False


# -- confidence intervals ---------------------------------------------------------------------
def bootstrap_ci(stat: Callable[[np.ndarray], float], n: int, samples: int = 1000,
                 seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(indices)`` over ``n`` items resampled with replacement."""
    if n == 0 or samples <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    vals = [stat(rng.integers(0, n, n)) for _ in range(samples)]
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def mean_ci(values: Sequence[float], samples: int = 1000, seed: int = 0) -> dict:
    """{value, ci_low, ci_high, n} for the mean of per-item values (e.g. 0/1 correctness)."""
    v = np.asarray(values, dtype=float)
    lo, hi = bootstrap_ci(lambda idx: float(v[idx].mean()), len(v), samples, seed)
    return {"value": float(v.mean()) if len(v) else float("nan"), "ci_low": lo, "ci_high": hi,
            "n": int(len(v))}


def stat_ci(fn: Callable[[np.ndarray], float], n: int, samples: int = 1000, seed: int = 0) -> dict:
    """{value, ci_low, ci_high, n} for a statistic over all items (macro-F1, alignment score)."""
    lo, hi = bootstrap_ci(fn, n, samples, seed)
    return {"value": fn(np.arange(n)) if n else float("nan"), "ci_low": lo, "ci_high": hi, "n": n}
