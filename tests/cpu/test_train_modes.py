"""The production training branches for real: 2 Ray Train workers per trial (DeepSpeed ZeRO-2,
packing on) on both trial layouts, the continual mode (two phases, a crash between them) and the
multitask mode on CLCA's multi-turn rows; tiny Llama, one local Ray session for the module.

TORCH_EXTENSIONS_DIR=/root/.cache/cm_ray/torch_extensions python -m pytest tests/cpu/test_train_modes.py -q -x

2 workers vs 1: every optimizer step takes the whole epoch (batch 1, grad_accum = rows / workers),
so with the gradients averaged over the workers the step is the mean over every row whichever
worker read it, and the adapters agree to float rounding; without the all-reduce each worker would
step on its half of the rows alone and the published (rank 0) adapter would differ by ~lr.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/root/.cache/cm_ray/torch_extensions")

from cm_ray import artifacts  # noqa: E402
from cm_ray.config import load_config  # noqa: E402
from cm_ray.storage import ArtifactStore  # noqa: E402

TOLERANCE = 1e-4
"""Max abs difference between an adapter trained by 2 workers and by 1 (fp32, lr 0.01)."""

AGENTS = [{"name": "Li Wei", "background": "grew up in Chengdu", "occupation": "teacher",
           "goal": "get the neighbour to turn the music down", "secret": "works night shifts"},
          {"name": "Zhang Min", "background": "student", "occupation": "musician",
           "goal": "keep practising", "secret": "has an exam tomorrow"}]


def write_rows(store, culture: str, n: int, task: str = "offensive") -> None:
    """``n`` synth rows of one task in the synthesis stage's format (every 4th a validation row)."""
    from cm_ray.tasks import load_task

    spec = load_task(task)
    rows = []
    for i in range(n):
        msgs = spec.messages(spec.examples[i % len(spec.examples)])
        msgs[0]["content"] += f"\nCulture: {culture}, respondent {i}"
        rows.append(artifacts.synth_row(
            id=f"{culture}-{task}-{i}", culture=culture, task=task,
            split="validation" if i % 4 == 3 else "train", sample={"i": i},
            input=msgs[0]["content"], output=msgs[1]["content"], messages=msgs))
    artifacts.write_synth_partition(store, culture, task, rows)


def write_clca_rows(store, culture: str, n: int) -> None:
    """CLCA's synth rows (``recipes.clca.dialogue_views``): multi-turn dialogue views from each
    speaker's side (``clca_dialogue``) and intent prediction (``clca_intent``)."""
    from cm_ray.recipes.clca import dialogue_views

    by_task: dict[str, list] = {}
    for i in range(n):
        d = {"culture": culture,
             "scenario": {"setting": f"A stairwell at night, evening {i}.", "agents": AGENTS},
             "turns": [{"speaker": 0, "action": "speak", "output": f"Sorry to bother you ({i})...",
                        "intent": "save face"},
                       {"speaker": 1, "action": "non-verbal", "output": "nods", "intent": "agree politely"},
                       {"speaker": 0, "action": "speak", "output": "Could it be quieter after ten?"}]}
        for k, (task, msgs) in enumerate(dialogue_views(d)):
            rows = by_task.setdefault(task, [])
            rows.append(artifacts.synth_row(
                culture=culture, task=task, split="validation" if i % 4 == 3 else "train",
                sample={"i": i, "view": k}, input=d["scenario"]["setting"],
                output=[m["content"] for m in msgs if m["role"] == "assistant"][-1], messages=msgs))
    for task, rows in by_task.items():
        artifacts.write_synth_partition(store, culture, task, rows)


def _cfg(root, model_dir, *overrides):
    return load_config(None, [f"root={root}", f"models.base={model_dir}", "tasks=[offensive]",
                              "train.target_modules=[all-linear]", "train.lr=0.01", "train.batch_size=1",
                              "train.max_seq_len=256", "train.packing=true", "train.shuffle_buffer=0",
                              "train.deepspeed={zero_optimization: {stage: 2}}", "train.joint_baseline=false",
                              "train.max_failures=1", *overrides])


def _published(store, name):
    return artifacts.published_adapter(store, name)[0]


def _weights(store, name, tmp_path):
    from safetensors.torch import load_file

    local = store.download_dir(tmp_path / f"{name}-{abs(hash(store.root))}", *_published(store, name))
    return load_file(str(local) + "/adapter_model.safetensors"), local


