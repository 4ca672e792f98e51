"""CultureSPA recipe: question filter, seeds, and the recipe end to end on a tiny model through Ray.

python -m pytest tests/cpu/test_culturespa.py -q
"""

import json

import pytest

from cm_ray.config import load_config
from cm_ray.artifacts import SYNTH_COLUMNS, read_synth
from cm_ray.generation.parsing import extract_json
from cm_ray.recipes import culturespa as R
from cm_ray.storage import ArtifactStore

from tests.conftest import assert_synth_contract


@pytest.mark.parametrize("obj,reason", [
    ({"question": "How often do you visit your parents?", "options": ["1. Weekly", "2) Monthly", "3 - Never"]}, None),
    ({"question": "How old are you in years?", "options": ["18", "30", "50"]}, "numeric_options_without_scale"),
    ({"question": "On a scale from 1 meaning never to 4 meaning always, how often do you vote?",
      "options": ["1", "2", "3", "4"]}, None),
    ({"question": "Short?", "options": ["a", "b"]}, "missing_question"),
    ({"question": "Do you trust your neighbours?", "options": ["Yes"]}, "bad_options"),
    ({"question": "Do you trust your neighbours?", "options": ["Yes", "1. yes"]}, "empty_or_repeated_option"),
    ({"question": "How happy is your family these days?", "options": ["...", "###"]}, "option_without_text"),
    (["not", "an", "object"], "not_an_object"),
])
def test_question_filter_follows_the_seed(obj, reason):
    q, why = R.clean_question(obj)
    assert why == reason
    if reason is None:
        assert all(not o[0].isdigit() or o.isdigit() for o in q["options"])  # labels cleaned
        assert q["options"][0] in ("Weekly", "1")


def test_seed_questions_come_from_wvs_when_present(shared_data):
    cfg = load_config("configs/culturespa.yaml", [f"evaluate.data_dir={shared_data}"])
    pool = R.seed_questions(cfg)
    assert len(pool) == 13 and all(pool.values())
    assert pool[0][0]["question"] == "How important is family in your life?"  # Q1, first topic


def test_seed_questions_fall_back_to_shipped_ones(tmp_path):
    cfg = load_config("configs/culturespa.yaml", [f"evaluate.data_dir={tmp_path / 'none'}"])
    pool = R.seed_questions(cfg)
    assert [p[0]["question"] for p in pool.values()] == [q for q, _ in R.SEEDS]


def test_parse_json_accepts_wrapped_output():
    assert extract_json('Sure! ```json\n{"question": "x", "options": []}\n```', any_value=True) == {
        "question": "x", "options": []}
    with pytest.raises(ValueError):
        extract_json("no json here", any_value=True)


@pytest.mark.parametrize("config,task", [("configs/culturespa.yaml", "survey"),
                                         ("configs/clca.yaml", "clca_dialogue")])
def test_recipe_rows_are_written_in_the_synth_contract(tmp_path, config, task):
    """What the recipe writer (shared by CultureSPA and CLCA) puts on disk: exactly the contract's
    columns, schema and rows, each (culture, task) partition split on its own."""
    from cm_ray.recipes.common import recipe_row, write_synth

    cfg = load_config(config, [f"root={tmp_path}"])
    store = ArtifactStore(cfg.root)
    rows = [recipe_row(cfg, culture=c, task=task, sample={"n": i}, input=f"in {i}", output=f"out {i}",
                       messages=[{"role": "user", "content": f"in {i}"}, {"role": "assistant", "content": f"out {i}"}],
                       label=None, engine="transformers", model="m", prompt=["p", i])
            for c in ("GB", "CN") for i in range(5)]
    counts = write_synth(store, rows, ["GB", "CN"], 0.2)
    assert counts == {f"CN/{task}": 5, f"GB/{task}": 5}
    assert assert_synth_contract(store) == 10
    for c in ("GB", "CN"):
        assert [r["split"] for r in read_synth(store, c).to_pylist()].count("validation") == 1


@pytest.mark.slow
def test_recipe_writes_survey_rows_with_counted_drops(ray_local, tiny_model_dir, tmp_path):
    from cm_ray.stages import run_stage

    cfg = load_config("configs/culturespa.yaml", [
        f"root={tmp_path}", f"models.generator={tiny_model_dir}", f"evaluate.data_dir={tmp_path / 'none'}",
        "culturespa.topics=[0, 5]", "culturespa.questions_per_topic=3", "culturespa.rounds=2",
        "culturespa.question_max_new_tokens=96", "synthesis.guided_max_string_chars=40",
        "synthesis.guided_max_items=4"])
    store = ArtifactStore(cfg.root)
    out = run_stage("culturespa", cfg, store)
    drops = out["drops"]
    q_drops = sum(v for k, v in drops.items() if k.startswith("question:"))
    p_drops = sum(v for k, v in drops.items() if k.startswith("pair:"))
    # Every request and every (culture, question) pair is accounted for: kept or dropped with a reason.
    assert out["question_requests"] == 6 == out["questions_generated"] + q_drops
    assert out["pairs_considered"] == 3 * out["questions_generated"] == out["rows"] + p_drops
    assert json.loads((tmp_path / "synth" / "summary.json").read_text())["drops"] == drops
    assert store.read_manifest("culturespa")["complete"]
    if out["rows"]:
        rows = [r for c in cfg.cultures if store.exists("synth", f"culture={c}")
                for r in store.read_rows("synth", f"culture={c}")]
        assert len(rows) == out["rows"] == assert_synth_contract(store)
        from cm_ray.tasks import load_task

        survey = load_task("survey")
        for r in rows:
            assert set(SYNTH_COLUMNS) <= set(r) and r["task"] == "survey" and r["culture"] in cfg.cultures
            sample = json.loads(r["sample_json"])
            assert survey.validate(sample) is None
            assert r["input"] == survey.render_input(sample) and r["output"] == r["label"] == sample["answer"]
            assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
            assert r["split"] in ("train", "validation") and r["engine"] == "transformers"
