"""Packed training (``train.trials: packed``): several culture adapters in one Ray Train run.

TORCH_EXTENSIONS_DIR=/root/.cache/cm_ray/torch_extensions python -m pytest tests/cpu/test_train_pack.py -q -x

* balanced packs by token count (pure functions);
* for real (Ray Tune + Ray Train + DeepSpeed ZeRO-2 + PEFT named adapters, tiny Llama): GB and CN
  trained alone (one trial each) and in a pack give the same weights (max abs diff <= 1e-5, fp32),
  even though the pack's worker is killed once mid-run and resumes from its checkpoint; BR's
  unreadable partition and AR's rows without an assistant turn fail only those two cultures (and
  the joint adapter, in its own trial beside the packs, which reads BR's file too).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/root/.cache/cm_ray/torch_extensions")

from cm_ray.config import ConfigError, load_config  # noqa: E402
from cm_ray.train.pack import balanced_packs  # noqa: E402

TOLERANCE = 1e-5
"""Max abs difference between an adapter's weights trained in a pack and alone (fp32)."""


def test_balanced_packs_largest_first_into_the_lightest_bin():
    weights = {"A": 100, "B": 90, "C": 50, "D": 40, "E": 10, "F": 10}
    packs = balanced_packs(weights, 2)
    assert packs == [["A", "D", "E"], ["B", "C", "F"]]
    loads = [sum(weights[n] for n in p) for p in packs]
    assert max(loads) - min(loads) <= 10
    assert balanced_packs(weights, 2) == packs  # deterministic
    # More bins than cultures: one culture per pack; a cap per pack raises the number of packs.
    assert sorted(map(len, balanced_packs(weights, 10))) == [1] * 6
    capped = balanced_packs(weights, 1, max_per_pack=4)
    assert len(capped) == 2 and all(len(p) <= 4 for p in capped)
    assert sorted(n for p in capped for n in p) == sorted(weights)
    # 200 cultures of 20-200 rows' worth of tokens into 3 packs: within 1% of each other.
    many = {f"C{i:03d}": 20 + (i * 37) % 181 for i in range(200)}
    loads = [sum(many[n] for n in p) for p in balanced_packs(many, 3)]
    assert (max(loads) - min(loads)) / max(loads) < 0.01, loads


def test_packed_trials_config_is_validated_by_field():
    assert load_config(None, ["train.trials=packed", "train.packs=4"]).train.packs == 4
    with pytest.raises(ConfigError, match=r"^train\.trials: "):
        load_config(None, ["train.trials=packs"])
    with pytest.raises(ConfigError, match=r"^train\.packs: "):
        load_config(None, ["train.packs=0"])
    with pytest.raises(ConfigError, match=r"^train\.deepspeed\.zero_optimization\.stage: packed"):
        load_config(None, ["train.trials=packed", "train.deepspeed={zero_optimization: {stage: 3}}"])


def write_rows(store, culture: str, n: int, task: str = "offensive", no_answer: bool = False) -> None:
    """``n`` synth rows of one task in the synthesis stage's format (every 4th a validation row);
    ``no_answer`` drops the assistant turns, which tokenization rejects."""
    from cm_ray.tasks import load_task

    spec = load_task(task)
    rows = []
    for i in range(n):
        msgs = spec.messages(spec.examples[i % len(spec.examples)])
        msgs[0]["content"] += f"\nCulture: {culture}, respondent {i}"
        rows.append({"id": f"{culture}-{i}", "culture": culture, "task": task,
                     "split": "validation" if i % 4 == 3 else "train", "input": msgs[0]["content"],
                     "output": msgs[1]["content"], "messages": msgs[:1] if no_answer else msgs,
                     "label": None})
    store.write_table(rows, "synth", f"culture={culture}", f"task={task}", "part-0.parquet")


