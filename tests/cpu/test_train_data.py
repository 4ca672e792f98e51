"""Chat tokenization with assistant-only loss, packing and the step plan (no Ray).

python -m pytest tests/cpu/test_train_data.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from cm_ray.config import TrainConfig
from cm_ray.train.data import IGNORE, collate, get_tokenizer, pack_rows, tokenize_batch, tokenize_chat

CHAT = [{"role": "user", "content": "Greet me"}, {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hi again"}]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return get_tokenizer(tiny_model_dir)


def test_loss_only_on_assistant_turns_of_a_multi_turn_chat(tok):
    row = tokenize_chat(tok, CHAT, 512)
    full = tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == full  # same tokens as the template renders at serving time
    learned = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])
    assert "Hello there" in learned and "Hi again" in learned
    assert "Greet me" not in learned and "Again" not in learned and "user" not in learned
    assert learned.count(tok.eos_token if tok.eos_token in learned else "<|im_end|>") == 2


def test_truncation_that_cuts_every_answer_drops_the_row(tok):
    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "yes"}]
    assert tokenize_chat(tok, long, 64) is None
    with pytest.raises(ValueError, match="no assistant"):
        tokenize_chat(tok, CHAT[:1], 64)


def test_system_prompt_is_added_only_when_missing(tiny_model_dir, tok):
    batch = {"messages": np.array([CHAT, [{"role": "system", "content": "Own"}] + CHAT[:2]], dtype=object),
             "split": np.array(["train", "validation"])}
    out = tokenize_batch(batch, tiny_model_dir, 512, system_prompt="You are a person from Mexico.")
    first, second = (tok.decode(list(x)) for x in out["input_ids"])
    assert "Mexico" in first and "Mexico" not in second and "Own" in second
    assert list(out["split"]) == ["train", "validation"]


def test_packing_keeps_labels_and_restarts_positions(tok):
    rows = [tokenize_chat(tok, CHAT[:2], 512) for _ in range(5)]
    n = len(rows[0]["input_ids"])
    batch = {"input_ids": [np.array(r["input_ids"]) for r in rows],
             "labels": [np.array(r["labels"]) for r in rows], "split": np.array(["train"] * 5)}
    packed = pack_rows(batch, max_seq_len=2 * n + 1)
    assert list(packed["n_tokens"]) == [2 * n, 2 * n, n]
    assert list(packed["position_ids"][0]) == list(range(n)) * 2
    assert sum((np.asarray(x) != IGNORE).sum() for x in packed["labels"]) == \
        5 * sum(1 for x in rows[0]["labels"] if x != IGNORE)
    t = collate(packed, tok.pad_token_id)
    assert t["input_ids"].shape == (3, 2 * n) and int(t["attention_mask"][2].sum()) == n
    assert (t["labels"][2, n:] == IGNORE).all() and "position_ids" in t


def test_step_plan_ends_each_phase_on_an_optimizer_step():
    from cm_ray.train.loop import steps_plan

    tc = TrainConfig(batch_size=2, grad_accum=2, epochs=1.5)
    phases, total = steps_plan([("train_0", 10), ("train_1", 7)], tc, world=1)
    assert [p["micro_per_epoch"] for p in phases] == [5, 4]
    assert [p["end_micro"] for p in phases] == [8, 14] and total == 7  # ceil(1.5 * 5), ceil(1.5 * 4)
    capped, total = steps_plan([("train_0", 100)], TrainConfig(max_steps=3), world=2)
    assert total == 3 and capped[0]["micro_per_epoch"] == 13
    with pytest.raises(ValueError, match="rows for 4 workers"):
        steps_plan([("train_0", 3)], tc, world=4)


def test_modes_pick_their_partitions_and_phases(tmp_path):
    from cm_ray.config import load_config
    from cm_ray.storage import ArtifactStore
    from cm_ray.train.tune import _phase_sources, adapter_names

    store = ArtifactStore(str(tmp_path))
    for task in ("cultural_qa", "offensive", "dialogue", "intent"):
        store.write_table([{"x": 1}], "synth", "culture=MX", f"task={task}", "part-0.parquet")

    def cfg(*o):
        return load_config(None, ["cultures=[MX, GB]", "tasks=[cultural_qa, offensive]", *o])

    assert adapter_names(cfg()) == ["MX", "GB", "_joint"]
    assert adapter_names(cfg("train.mode=joint")) == ["_joint"]
    assert adapter_names(cfg("train.joint_baseline=false")) == ["MX", "GB"]
    assert _phase_sources(cfg(), store, "MX") == [[("MX", ["cultural_qa", "offensive"])]]
    assert _phase_sources(cfg(), store, "_joint") == [[("MX", ["cultural_qa", "offensive"]),
                                                        ("GB", ["cultural_qa", "offensive"])]]
    # continual: culture SFT on the first tasks, then adaptation on the rest, in that order
    assert _phase_sources(cfg("train.mode=continual", "train.continual_first=[cultural_qa]"), store, "MX") \
        == [[("MX", ["cultural_qa"])], [("MX", ["offensive"])]]
    # multitask: every view the culture has (e.g. CLCA dialogue + intent), mixed in one phase
    assert _phase_sources(cfg("train.mode=multitask"), store, "MX") == \
        [[("MX", ["cultural_qa", "dialogue", "intent", "offensive"])]]
