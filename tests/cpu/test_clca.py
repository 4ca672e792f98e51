"""CLCA recipe: scenario checks, the judge's drop rule, SFT views, and the recipe end to end on a
tiny model through Ray.  python -m pytest tests/cpu/test_clca.py -q
"""

import json

import pytest

from cm_ray.config import load_config
from cm_ray.artifacts import SYNTH_COLUMNS
from cm_ray.recipes import clca as R
from cm_ray.storage import ArtifactStore

from tests.conftest import assert_synth_contract

AGENTS = [{"name": "Li Wei", "background": "grew up in Chengdu", "occupation": "teacher",
           "goal": "get the neighbour to turn the music down", "secret": "works night shifts"},
          {"name": "Zhang Min", "background": "student", "occupation": "musician",
           "goal": "keep practising", "secret": "has an exam tomorrow"}]
DIALOGUE = {"culture": "CN", "scenario": {"setting": "A stairwell in a Chengdu apartment block at night.",
                                          "agents": AGENTS},
            "turns": [{"speaker": 0, "action": "speak", "output": "Sorry to bother you...", "intent": "save face"},
                      {"speaker": 1, "action": "non-verbal", "output": "nods"},
                      {"speaker": 0, "action": "speak", "output": "Could it be quieter after ten?"},
                      {"speaker": 1, "action": "leave", "output": ""}]}


@pytest.mark.parametrize("verdict,drop", [
    ({"quality": "bad", "quality_confidence": "very confident"}, True),
    ({"quality": "bad", "quality_confidence": "confident", "meta_quality": "bad",
      "meta_quality_confidence": "very confident"}, True),
    ({"quality": "bad", "quality_confidence": "confident", "meta_quality": "bad",
      "meta_quality_confidence": "not sure"}, False),
    ({"quality": "good", "quality_confidence": "very confident", "culture_alignment": "bad",
      "culture_alignment_confidence": "very confident"}, False),  # alignment alone never drops
])
def test_judge_drop_rule_is_the_seeds(verdict, drop):
    assert R.should_drop(verdict) is drop


def test_scenario_validation_reasons():
    assert R.valid_scenario({"setting": "A long enough setting.", "agents": AGENTS}) is None
    assert R.valid_scenario({"setting": "A long enough setting.", "agents": AGENTS[:1]}) == "not_two_agents"
    assert R.valid_scenario({"setting": "x", "agents": AGENTS}) == "missing_setting"
    assert R.valid_scenario({"setting": "A long enough setting.", "agents": [AGENTS[0], AGENTS[0]]}) == "same_names"
    assert R.valid_scenario({"setting": "A long enough setting.",
                             "agents": [AGENTS[0], {**AGENTS[1], "goal": " "}]}) == "incomplete_agent"


@pytest.mark.parametrize("text,turn", [
    ("Li Wei: Sorry to bother you. It is late. Could you help?\nZhang Min: No.",
     {"action": "speak", "output": "Sorry to bother you. It is late."}),
    ('"Good evening, Zhang Min."', {"action": "speak", "output": "Good evening, Zhang Min."}),
    ("*bows slightly*", {"action": "non-verbal", "output": "bows slightly"}),
    ("Goodnight then. [leave]", {"action": "leave", "output": "Goodnight then."}),
    ("   ", {"action": "none", "output": ""}),
    ("... !!", None),
])
def test_text_turns_read_the_action_off_the_line(text, turn):
    assert R.parse_text_turn(text) == turn


def test_text_turn_requests_carry_no_schema_and_name_the_speaker():
    d = {**DIALOGUE, "turns": DIALOGUE["turns"][:1]}
    req = R._turn_request(d, "text")
    assert "json_schema" not in req and "Zhang Min says next to Li Wei" in req["messages"][1]["content"]
    assert R._turn_request(d)["json_schema"] == R.TURN_SCHEMA


def test_views_are_each_speakers_side_and_intents():
    views = R.dialogue_views(DIALOGUE)
    assert [t for t, _ in views] == ["clca_dialogue", "clca_dialogue", "clca_intent"]
    first, second, intent = (m for _, m in views)
    # Speaker 0 opens: a user placeholder comes first; the goal and secret of speaker 0 stay in its view.
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    assert "works night shifts" in first[0]["content"] and "has an exam" not in first[0]["content"]
    assert "Hofstede" in first[0]["content"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user", "assistant"]
    assert second[2]["content"] == "*nods*" and second[-1]["content"].startswith("(leaves")
    assert [m["content"] for m in intent if m["role"] == "assistant"] == ["save face"]


@pytest.mark.slow
def test_recipe_writes_multiturn_rows_with_counted_drops(ray_local, tiny_model_dir, tmp_path):
    from cm_ray.stages import run_stage

    cfg = load_config("configs/clca.yaml", [
        f"root={tmp_path}", f"models.generator={tiny_model_dir}", "cultures=[GB, CN]",
        "clca.scenarios_per_culture=2", "clca.max_turns=2",
        "clca.turn_max_new_tokens=32", "clca.judge_max_new_tokens=64",
        "synthesis.guided_max_string_chars=24"])
    store = ArtifactStore(cfg.root)
    out = run_stage("clca", cfg, store)
    d = out["drops"]
    scen_drops = sum(v for k, v in d.items() if k.startswith("scenario:"))
    dia_drops = sum(v for k, v in d.items() if k.startswith("dialogue:"))
    assert out["scenarios_requested"] == 4 == out["dialogues"] + scen_drops
    assert out["dialogues"] == out["dialogues_kept"] + dia_drops
    assert json.loads((tmp_path / "synth" / "summary.json").read_text())["drops"] == d
    every = json.loads((tmp_path / "recipes" / "clca" / "dialogues.json").read_text())
    assert len(every) == out["dialogues"]
    kept = [d for d in every if "drop_reason" not in d]
    assert len(kept) == out["dialogues_kept"]
    rows = [r for c in cfg.cultures if store.exists("synth", f"culture={c}")
            for r in store.read_rows("synth", f"culture={c}")]
    assert len(rows) == out["rows"] == assert_synth_contract(store)
    for r in rows:
        assert set(SYNTH_COLUMNS) <= set(r) and r["task"] in ("clca_dialogue", "clca_intent")
        roles = [m["role"] for m in r["messages"]]
        assert roles[0] == "system" and roles[1] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles[1:], roles[2:]))  # user/assistant alternate
        assert r["output"] == r["messages"][-1]["content"]
    for dlg in kept:
        assert not R.should_drop(dlg["verdict"])
        assert sum(t["action"] == "speak" for t in dlg["turns"]) >= 2
