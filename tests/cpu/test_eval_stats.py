"""Paired significance (cm_ray.eval.stats) on cases with a known answer.

python -m pytest tests/cpu/test_eval_stats.py -q
"""

import numpy as np

from cm_ray.eval.report import format_tables
from cm_ray.eval.stats import paired_diff_ci, significance_rows


def mean_of(v):
    v = np.asarray(v, float)
    return lambda k, ix: float(v[ix].mean())


def test_always_right_vs_always_wrong_and_identical_systems():
    n = 40
    res = paired_diff_ci(mean_of(np.ones(n)), mean_of(np.zeros(n)), [n], 500)
    assert res["diff"] == 1.0 and res["ci_low"] == res["ci_high"] == 1.0 and res["significant"]
    same = np.random.default_rng(1).integers(0, 2, n)
    res = paired_diff_ci(mean_of(same), mean_of(same), [n], 500)
    assert res["diff"] == 0.0 and not res["significant"]


def test_interval_matches_the_normal_theory_interval_of_a_paired_mean():
    rng = np.random.default_rng(0)
    n = 400
    b = rng.integers(0, 2, n).astype(float)
    a = np.where(rng.random(n) < 0.8, b, 1 - b)  # 80% of answers shared: strongly paired
    d = a - b
    half = 1.96 * d.std(ddof=1) / np.sqrt(n)
    res = paired_diff_ci(mean_of(a), mean_of(b), [n], 2000, seed=3)
    assert abs(res["diff"] - d.mean()) < 1e-12
    assert abs((res["ci_high"] - res["ci_low"]) / 2 - half) < 0.15 * half
    # Unpaired resampling would be wider: pairing is what makes small differences detectable.
    unpaired_half = 1.96 * np.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
    assert (res["ci_high"] - res["ci_low"]) / 2 < unpaired_half


def test_a_real_effect_is_significant_and_noise_is_not_pooled_over_cultures():
    rng = np.random.default_rng(5)
    rows = []
    for c in ["GB", "MX"]:
        base = rng.integers(0, 2, 300).astype(float)
        better = np.maximum(base, rng.random(300) < 0.25)  # fixes a quarter of the misses
        noisy = np.where(rng.random(300) < 0.5, base, rng.integers(0, 2, 300))  # no effect on average
        for system, v in [("base", base), ("prompted", base), ("oracle", better), ("joint", noisy)]:
            rows.append({"benchmark": "blend", "culture": c, "system": system, "metric": "accuracy",
                         "value": float(v.mean()), "ci_low": 0.0, "ci_high": 1.0, "n": 300,
                         "_stat": (lambda ix, v=v: float(v[ix].mean()))})
    sig = significance_rows(rows, 1000, 0)
    got = {(s["culture"], s["system"], s["vs"]): s for s in sig}
    assert got[("pooled", "oracle", "base")]["significant"] and got[("pooled", "oracle", "base")]["diff"] > 0
    assert got[("GB", "oracle", "prompted")]["significant"]
    assert not got[("pooled", "joint", "base")]["significant"]
    assert got[("pooled", "joint", "base")]["ci_low"] < 0 < got[("pooled", "joint", "base")]["ci_high"]
    assert ("GB", "base", "base") not in got
    md = format_tables([{k: v for k, v in r.items() if k != "_stat"} for r in rows], ["GB", "MX"],
                       ["base", "prompted", "joint", "oracle"], {}, None, sig)
    oracle_gb = next(line for line in md.splitlines() if line.startswith("| GB |"))
    assert "+b+p" in oracle_gb.split("|")[-2] and "| oracle | base |" in md
