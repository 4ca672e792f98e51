"""Work the data stages do once, not once per task: agnostic queries are generated once per
culture, and the same search (normalized query, locale) is sent once before dispatch.

python -m pytest tests/cpu/test_data_dedup.py -q
"""

from __future__ import annotations

from collections import Counter

from cm_ray.data.queries import generation_key
from cm_ray.data.search import dedup_misses


def test_agnostic_queries_share_one_generation_per_culture():
    keys = {generation_key(c, t, k) for c in ("GB", "MX") for t in ("offensive", "survey", "cultural_qa")
            for k in ("specific", "agnostic")}
    kinds = Counter(k for _, _, k in keys)
    assert kinds == {"specific": 2 * 3, "agnostic": 2}
    assert generation_key("GB", "offensive", "agnostic") == generation_key("GB", "survey", "agnostic")
    assert generation_key("GB", "offensive", "agnostic") != generation_key("MX", "offensive", "agnostic")


def test_identical_searches_are_sent_once_and_answer_every_row():
    rows = [{"query_id": f"{c}-{t}", "culture": c, "task": t, "kind": "agnostic", "query": q, "locale": loc}
            for c, loc, q in [("GB", "en-GB", "Social norms in the United Kingdom"),
                              ("US", "en-US", "social norms in the  United Kingdom")]
            for t in ("offensive", "survey")]
    rows.append({**rows[0], "query_id": "GB-x", "query": "SOCIAL NORMS in the United Kingdom "})
    unique, twins = dedup_misses(rows)
    assert [r["query_id"] for r in unique] == ["GB-offensive", "US-offensive"]  # per locale, case/space folded
    assert sorted(r["query_id"] for rs in twins.values() for r in rs) == sorted(r["query_id"] for r in rows)
    assert max(len(rs) for rs in twins.values()) == 3