def _peft_probe(model_dir, adapter_dir):
    """The probe logits of ``adapter_dir`` loaded with plain PEFT (as Serve loads it)."""
    import torch
    from peft import PeftModel

    from cm_ray.train.data import get_tokenizer
    from cm_ray.train.lora import load_base_model
    from cm_ray.train.save import PROBE_TEXT

    model = PeftModel.from_pretrained(load_base_model(model_dir), str(adapter_dir))
    ids = get_tokenizer(model_dir)(PROBE_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits[0, -1, :8]


def _train_rows(store, model_dir, cfg, adapter) -> list[tuple[str, int]]:
    """(dataset, train rows) per phase as the trial sees them (packed rows when packing)."""
    from cm_ray.train.tune import _phase_sources, build_datasets

    return build_datasets(cfg.train, model_dir, store, adapter, _phase_sources(cfg, store, adapter))[1]


def test_multitask_joint_adapter_reads_every_task_partition(tmp_path):
    """multitask mode mixes every task partition of a culture; the joint baseline beside it must
    read the same partitions of every culture, not the run's ``tasks`` (which CLCA's rows are not)."""
    from cm_ray.train.tune import _phase_sources, has_data

    store = ArtifactStore(str(tmp_path))
    write_clca_rows(store, "GB", 2)
    write_clca_rows(store, "CN", 2)
    cfg = load_config(None, [f"root={store.root}", "cultures=[GB, CN]", "tasks=[survey]",
                             "train.mode=multitask", "train.joint_baseline=true"])
    assert _phase_sources(cfg, store, "GB") == [[("GB", ["clca_dialogue", "clca_intent"])]]
    assert _phase_sources(cfg, store, artifacts.JOINT) == [[("GB", ["clca_dialogue", "clca_intent"]),
                                                            ("CN", ["clca_dialogue", "clca_intent"])]]
    assert has_data(cfg, store, artifacts.JOINT)


@pytest.mark.slow
def test_two_workers_zero2_train_the_adapter_one_worker_trains_on_both_trial_layouts(
        ray_local, tiny_model_dir, tmp_path):
    import torch

    from cm_ray.train.tune import run_training

    stores = {k: ArtifactStore(str(tmp_path / k)) for k in ("one", "two", "packed")}
    for store in stores.values():
        write_rows(store, "GB", 16)
    write_rows(stores["packed"], "CN", 10)
    probe_cfg = _cfg(stores["one"].root, tiny_model_dir, "cultures=[GB]")
    [(_, rows)] = _train_rows(stores["one"], tiny_model_dir, probe_cfg, "GB")
    assert rows >= 4 and rows % 2 == 0, rows  # packed rows; every worker gets rows / 2 of them

    # One optimizer step per epoch: the global batch is every row, for 1 worker and for 2.
    one = run_training(_cfg(stores["one"].root, tiny_model_dir, "cultures=[GB]", "train.epochs=3",
                            f"train.grad_accum={rows}", "train.num_workers=1"), stores["one"])
    two = run_training(_cfg(stores["two"].root, tiny_model_dir, "cultures=[GB]", "train.epochs=3",
                            f"train.grad_accum={rows // 2}", "train.num_workers=2"), stores["two"])
    packed = run_training(_cfg(stores["packed"].root, tiny_model_dir, "cultures=[GB, CN]", "train.epochs=3",
                               f"train.grad_accum={rows // 2}", "train.num_workers=2", "train.trials=packed",
                               "train.packs=1"), stores["packed"])
    assert one["trained"] == ["GB"] and two["trained"] == ["GB"], (one, two)
    assert packed["trained"] == ["CN", "GB"] and packed["packs"] == [["GB", "CN"]], packed

    metrics = {k: s.read_json(*_published(s, "GB"), "metrics.json") for k, s in stores.items()}
    assert [metrics[k]["world_size"] for k in ("one", "two", "packed")] == [1, 2, 2]
    for k, m in metrics.items():
        assert m["zero_stage"] == 2 and m["steps"] == m["total_steps"] == 3, (k, m)
        assert m["rows"] == {"train_0": rows}, (k, m["rows"])
        assert m["final_loss"] < m["first_loss"], (k, m["loss_curve"])
        assert m["val_loss"] is not None, k
    # The step losses are means over every row, whoever read them.
    for k in ("two", "packed"):
        for (s1, l1), (s2, l2) in zip(metrics["one"]["loss_curve"], metrics[k]["loss_curve"]):
            assert s1 == s2 and abs(l1 - l2) < 1e-3, (k, metrics["one"]["loss_curve"], metrics[k]["loss_curve"])

    ref, _ = _weights(stores["one"], "GB", tmp_path)
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 1e-3  # it trained
    for k in ("two", "packed"):
        got, local = _weights(stores[k], "GB", tmp_path)
        assert sorted(got) == sorted(ref)
        diff = max(float((got[n] - ref[n]).abs().max()) for n in ref)
        assert diff <= TOLERANCE, (k, diff)
        # Published, and plain PEFT reproduces the trained model's own probe logits.
        torch.testing.assert_close(_peft_probe(tiny_model_dir, local), torch.tensor(metrics[k]["probe_logits"]),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("trials", ["per_adapter", "packed"])
def test_continual_trains_two_phases_and_resumes_at_the_phase_boundary(ray_local, tiny_model_dir, tmp_path, trials):
    from cm_ray.train.tune import run_training

    store = ArtifactStore(str(tmp_path / "root"))
    write_rows(store, "GB", 6, task="survey")       # phase 1: culture SFT
    write_rows(store, "GB", 12, task="offensive")   # phase 2: task adaptation
    base = ["cultures=[GB]", "tasks=[survey, offensive]", "train.mode=continual", "train.continual_first=[survey]",
            "train.packing=false", "train.epochs=1", "train.num_workers=2", f"train.trials={trials}"]
    phase_rows = _train_rows(store, tiny_model_dir, _cfg(store.root, tiny_model_dir, *base), "GB")
    assert [n for n, _ in phase_rows] == ["train_0", "train_1"]
    first = phase_rows[0][1] // 2  # optimizer steps of phase 1 (batch 1, 2 workers)
    second = phase_rows[1][1] // 2
    assert first >= 2 and second >= 2, phase_rows
    # Checkpoints every `first` steps: one at the phase boundary; the worker dies one step into phase 2.
    marker = tmp_path / "crashed"
    cfg = _cfg(store.root, tiny_model_dir, *base, f"train.checkpoint_every_steps={first}")
    summary = run_training(cfg, store, fault={"GB": {"at_step": first + 1, "marker": str(marker)}})
    assert summary["trained"] == ["GB"] and summary["mode"] == "continual", summary

    m = store.read_json(*_published(store, "GB"), "metrics.json")
    assert marker.exists() and m["resumed_from"] == [first], m["resumed_from"]
    assert m["rows"] == dict(phase_rows) and m["world_size"] == 2
    assert m["total_steps"] == first + second
    assert [s for s, _ in m["loss_curve"]] == list(range(1, first + second + 1))  # each step once
    _, local = _weights(store, "GB", tmp_path)
    import torch

    torch.testing.assert_close(_peft_probe(tiny_model_dir, local), torch.tensor(m["probe_logits"]),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_multitask_trains_one_adapter_on_clca_dialogue_and_intent_rows(ray_local, tiny_model_dir, tmp_path):
    import torch

    from cm_ray.train.lora import check_adapter
    from cm_ray.train.tune import run_training

    store = ArtifactStore(str(tmp_path / "root"))
    write_clca_rows(store, "GB", 4)
    cfg = _cfg(store.root, tiny_model_dir, "cultures=[GB]", "tasks=[survey]", "train.mode=multitask",
               "train.preset=clca", "train.lr=0.01", "train.epochs=2", "train.max_seq_len=768",
               "train.packing=false")
    summary = run_training(cfg, store)
    assert summary["trained"] == ["GB"] and not summary["failed"], summary
    m = store.read_json(*_published(store, "GB"), "metrics.json")
    dialogue = artifacts.read_synth(store, "GB", "clca_dialogue")
    intent = artifacts.read_synth(store, "GB", "clca_intent")
    n_train = sum(t.column("split").to_pylist().count("train") for t in (dialogue, intent))
    assert dialogue.num_rows and intent.num_rows and m["rows"] == {"train_0": n_train}  # both tasks, one phase
    assert m["mode"] == "multitask" and m["steps"] == m["total_steps"] > 0
    assert m["lora"]["r"] == 4  # the CLCA preset
    _, local = _weights(store, "GB", tmp_path)
    check_adapter(local)
    torch.testing.assert_close(_peft_probe(tiny_model_dir, local), torch.tensor(m["probe_logits"]),
                               atol=1e-4, rtol=1e-4)
