"""What makes a LoRA adapter servable, checked before either engine loads it (a bad adapter is a
422 naming it, never a 500 for itself or its neighbours, on transformers and vLLM alike).

* ``config_problem``: the adapter_config.json is a plain LoRA config both engines serve (no DoRA,
  no ``modules_to_save``: PEFT's mixed-adapter batches and vLLM refuse them), with a positive rank;
* ``weights_problem``: every tensor is finite, every LoRA matrix names a linear layer the base
  model has and matches its shape (``lora_A``: rank x in, ``lora_B``: out x rank), and every
  ``target_modules`` entry names modules the base model has, and no pair's update ``scale * B @ A``
  can overflow a layer's output (``overflow_problem``: finite weights whose product does not fit a
  float make every logit of that adapter NaN). Shapes come from the safetensors headers of the base
  model (no weights read) and the adapter's own small weights file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

WEIGHTS = "adapter_model.safetensors"
OVERFLOW = 1e30
"""Refused above this bound on one output of ``scale * B @ A`` for inputs of magnitude <= 1 (float32
and bfloat16 end at ~3.4e38; trained adapters stay below ~1e2)."""
_SHAPES: dict[str, dict[str, list[int]]] = {}


def config_problem(config) -> str | None:
    """Why this adapter config cannot be served, or None."""
    if not isinstance(config, dict) or "peft_type" not in config:
        return "adapter_config.json is not a PEFT config"
    if config.get("peft_type") != "LORA":
        return f"peft_type {str(config.get('peft_type'))[:32]!r} is not LORA"
    if config.get("use_dora"):
        return "DoRA adapters (use_dora) are not served"
    if config.get("modules_to_save"):
        return "adapters with modules_to_save are not served"
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        return f"r {str(r)[:32]!r} is not a positive integer"
    return None


def base_shapes(model_dir: str) -> dict[str, list[int]]:
    """Weight name -> shape of the base model's 2-D tensors, from its safetensors headers."""
    if model_dir not in _SHAPES:
        shapes: dict[str, list[int]] = {}
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            shapes.update({k: v["shape"] for k, v in header.items()
                           if k != "__metadata__" and len(v.get("shape", ())) == 2})
        _SHAPES[model_dir] = shapes
    return _SHAPES[model_dir]


def _module_names(shapes: dict[str, list[int]]) -> list[str]:
    return [k[: -len(".weight")] for k in shapes if k.endswith(".weight")]


def _targets_problem(targets, modules: list[str]) -> str | None:
    if isinstance(targets, str):
        if targets != "all-linear" and not any(re.fullmatch(targets, m) for m in modules):
            return f"target_modules {targets[:64]!r} matches no module of the base model"
        return None
    for t in targets or []:
        if not isinstance(t, str) or not any(m == t or m.endswith("." + t) for m in modules):
            return f"target_modules entry {str(t)[:64]!r} is not a module of the base model"
    return None


def weights_problem(adapter_dir: str, model_dir: str) -> str | None:
    """Why the local PEFT LoRA dir ``adapter_dir`` does not fit the base model at ``model_dir``
    (see the module doc), or None."""
    import torch
    from safetensors.torch import load_file

    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return "adapter_config.json is missing or not JSON"
    if problem := config_problem(config):
        return problem
    shapes = base_shapes(model_dir)
    if not shapes:  # not a safetensors model: nothing to compare against
        return None
    modules = _module_names(shapes)
    if problem := _targets_problem(config.get("target_modules"), modules):
        return problem
    try:
        tensors = load_file(str(Path(adapter_dir) / WEIGHTS))
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file)
        return f"{WEIGHTS} cannot be read: {type(e).__name__}"
    r = config["r"]
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"tensor {name[:120]!r} holds NaN or infinite values"
        got = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", name)
        if not got:
            continue
        module, which = got.groups()
        base = shapes.get(f"{module}.weight")
        if base is None and module.endswith("lm_head"):  # tied embeddings
            base = shapes.get(module[: -len("lm_head")] + "model.embed_tokens.weight")
        if base is None:
            return f"tensor {name[:120]!r} is for a module the base model lacks"
        rank = t.shape[0] if which == "A" else t.shape[1]
        if not config.get("rank_pattern"):
            rank = r
        want = [rank, base[1]] if which == "A" else [base[0], rank]
        if list(t.shape) != want:
            return (f"tensor {name[:120]!r} has shape {list(t.shape)}; the base layer needs {want} "
                    f"(rank {r})")
    return overflow_problem(tensors, config)


def overflow_problem(tensors: dict, config: dict) -> str | None:
    """Why a LoRA pair's update can overflow its layer's output, or None: the bound
    ``scale * max_i |B_i| * max_j |A_j| * in_features`` (row norms of B, column norms of A) on
    ``|scale * B @ A @ x|`` for ``|x_k| <= 1``; cheap for an 8B model's adapter (no product formed)."""
    import math

    r = float(config["r"])
    scale = float(config.get("lora_alpha") or r) / (math.sqrt(r) if config.get("use_rslora") else r)
    for name, a in tensors.items():
        if ".lora_A" not in name or name.replace(".lora_A", ".lora_B") not in tensors:
            continue
        b = tensors[name.replace(".lora_A", ".lora_B")].double()
        a = a.double()
        bound = (scale * b.norm(dim=1).max() * a.norm(dim=0).max() * a.shape[1]).item()
        if not bound < OVERFLOW:
            module = name.split(".lora_A")[0].removeprefix("base_model.model.")
            return (f"the update of {module[:120]!r} can reach {bound:.1e}: non-finite outputs "
                    "(its lora_B and lora_A do not fit a float)")
    return None
