"""Readers of the public evaluation data (skipped without ../shared/data).

python -m pytest tests/cpu/test_eval_data.py -q
"""

import json

import pytest

from cm_ray.eval import data as D


def test_wvs_zero_based_codes_map_to_option_indices(shared_data):
    raw = json.loads((shared_data / "wvs_culturespa" / "proportions_group_by_country.json").read_text())
    items = {it["qid"]: it for it in D.wvs_items(shared_data, "GB")}
    # Q94 is coded 0..2 for three options: code 0 is the first option.
    q94 = raw["GBR"]["Q94"]  # shares of answering respondents, renormalized to sum to 1
    assert items["Q94"]["dist"][0] == pytest.approx(q94["0"] / sum(q94.values()))
    assert items["Q94"]["majority"] == int(next(iter(raw["GBR"]["Q94"])))
    # Q1 is 1-based: code 1 ("Very important") is index 0.
    q1 = raw["GBR"]["Q1"]
    assert items["Q1"]["dist"][0] == pytest.approx(q1["1"] / sum(q1.values()))
    assert items["Q1"]["majority"] == 0
    for it in items.values():
        assert sum(it["dist"]) == pytest.approx(1.0)
        assert len(it["dist"]) == len(it["options"]) and 0 <= it["majority"] < len(it["options"])
    assert "Q119" not in items  # GB has no answers for it: skipped, not invented


def test_wvs_clca_subset_and_budget(shared_data):
    items = D.wvs_items(shared_data, "MX", subset=D.CLCA_WVS)
    assert {it["qid"] for it in items} <= set(D.CLCA_WVS) and "Q42" not in {it["qid"] for it in items}
    assert len(D.wvs_items(shared_data, "MX", max_items=7)) == 7
    assert D.wvs_items(shared_data, "JP") == []  # not in the survey file


def test_culture_tasks_map_labels_and_folders(shared_data):
    mx = D.culture_task_items(shared_data, "MX", max_items=30)
    assert len(mx) == 30 and mx[0]["dataset"].startswith("Spanish/MEX-A3T")
    for culture, folder in [("GB", "English"), ("CN", "China"), ("DE", "Germany"), ("MX", "Spanish")]:
        items = D.culture_task_items(shared_data, culture, max_items=40)
        assert items and {it["label"] for it in items} <= {"offensive", "not_offensive"}
        assert all(it["dataset"].startswith(folder + "/") and it["text"] for it in items)
    gb = D.culture_task_items(shared_data, "GB", max_items=9)
    assert len({it["dataset"] for it in gb}) == 3  # interleaved: every set is represented


def test_blend_items_carry_local_and_english_answers(shared_data):
    cn = D.blend_items(shared_data, "CN", max_items=20)
    assert len(cn) == 20
    for it in cn:
        assert it["question"].isascii() is not None and it["answers"]
    first = D.blend_items(shared_data, "CN")[0]
    assert "cheese stick" in first["answers"] and "奶酪棒" in first["answers"]
    assert D.blend_items(shared_data, "DE") == []


def test_router_items_are_labelled_per_culture(shared_data):
    items = D.router_items(shared_data, ["GB", "CN", "MX"], max_items=10)
    assert {it["culture"] for it in items} == {"GB", "CN", "MX"}
    per = {(c, s): sum(1 for it in items if (it["culture"], it["source"]) == (c, s))
           for c, s in {(it["culture"], it["source"]) for it in items}}
    assert per == {("GB", "blend"): 10, ("CN", "blend"): 10, ("MX", "blend"): 10,
                   ("CN", "culture_tasks/China/CDial-Bias/gender-2.jsonl"): 10,
                   ("MX", "culture_tasks/Spanish/MEX-A3T_offens/data-2.jsonl"): 10}
    assert D.router_items(shared_data, ["AR"]) == []  # no one-country text for it


def test_missing_data_dir_resolves_to_none(tmp_path):
    assert D.find_data_dir(str(tmp_path / "nope")) is None
    assert D.find_data_dir(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("text,n,idx", [("3", 4, 2), ("Answer: 2.", 4, 1), ("7", 4, None), ("none", 3, None)])
def test_parse_option_number(text, n, idx):
    assert D.parse_option_number(text, n) == idx
