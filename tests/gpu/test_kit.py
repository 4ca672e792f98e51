"""The GPU kit's checks that need only torch, transformers and peft (bench/gpu.py's building
blocks): a bf16 LoRA step learns, only the adapter trains, a packed group's adapters stay separate,
and a mixed-adapter batch equals the same rows run one adapter at a time.

python -m pytest tests/gpu/test_kit.py -q     (bash scripts/test_gpu.sh runs it with the bench)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft", reason="the GPU kit needs peft")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).resolve().parents[2] / "bench" / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)
sys.modules["bench_gpu"] = gpu
_spec.loader.exec_module(gpu)
DEV = torch.device("cuda")


def test_bf16_lora_steps_learn_and_train_only_the_adapter():
    from peft import get_peft_model

    model, cfg = gpu.build("1b", DEV, torch.bfloat16, 256)
    model = get_peft_model(model, gpu.lora())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and "embed" in n}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.bfloat16 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    b = gpu.batch(cfg, 4, 256, DEV)
    losses = []
    for _ in range(8):  # one repeated batch: the loss must fall
        out = model(**b)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in frozen.items())


def test_packed_adapters_stay_separate_and_mixed_batches_match_grouped_ones():
    r = gpu.mixed_forward("tiny", 4, 8, 64, 1, DEV, torch.bfloat16)
    assert r["outputs_match"], r
    p = gpu.packed_vs_alone("tiny", 2, 2, 2, 64, DEV, torch.bfloat16)
    assert p["packed_s"] > 0 and p["alone_s"] > 0
