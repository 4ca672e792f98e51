"""The train stage on a GPU: bf16 DeepSpeed LoRA under Ray Train, adapters reload in plain PEFT.

python -m pytest tests/gpu/test_train_gpu.py -q
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray", reason="needs ray: install the project with its GPU extra (CM_RAY_GPU_INSTALL=1 bash scripts/test_gpu.sh)")
pytest.importorskip("deepspeed", reason="needs DeepSpeed (the project's dependencies; it may travel as a wheel)")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/cm_ray/torch_extensions"))


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_lora_trains_on_gpu_and_reloads(ray_local, tiny_model_dir, tmp_path, stage):
    from peft import PeftModel

    from cm_ray.config import load_config
    from cm_ray.storage import ArtifactStore
    from cm_ray.train.lora import check_adapter, load_base_model
    from cm_ray.train.tune import run_training
    from cm_ray.tasks import load_task

    store = ArtifactStore(str(tmp_path / "root"))
    for task in ("offensive", "survey"):
        spec = load_task(task)
        rows = [{"id": f"{task}-{k}-{i}", "culture": "GB", "task": task, "messages": spec.messages(ex),
                 "split": "validation" if k == 2 else "train"}
                for k in range(3) for i, ex in enumerate(spec.examples)]
        store.write_table(rows, "synth", "culture=GB", f"task={task}", "part-0.parquet")
    cfg = load_config(None, [f"root={store.root}", f"models.base={tiny_model_dir}", "cultures=[GB]",
                             "tasks=[offensive, survey]", "train.joint_baseline=false", "train.use_gpu=true",
                             "train.lr=0.01", "train.epochs=3", "train.target_modules=[all-linear]",
                             f"train.deepspeed={{zero_optimization: {{stage: {stage}}}}}"])
    summary = run_training(cfg, store)
    assert summary["trained"] == ["GB"], summary
    from cm_ray.artifacts import published_adapter

    gb = published_adapter(store, "GB")[0]  # the current published version
    m = store.read_json(*gb, "metrics.json")
    assert m["device"] == "cuda" and m["final_loss"] < m["first_loss"]
    check_adapter(store.local_path(*gb))
    PeftModel.from_pretrained(load_base_model(tiny_model_dir), str(store.local_path(*gb)))