def _cfg(root, model_dir, *overrides):
    return load_config(None, [f"root={root}", f"models.base={model_dir}", "tasks=[offensive]",
                              "train.target_modules=[all-linear]", "train.lr=0.01", "train.epochs=2",
                              "train.batch_size=2", "train.max_seq_len=128", "train.shuffle_buffer=0",
                              "train.joint_baseline=false", "train.max_failures=1", *overrides])


def _weights(store, name):
    from safetensors.torch import load_file

    return load_file(_local(store, name) + "/adapter_model.safetensors")


def _local(store, name):
    import tempfile

    from cm_ray.artifacts import published_adapter

    return str(store.download_dir(tempfile.mkdtemp(), *published_adapter(store, name)[0]))


@pytest.mark.slow
def test_pack_equals_alone_survives_a_crash_and_isolates_broken_cultures(
        ray_local, s3_root, tiny_model_dir, tmp_path):
    import json

    import torch
    from peft import PeftModel

    from cm_ray.storage import ArtifactStore
    from cm_ray.train.data import get_tokenizer
    from cm_ray.train.lora import load_base_model
    from cm_ray.train.save import PROBE_TEXT
    from cm_ray.train.tune import run_training

    sizes = {"GB": 12, "CN": 8}
    alone = ArtifactStore(str(tmp_path / "alone"))
    packed = ArtifactStore(s3_root)
    for store in (alone, packed):
        for c, n in sizes.items():
            write_rows(store, c, n)
    write_rows(packed, "MX", 16)
    write_rows(packed, "AR", 6, no_answer=True)
    packed.write_bytes(b"not a parquet file", "synth", "culture=BR", "task=offensive", "part-0.parquet")

    base = run_training(_cfg(alone.root, tiny_model_dir, "cultures=[GB, CN]"), alone)
    assert base["trained"] == ["CN", "GB"] and base["trials"] == "per_adapter" and base["packs"] is None

    marker = tmp_path / "cn-crashed"
    # The joint adapter keeps a trial of its own beside the packs; it reads BR's broken file too.
    cfg = _cfg(packed.root, tiny_model_dir, "cultures=[GB, CN, MX, BR, AR, PE]", "train.trials=packed",
               "train.packs=2", "train.checkpoint_every_steps=2", "train.joint_baseline=true")
    summary = run_training(cfg, packed, fault={"CN": {"at_step": 5, "marker": str(marker)}})

    # Broken cultures fail on their own, each with its own error; the packs train the rest.
    assert summary["trained"] == ["CN", "GB", "MX"], summary
    assert sorted(summary["failed"]) == ["AR", "BR", "_joint"] and summary["complete"] is False
    assert "no assistant message" in summary["failed"]["AR"]
    assert "parquet" in summary["failed"]["BR"].lower() and "parquet" in summary["failed"]["_joint"].lower()
    assert summary["no_data"] == ["PE"] and "FAILED: AR, BR, _joint" in summary["headline"]
    packs = summary["packs"]
    assert len(packs) == 2 and sorted(n for p in packs for n in p) == ["AR", "CN", "GB", "MX"]
    assert "2 pack(s)" in summary["headline"]

    metrics = {c: packed.read_json(*_published(packed, c), "metrics.json") for c in ("GB", "CN", "MX")}
    pack_of = {n: i for i, p in enumerate(packs) for n in p}
    for c, m in metrics.items():
        assert [s for s, _ in m["loss_curve"]] == list(range(1, m["total_steps"] + 1)), c
        assert m["zero_stage"] == 2 and m["val_loss"] is not None and m["tokens_per_s"] > 0
        assert m["pack"]["index"] == pack_of[c] and c in m["pack"]["adapters"]
    assert marker.exists()
    # The worker of CN's pack died at CN's step 5 and resumed the whole pack from a checkpoint
    # (round 2 or 4: one reported just before a hard exit may not be registered yet), not from 0.
    crashed = [n for n in packs[pack_of["CN"]] if n in metrics]
    resumed = {n: metrics[n]["resumed_from"] for n in crashed}
    assert len({tuple(r) for r in resumed.values()}) == 1 and resumed["CN"] in ([2], [4]), resumed
    assert all(m["resumed_from"] == [] for n, m in metrics.items() if n not in crashed)

    # Equivalence: same data order and seed -> the same adapter, in a pack (with a crash) or alone.
    for c in sizes:
        a, p = _weights(alone, c), _weights(packed, c)
        assert sorted(a) == sorted(p) and len(a) > 0  # PEFT layout and keys as the one-adapter path
        diff = max(float((a[k] - p[k]).abs().max()) for k in a)
        assert diff <= TOLERANCE, (c, diff)
        m_alone = alone.read_json(*_published(alone, c), "metrics.json")
        assert m_alone["total_steps"] == metrics[c]["total_steps"]
        cfg_a = json.loads(open(_local(alone, c) + "/adapter_config.json").read())
        cfg_p = json.loads(open(_local(packed, c) + "/adapter_config.json").read())
        for conf in (cfg_a, cfg_p):  # PEFT writes the resolved module set in no fixed order
            conf["target_modules"] = sorted(conf["target_modules"])
        assert cfg_a == cfg_p
    assert not torch.equal(_weights(packed, "GB")[sorted(a)[1]], _weights(packed, "MX")[sorted(a)[1]])

    # Plain PEFT loads a packed adapter and reproduces the pack's own probe logits.
    model = PeftModel.from_pretrained(load_base_model(tiny_model_dir), _local(packed, "MX"))
    ids = get_tokenizer(tiny_model_dir)(PROBE_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits[0, -1, :8]
    torch.testing.assert_close(logits, torch.tensor(metrics["MX"]["probe_logits"]), atol=1e-4, rtol=1e-4)

    # A rerun skips the complete adapters and retries only the broken cultures (which fail again).
    again = run_training(cfg, packed)
    assert sorted(again["skipped"]) == ["CN", "GB", "MX"] and sorted(again["failed"]) == ["AR", "BR", "_joint"]


def _published(store, name):
    from cm_ray.artifacts import published_adapter

    return published_adapter(store, name)[0]


def _token_rows(ds, *tags):
    return sorted((*(str(r[t]) for t in tags), tuple(int(x) for x in r["input_ids"]),
                   tuple(int(x) for x in r["labels"])) for r in ds.take_all())


def test_trial_tokenizes_few_rows_in_its_process_to_the_rows_ray_data_gives(ray_local, tiny_model_dir, tmp_path):
    """``train.local_tokenize_rows``: below it a trial runs the tokenizing UDFs in its own process
    (no Ray Data tasks); the token rows (pack and joint, train and validation) are the same."""
    from cm_ray.storage import ArtifactStore
    from cm_ray.train.pack_data import build_pack_dataset
    from cm_ray.train.tune import build_datasets

    store = ArtifactStore(str(tmp_path))
    write_rows(store, "GB", 12)
    write_rows(store, "CN", 8)
    write_rows(store, "AR", 4, no_answer=True)
    members = {"GB": [[("GB", ["offensive"])]], "CN": [[("CN", ["offensive"])]], "AR": [[("AR", ["offensive"])]]}
    joint = [[("GB", ["offensive"]), ("CN", ["offensive"])]]
    got = {}
    for rows in (0, 5000):  # 0: always Ray Data
        tc = _cfg(store.root, tiny_model_dir, f"train.local_tokenize_rows={rows}").train
        ds, errors = build_pack_dataset(tc, tiny_model_dir, store, members)
        assert list(errors) == ["AR"] and "no assistant message" in errors["AR"]
        sets, counts = build_datasets(tc, tiny_model_dir, store, "_joint", joint)
        got[rows] = (_token_rows(ds, "adapter", "phase", "split"), counts,
                     {k: _token_rows(v, "split") for k, v in sets.items()})
    assert got[0] == got[5000]
    pack_rows, counts, joint_sets = got[5000]
    assert {r[0] for r in pack_rows} == {"GB", "CN"} and len(pack_rows) == 20
    assert counts == [("train_0", 15)] and len(joint_sets["validation"]) == 5
