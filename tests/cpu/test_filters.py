"""Post-processing filters: every dropped row has a counted reason; results are deterministic.

python -m pytest tests/cpu/test_filters.py -q
"""

from __future__ import annotations

from cm_ray.artifacts import split_of, stable_id
from cm_ray.data import filters as F


def rows(texts, labels=None):
    labels = labels or [None] * len(texts)
    return [{"id": stable_id(t), "text": t, "label": l} for t, l in zip(texts, labels)]


def test_dedup_counts_exact_near_and_seed_copies_separately():
    texts = ["The market opens early on Sunday in the old town square",
             "the market opens early on sunday in the old town square!",       # exact after normalizing
             "The market opens early on Sunday in the old town square today",  # near duplicate
             "Congratulations to the whole team, you made the town proud today",  # seed copy
             "A completely different post about trains and weather"]
    kept, why = F.dedup(rows(texts), lambda r: r["text"], 0.8,
                        seen=["Congratulations to the whole team, you made the town proud today!"])
    assert [r["text"] for r in kept] == [texts[0], texts[4]]
    assert why == ["duplicate", "near_duplicate", "copies_seed"]


def test_minhash_dedup_agrees_with_exact_jaccard_on_clear_cases():
    base = [f"post number {i} about topic {i * 7} with some shared words here" for i in range(40)]
    texts = base + [t + " ok" for t in base[:10]] + ["totally unrelated sentence about rivers"]
    exact, why_exact = F.dedup(rows(texts), lambda r: r["text"], 0.7, use_minhash=False)
    approx, why_mh = F.dedup(rows(texts), lambda r: r["text"], 0.7, use_minhash=True)
    assert len(why_exact) == 10 and set(why_exact) == {"near_duplicate"}
    assert abs(len(approx) - len(exact)) <= 2  # LSH is approximate, but close on clear cases
    assert len(approx) + len(why_mh) == len(texts)


def test_balance_caps_the_majority_label_and_counts_every_drop():
    labs = ["offensive"] * 7 + ["not_offensive"] * 2 + [None]
    rs = rows([f"t{i}" for i in range(10)], labs)
    kept, why = F.balance_labels(rs, ratio=1.5)
    assert sum(r["label"] == "offensive" for r in kept) == 3  # ceil(1.5 * 2)
    assert sum(r["label"] == "not_offensive" for r in kept) == 2
    assert sum(r["label"] is None for r in kept) == 1
    assert why == ["label_balance"] * 4
    again, _ = F.balance_labels(list(reversed(rs)), ratio=1.5)
    assert {r["id"] for r in again} == {r["id"] for r in kept}  # order does not matter


def test_single_label_partition_keeps_a_small_capped_number():
    kept, why = F.balance_labels(rows(["a", "b", "c", "d"], ["x"] * 4), ratio=1.5)
    assert len(kept) == 2 and why == ["label_balance"] * 2


def test_threshold_filter_keeps_unscored_rows():
    rs = [{"id": "a", "relevance": 0.5}, {"id": "b", "relevance": 0.05}, {"id": "c", "relevance": None}]
    kept, why = F.threshold_filter(rs, "relevance", 0.15)
    assert [r["id"] for r in kept] == ["a", "c"] and why == ["low_relevance"]


def test_split_is_deterministic_proportional_and_leaves_tiny_sets_in_train():
    ids = [stable_id(i) for i in range(50)]
    s1, s2 = split_of(ids, 0.2), split_of(list(reversed(ids)), 0.2)
    assert s1 == s2
    assert sum(v == "validation" for v in s1.values()) == 10
    assert set(split_of(ids[:2], 0.2).values()) == {"train"}
    assert list(split_of(ids[:3], 0.2).values()).count("validation") == 1


def test_filter_log_counts_in_out_and_merges():
    a, b = F.FilterLog(), F.FilterLog()
    a.record("dedup", 5, ["duplicate", "near_duplicate"])
    b.record("dedup", 4, ["duplicate"])
    b.record("relevance", 3, [])
    merged = F.FilterLog.merge([a.to_dict(), b.to_dict()])
    assert merged["dedup"] == {"in": 9, "out": 6, "dropped": {"duplicate": 2, "near_duplicate": 1}}
    assert merged["relevance"] == {"in": 3, "out": 3, "dropped": {}}


def test_stable_hash_is_stable_across_processes(python):
    import subprocess

    out = subprocess.run([python, "-c", "from cm_ray.artifacts import stable_id; print(stable_id('MX', 'x'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == stable_id("MX", "x")
