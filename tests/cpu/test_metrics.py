"""Evaluation metrics against hand-computed values.  python -m pytest tests/cpu/test_metrics.py -q"""

import math

import numpy as np
import pytest

from cm_ray.eval import metrics as M


def test_alignment_score_matches_hand_computation():
    # a - g = (-1, 2) -> ||.|| = sqrt(5); max distance over 4- and 3-option questions = sqrt(3^2 + 2^2)
    got = M.alignment_score([0, 2], [1, 0], [4, 3])
    assert got == pytest.approx(100 * (1 - math.sqrt(5) / math.sqrt(13)))
    assert M.alignment_score([1, 2], [1, 2], [4, 3]) == pytest.approx(100.0)
    assert M.alignment_score([3, 0], [0, 2], [4, 3]) == pytest.approx(0.0)  # the farthest answers


def test_js_distance_hand_values_and_bounds():
    assert M.js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    assert M.js_distance([0.2, 0.8], [0.2, 0.8]) == pytest.approx(0.0, abs=1e-9)
    # p = (.5, .5), q = (1, 0), m = (.75, .25): JSD = (0.2075 + 0.4150) / 2 bits
    jsd = (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25) + math.log2(1 / 0.75)) / 2
    assert M.js_distance([0.5, 0.5], [1, 0]) == pytest.approx(math.sqrt(jsd))
    assert M.js_distance([2, 2], [3, 0]) == pytest.approx(math.sqrt(jsd))  # unnormalized inputs


def test_kl_divergence_hand_value_and_zero_mass():
    assert M.kl_divergence([0.5, 0.5], [0.25, 0.75]) == pytest.approx(
        0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-4)
    assert M.kl_divergence([0.3, 0.7], [0.3, 0.7]) == pytest.approx(0.0, abs=1e-5)
    assert math.isfinite(M.kl_divergence([0.5, 0.5], [1.0, 0.0]))  # smoothed, not infinite


def test_accuracy_and_macro_f1_hand_values():
    pred, gold = ["a", "a", "b", "b"], ["a", "b", "b", "b"]
    assert M.accuracy(pred, gold) == 0.75
    assert M.macro_f1(pred, gold) == pytest.approx((2 / 3 + 4 / 5) / 2)
    # A label never predicted nor seen still counts (F1 0) when listed.
    assert M.macro_f1(["a"], ["a"], labels=["a", "b"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.accuracy(["a"], ["a", "b"])


def test_bootstrap_ci_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(1)
    hits = 0
    for rep in range(80):
        x = rng.random(150) < 0.3
        r = M.mean_ci(x, samples=300, seed=rep)
        assert r["ci_low"] <= r["value"] <= r["ci_high"]
        hits += r["ci_low"] <= 0.3 <= r["ci_high"]
    assert 0.85 <= hits / 80 <= 1.0


def test_stat_ci_of_a_constant_statistic_is_a_point():
    r = M.stat_ci(lambda ix: 42.0, 10, samples=50)
    assert r == {"value": 42.0, "ci_low": 42.0, "ci_high": 42.0, "n": 10}
    assert math.isnan(M.mean_ci([], samples=10)["value"])


@pytest.mark.parametrize("pred,answers,ok", [
    ("Fish and chips, usually.", ["fish and chips"], True),
    ("The BBC", ["bbc", "hsbc"], True),
    ("我们常吃饺子。", ["饺子"], True),
    ("Pizza", ["fish and chips"], False),
    ("", ["anything"], False),
    ("08:00", ["08:00", "09:00"], True),
    ("at", ["cat"], False),  # no partial-word matches
])
def test_short_answer_matching_is_normalized(pred, answers, ok):
    assert M.answer_matches(pred, answers) is ok
