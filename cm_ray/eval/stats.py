"""Paired significance of each system against ``base`` and ``prompted`` on the same questions.

Every benchmark row carries ``_stat``: its metric as a function of item indices (mean of per-item
values, or a statistic over items such as macro-F1 or the alignment score). The difference
``stat_system(ix) - stat_ref(ix)`` is bootstrapped over the SAME resampled items
(``scipy.stats.bootstrap``, percentile 95% interval): per culture, and pooled over cultures (one
resample per culture, the mean of the per-culture differences: a stratified bootstrap). A
difference is significant at 95% when its interval excludes 0.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

REFERENCES = ("base", "prompted")
POOLED = "pooled"


def paired_diff_ci(stat_a: Callable[[int, np.ndarray], float], stat_b: Callable[[int, np.ndarray], float],
                   sizes: list[int], samples: int = 1000, seed: int = 0,
                   level: float = 0.95) -> dict:
    """Mean over strata of ``stat_a(k, ix) - stat_b(k, ix)`` with a bootstrap CI: stratum ``k`` has
    ``sizes[k]`` items and is resampled on its own; ``ix`` indexes the same items for both."""
    from scipy.stats import bootstrap

    def diff(*ixs) -> float:
        return float(np.mean([stat_a(k, ix) - stat_b(k, ix) for k, ix in enumerate(ixs)]))

    full = [np.arange(n) for n in sizes]
    value = diff(*full)
    if samples <= 0 or not sizes or min(sizes) < 2:
        return {"diff": value, "ci_low": math.nan, "ci_high": math.nan, "n": int(sum(sizes)),
                "significant": False}
    res = bootstrap(full, diff, n_resamples=samples, confidence_level=level, method="percentile",
                    vectorized=False, random_state=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    sig = not (math.isnan(lo) or math.isnan(hi)) and (lo > 0 or hi < 0)
    return {"diff": value, "ci_low": lo, "ci_high": hi, "n": int(sum(sizes)), "significant": sig}


def significance_rows(rows: list[dict], samples: int = 1000, seed: int = 0,
                      references: tuple[str, ...] = REFERENCES) -> list[dict]:
    """Per (benchmark, metric, culture | pooled, system, reference): the paired difference and CI.

    ``rows`` must carry ``_stat`` (rows without it, e.g. the router's, are skipped)."""
    groups: dict[tuple, dict[str, dict[str, dict]]] = {}
    for r in rows:
        if "_stat" in r:
            groups.setdefault((r["benchmark"], r["metric"]), {}).setdefault(r["culture"], {})[r["system"]] = r
    out = []
    for (bench, metric), by_culture in groups.items():
        systems = list(dict.fromkeys(s for got in by_culture.values() for s in got))
        for ref in references:
            for system in systems:
                if system == ref:
                    continue
                both = [c for c, got in by_culture.items() if ref in got and system in got]
                for culture in [*both, POOLED] if len(both) > 1 else both:
                    cs = both if culture == POOLED else [culture]
                    a = [by_culture[c][system]["_stat"] for c in cs]
                    b = [by_culture[c][ref]["_stat"] for c in cs]
                    res = paired_diff_ci(lambda k, ix, a=a: a[k](ix), lambda k, ix, b=b: b[k](ix),
                                         [by_culture[c][ref]["n"] for c in cs], samples, seed)
                    if culture == POOLED and any(math.isnan(by_culture[c][ref]["value"]) for c in cs):
                        continue
                    out.append({"benchmark": bench, "metric": metric, "culture": culture,
                                "system": system, "vs": ref, **res})
    return out


def mark(sig: list[dict], bench: str, metric: str, culture: str, system: str) -> str:
    """Table marks: ``+b``/``-b`` (significantly above / below base), ``+p``/``-p`` (prompted)."""
    out = []
    for s in sig:
        if (s["benchmark"], s["metric"], s["culture"], s["system"]) == (bench, metric, culture, system) \
                and s["significant"]:
            out.append(("+" if s["diff"] > 0 else "-") + s["vs"][0])
    return " " + "".join(out) if out else ""
