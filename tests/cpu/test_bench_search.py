"""The search benchmark counts rows by query id, so a lost or duplicated row shows (no Ray here).

python -m pytest tests/cpu/test_bench_search.py -q
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench_search", Path(__file__).parents[2] / "bench" / "search.py")
bench_search = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_search)
count = bench_search.count_by_identity

IDS = [f"q-{i}" for i in range(10)]


def test_one_row_per_id_counts_nothing_lost():
    got = count(IDS, list(reversed(IDS)))
    assert got == {"lost": 0, "duplicated": 0, "unexpected": 0, "rows_in": 10, "rows_out": 10,
                   "examples": {"lost": [], "duplicated": [], "unexpected": []}}


def test_a_dropped_row_is_lost_even_when_nothing_else_is_wrong():
    # The old formula, len(ids_in - ids_out) + (rows_out - rows_in), gave 1 + (-1) = 0 here.
    got = count(IDS, IDS[1:])
    assert (got["lost"], got["duplicated"], got["unexpected"]) == (1, 0, 0)
    assert got["examples"]["lost"] == ["q-0"]


def test_a_dropped_and_a_duplicated_row_both_show():
    got = count(IDS, IDS[1:] + ["q-5"])  # same row count as went in
    assert (got["lost"], got["duplicated"], got["unexpected"]) == (1, 1, 0)
    assert got["rows_out"] == got["rows_in"] == 10
    assert got["examples"] == {"lost": ["q-0"], "duplicated": ["q-5"], "unexpected": []}


def test_rows_for_ids_that_never_went_in_are_unexpected():
    got = count(IDS, IDS + ["stray"])
    assert (got["lost"], got["duplicated"], got["unexpected"]) == (0, 0, 1)
    assert got["examples"]["unexpected"] == ["stray"]


def test_input_ids_must_be_unique():
    with pytest.raises(ValueError, match="not unique: q-1"):
        count(IDS + ["q-1"], IDS)
