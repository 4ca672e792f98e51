"""LoRA adapters with PEFT: presets from the seed papers, building, saving, checking, loading.

No Ray here, so everything is testable in a plain unit test. An adapter directory is PEFT's own
layout (``adapter_config.json`` + ``adapter_model.safetensors``) and loads with
``PeftModel.from_pretrained(base, adapter_dir)`` or ``model.load_adapter(dir, adapter_name=culture)``.
"""

from __future__ import annotations

import json
from pathlib import Path


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class EmptyAdapterError(RuntimeError):
    """A saved adapter holds no weights (e.g. ZeRO-3 partitions saved without gathering)."""


def lora_config(train_cfg):
    """The ``peft.LoraConfig`` for a ``TrainConfig`` (rank, alpha, dropout, target modules)."""
    from peft import LoraConfig, TaskType

    targets = train_cfg.target_modules
    if list(targets) == ["all-linear"]:
        targets = "all-linear"  # PEFT: every linear layer except the output head
    return LoraConfig(r=train_cfg.lora_r, lora_alpha=train_cfg.lora_alpha,
                      lora_dropout=train_cfg.lora_dropout, target_modules=targets,
                      bias="none", task_type=TaskType.CAUSAL_LM)


def make_lora_model(model, train_cfg):
    """Wrap a causal LM with fresh LoRA adapters; only ``lora_`` parameters stay trainable."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(train_cfg))
    bad = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    if bad:
        raise RuntimeError(f"non-LoRA parameters left trainable: {bad[:5]}")
    return peft_model


def trainable_parameter_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def save_adapter(peft_model, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Save in PEFT's layout and check the weights really landed (never an empty adapter).

    Args:
        peft_model: the ``PeftModel`` (on every rank its config is complete, even under ZeRO-3).
        out_dir: target directory.
        state_dict: full weights gathered across ranks (ZeRO-3); None = the model's own.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
    check_adapter(out_dir)
    return out_dir


def check_adapter(adapter_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Raise ``EmptyAdapterError`` unless the dir holds non-empty LoRA A/B weights; return shapes."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).exists():
            raise EmptyAdapterError(f"{adapter_dir}: missing {name}")
    shapes: dict[str, tuple[int, ...]] = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            shapes[key] = tuple(f.get_slice(key).get_shape())
    if not shapes:
        raise EmptyAdapterError(f"{adapter_dir}: adapter_model.safetensors holds no tensors")
    empty = [k for k, s in shapes.items() if not s or 0 in s]
    if empty:
        raise EmptyAdapterError(f"{adapter_dir}: {len(empty)} of {len(shapes)} tensors are empty "
                                f"(e.g. {empty[0]}); ZeRO-3 weights were not gathered before saving")
    r = json.loads((adapter_dir / "adapter_config.json").read_text()).get("r")
    for k, s in shapes.items():
        if "lora_A" in k and r and s[0] != r:
            raise EmptyAdapterError(f"{adapter_dir}: {k} has shape {s}, expected rank {r}")
    return shapes


def load_adapter(base_model, adapter_dir: str | Path, adapter_name: str = "default"):
    """``PeftModel.from_pretrained`` after checking the adapter is complete."""
    from peft import PeftModel

    check_adapter(adapter_dir)
    return PeftModel.from_pretrained(base_model, str(adapter_dir), adapter_name=adapter_name)


def load_base_model(model_path: str, dtype: str = "float32", device: str = "cpu"):
    """The base causal LM in ``dtype`` (float32 on CPU, bfloat16 on GPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    return model.to(device)
