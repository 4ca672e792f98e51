"""Serve and evaluation on a CUDA GPU: the adapter server and the evaluation actors ask Ray for a
GPU and run the base model there in bfloat16.

python -m pytest tests/gpu/test_serve_eval_gpu.py -q
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ray", reason="needs ray: install the project with its GPU extra (CM_RAY_GPU_INSTALL=1 bash scripts/test_gpu.sh)")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cm_ray.storage import ArtifactStore

    tmp = tmp_path_factory.mktemp("gpu-serve")
    store = ArtifactStore(str(tmp / "root"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp / "GB")
    store.upload_dir(tmp / "GB", "adapters", "GB")
    return store.root


def test_serve_replica_on_gpu_answers(ray_local, adapter_root, tiny_model_dir):
    import requests
    from ray.util.state import list_actors

    from cm_ray.config import load_config
    from tests.conftest import free_port, serve_app

    cfg = load_config(None, [f"root={adapter_root}", f"models.base={tiny_model_dir}", "cultures=[GB]",
                             "router.kind=header", "serve.num_gpus=1", "serve.max_new_tokens=8"])
    app = serve_app(cfg, "gpu", free_port())
    base = next(app)
    try:
        r = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "GB", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]})
        assert r.status_code == 200 and r.json()["culture"] == "GB", r.text
        servers = [a for a in list_actors(detail=True) if "AdapterServer" in a.class_name and a.state == "ALIVE"]
        assert servers and all(a.required_resources.get("GPU") == 1 for a in servers)
    finally:
        next(app, None)


def test_evaluation_actor_runs_bf16_on_cuda(ray_local, adapter_root, tiny_model_dir):
    import ray

    from cm_ray.eval.workers import EvalWorker, RemoteEvalModel

    actor = ray.remote(EvalWorker).options(num_gpus=1).remote(tiny_model_dir, None, adapter_root, ["GB"], 4, True)
    model = RemoteEvalModel([actor])
    try:
        (info,) = model.workers
        assert info["device"] == "cuda" and info["gpu_ids"] and info["adapters"] == ["GB"]
        (scores,) = model.score([[{"role": "user", "content": "Pick one"}]], [["yes", "no"]], "GB")
        assert len(scores) == 2 and all(s < 0 for s in scores)
    finally:
        model.close()
