"""The train stage for real: Ray Tune trials running Ray Train + DeepSpeed on CPU with a tiny model.

TORCH_EXTENSIONS_DIR=/root/.cache/cm_ray/torch_extensions python -m pytest tests/cpu/test_train.py -q -x

Two runs share one local Ray session (each Train worker costs 20-30 s to start):
  * ZeRO-2 on the S3 (moto) store: cultures GB, CN, MX as parallel trials, BR with broken data, PE with none;
    GB's worker kills itself once mid-run and must resume from its checkpoint; then a rerun.
  * ZeRO-3, joint mode on a local store: the adapter must hold real weights.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/root/.cache/cm_ray/torch_extensions")
pytest.importorskip("deepspeed")

from cm_ray.artifacts import published_adapter  # noqa: E402
from cm_ray.config import load_config  # noqa: E402
from cm_ray.storage import ArtifactStore  # noqa: E402
from cm_ray.tasks import load_task  # noqa: E402
from cm_ray.train.tune import run_training  # noqa: E402
from tests.conftest import REPO  # noqa: E402


def published(store, name: str) -> tuple[str, ...]:
    """Where the current version of an adapter lies (adapters are published as versions)."""
    return published_adapter(store, name)[0]


pytestmark = pytest.mark.slow


def write_synth(store, culture: str, tasks=("offensive", "survey"), copies: int = 3) -> None:
    """Synth partitions in the synthesis stage's format, from the task specs' seed examples.

    Each culture gets its own answers (its name in the question, examples rotated), so a memorised
    set per culture and distinct adapters.
    """
    for t_i, task in enumerate(tasks):
        spec = load_task(task)
        rows = []
        for k in range(copies):
            for i, ex in enumerate(spec.examples):
                msgs = spec.messages(ex)
                msgs[0]["content"] += f"\nCulture: {culture}"
                rows.append({"id": f"{culture}-{task}-{k}-{i}", "culture": culture, "task": task,
                             "split": "validation" if k == copies - 1 else "train",
                             "input": msgs[0]["content"], "output": msgs[1]["content"],
                             "messages": msgs, "label": None})
        store.write_table(rows, "synth", f"culture={culture}", f"task={task}", "part-0.parquet")


def _cfg(root, model_dir, *overrides):
    return load_config(None, [f"root={root}", f"models.base={model_dir}", "tasks=[offensive, survey]",
                              "train.target_modules=[all-linear]", "train.lr=0.01", "train.epochs=3",
                              "train.batch_size=4", "train.max_seq_len=160", "train.max_failures=1",
                              *overrides])


def _logits(model_dir, adapter_dir=None):
    import torch
    from peft import PeftModel

    from cm_ray.train.data import get_tokenizer
    from cm_ray.train.lora import load_base_model
    from cm_ray.train.save import PROBE_TEXT

    model = load_base_model(model_dir)
    if adapter_dir:
        model = PeftModel.from_pretrained(model, str(adapter_dir))  # plain PEFT, as Serve loads it
    ids = get_tokenizer(model_dir)(PROBE_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits[0, -1]


def test_parallel_culture_trials_resume_isolate_failures_and_skip_on_rerun(
        ray_local, s3_root, tiny_model_dir, tmp_path):
    import torch

    store = ArtifactStore(s3_root)
    for c in ("GB", "CN", "MX"):
        write_synth(store, c)
    store.write_bytes(b"not a parquet file", "synth", "culture=BR", "task=offensive", "part-0.parquet")
    store.write_bytes(b"not a parquet file", "synth", "culture=BR", "task=survey", "part-0.parquet")
    cfg = _cfg(s3_root, tiny_model_dir, "cultures=[GB, CN, MX, BR, PE]", "train.joint_baseline=false",
               "train.checkpoint_every_steps=2")
    marker = tmp_path / "gb-crashed"
    summary = run_training(cfg, store, fault={"GB": {"at_step": 5, "marker": str(marker)}})

    # BR's broken data fails its own trial only, and the summary says so.
    assert summary["trained"] == ["CN", "GB", "MX"]
    assert list(summary["failed"]) == ["BR"] and summary["complete"] is False
    assert "1 failed" in summary["headline"] and "BR" in summary["headline"]
    # PE has no synth partition at all: no trial is spent on it, and the summary names it.
    assert summary["no_data"] == ["PE"] and "no synth data: PE" in summary["headline"]

    metrics = {c: store.read_json(*published(store, c), "metrics.json") for c in ("GB", "CN", "MX")}
    for c, m in metrics.items():
        steps = [s for s, _ in m["loss_curve"]]
        assert steps == list(range(1, m["total_steps"] + 1)), c  # each step once, none lost
        assert m["final_loss"] < m["first_loss"] - 0.3, (c, m["loss_curve"])  # memorising
        assert m["val_loss"] is not None and m["tokens_per_s"] > 0 and m["zero_stage"] == 2
    # GB's worker died at step 5 and continued from a checkpoint (an even step < 5), not from 0.
    assert marker.exists()
    resumed = metrics["GB"]["resumed_from"]
    assert len(resumed) == 1 and resumed[0] in (2, 4), resumed
    assert metrics["CN"]["resumed_from"] == [] and store.files("checkpoints")

    # Adapters load with plain PeftModel.from_pretrained, reproduce the trained model's logits and
    # differ from each other and from the base model.
    local = {c: store.download_dir(tmp_path / c, *published(store, c)) for c in ("GB", "CN", "MX")}
    logits = {c: _logits(tiny_model_dir, d) for c, d in local.items()}
    for c in local:
        torch.testing.assert_close(logits[c][:8], torch.tensor(metrics[c]["probe_logits"]),
                                   atol=1e-4, rtol=1e-4)
    base = _logits(tiny_model_dir)
    for a, b in [("GB", "CN"), ("GB", "MX"), ("CN", "MX")]:
        assert not torch.allclose(logits[a], logits[b], atol=1e-3)
    assert all(not torch.allclose(v, base, atol=1e-3) for v in logits.values())

    # A rerun skips complete adapters (no retraining) and retries only the failed culture.
    again = run_training(cfg, store)
    assert sorted(again["skipped"]) == ["CN", "GB", "MX"] and list(again["failed"]) == ["BR"]
    assert store.read_json(*published(store, "GB"), "metrics.json") == metrics["GB"]


def test_zero3_joint_adapter_holds_real_weights(ray_local, tiny_model_dir, tmp_path):
    import torch

    from cm_ray.train.lora import check_adapter

    store = ArtifactStore(str(tmp_path / "root"))
    for c in ("GB", "MX"):
        write_synth(store, c, copies=2)
    cfg = _cfg(store.root, tiny_model_dir, "cultures=[GB, MX]", "train.mode=joint", "train.epochs=1",
               "train.packing=true", "train.deepspeed={zero_optimization: {stage: 3}}")
    summary = run_training(cfg, store)
    assert summary["trained"] == ["_joint"] and not summary["failed"]
    adapter = store.local_path(*published(store, "_joint"))
    shapes = check_adapter(adapter)  # raises on empty (ungathered ZeRO-3) tensors
    assert all(0 not in s for s in shapes.values()) and any("mlp" in k for k in shapes)
    m = store.read_json(*published(store, "_joint"), "metrics.json")
    assert m["zero_stage"] == 3 and m["rows"]["train_0"] > 0
    torch.testing.assert_close(_logits(tiny_model_dir, adapter)[:8], torch.tensor(m["probe_logits"]),
                               atol=1e-4, rtol=1e-4)


def test_deepspeed_builds_its_op_with_the_venvs_ninja_even_when_path_lacks_the_venv():
    """The venv's python run without activating the venv (scripts/demo.sh does) must not pick up a
    system ninja: two ninja versions invalidate each other's build log, and each rebuilds the
    op at a worker's start."""
    import subprocess
    import sys
    import sysconfig

    scripts = sysconfig.get_path("scripts")
    assert os.path.exists(os.path.join(scripts, "ninja")), "deepspeed's ninja dependency is not installed"
    code = ("import shutil; from cm_ray.train.setup import import_deepspeed; import_deepspeed(); "
            "print(shutil.which('ninja'))")
    env = {**os.environ, "PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == os.path.join(scripts, "ninja")
