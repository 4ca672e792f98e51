"""Train worker setup: the base model with fresh LoRA adapters, optimizer, LR schedule and the
DeepSpeed engine (ZeRO-1/2/3, torch AdamW client optimizer: no op compilation) or DDP.

``setup_worker(spec)`` runs once on every worker of a ``TorchTrainer`` and returns a ``WorkerSetup``;
``restore_state``/``save_checkpoint`` move the engine and loop state through Ray Train checkpoints.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def deepspeed_config(train_cfg, world_size: int, use_gpu: bool) -> dict:
    """The DeepSpeed config: ``train.deepspeed`` merged over defaults derived from the TrainConfig."""
    user = json.loads(json.dumps(train_cfg.deepspeed or {}))
    zero = {"stage": 2, **(user.pop("zero_optimization", None) or {})}
    if zero["stage"] == 3:
        # LoRA under ZeRO-3: without gathering, saved adapters are empty placeholders.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    cfg = {
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "train_batch_size": train_cfg.batch_size * train_cfg.grad_accum * world_size,
        "gradient_clipping": train_cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(use_gpu)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for k, v in user.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def import_deepspeed():
    """``import deepspeed``, with this interpreter's scripts directory first on ``PATH``.

    DeepSpeed JIT-builds its CPU shared-memory op through torch's cpp_extension, which runs the
    first ``ninja`` on ``PATH``. pip installs ninja 1.13 next to this interpreter. A system ninja
    (1.11 on Debian) earlier on ``PATH``, e.g. when the venv's python is run without activating the
    venv, cannot use the build log that 1.13 writes, and 1.13 cannot use the one 1.11 writes. So
    each rebuilds the op, ~40 s of a 2-core worker's start, whenever the other ran last.
    """
    import os
    import sysconfig

    scripts = sysconfig.get_path("scripts")
    if os.path.exists(os.path.join(scripts, "ninja")):
        rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != scripts]
        os.environ["PATH"] = os.pathsep.join([scripts, *rest])
    import deepspeed

    return deepspeed


@dataclass
class WorkerSetup:
    """What one Train worker steps: model, engine, optimizer, schedule and where it runs."""

    tok: Any
    model: Any
    """The PeftModel (its LoRA parameters are the trainable ones)."""
    engine: Any
    """DeepSpeed engine, DDP-wrapped model or the model itself."""
    optimizer: Any
    scheduler: Any
    params: list
    zero_stage: int | None
    """None = plain torch (DDP), no DeepSpeed."""
    device: Any
    use_gpu: bool
    rank: int
    world: int


def setup_worker(spec: dict) -> WorkerSetup:
    """Model + PEFT + optimizer/scheduler + engine for this worker, from the trial's ``spec``
    (``train`` section, ``seed``, ``model_ref``, ``cache_dir``, ``total_steps``)."""
    import ray.train
    import ray.train.torch
    import torch
    from transformers import get_scheduler

    from cm_ray.models import default_dtype, resolve_model
    from cm_ray.train.data import get_tokenizer
    from cm_ray.train.lora import load_base_model, make_lora_model

    tc = spec["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = tc.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{ray.train.torch.get_device().index or 0}") if use_gpu else torch.device("cpu")
    torch.manual_seed(spec["seed"])

    model_path = resolve_model(spec["model_ref"], spec["cache_dir"])
    tok = get_tokenizer(model_path)
    model = load_base_model(model_path, default_dtype("cuda" if use_gpu else "cpu"), str(device))
    torch.manual_seed(spec["seed"])  # the LoRA init depends on the seed only (as in a pack)
    model = make_lora_model(model, tc)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.0)
    total_steps = spec["total_steps"]
    scheduler = get_scheduler(tc.scheduler, optimizer, num_warmup_steps=int(tc.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    zero_stage = None
    if tc.deepspeed is not None:
        deepspeed = import_deepspeed()
        ds_cfg = deepspeed_config(tc, world, use_gpu)
        zero_stage = ds_cfg["zero_optimization"]["stage"]
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_cfg)
    else:
        engine = ray.train.torch.prepare_model(model) if world > 1 else model
    return WorkerSetup(tok=tok, model=model, engine=engine, optimizer=optimizer, scheduler=scheduler,
                       params=params, zero_stage=zero_stage, device=device, use_gpu=use_gpu,
                       rank=rank, world=world)


def new_state() -> dict:
    """The loop state that checkpoints carry (step, position in the data, loss curve, ...)."""
    return {"step": 0, "micro": 0, "phase": 0, "epoch": 0, "in_epoch": 0, "loss_curve": [],
            "tokens": 0, "resumed_from": []}


def restore_state(ws: WorkerSetup, state: dict) -> None:
    """After a failure: load engine/optimizer/schedule and loop state from the last checkpoint."""
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return
    with ckpt.as_directory() as d:
        if ws.zero_stage is not None:
            _, client = ws.engine.load_checkpoint(d, tag="state", load_module_strict=False)
        else:
            client = torch.load(Path(d) / "loop.pt", weights_only=False)
            ws.model.load_state_dict(client.pop("lora"), strict=False)
            ws.optimizer.load_state_dict(client.pop("optimizer"))
            ws.scheduler.load_state_dict(client.pop("scheduler"))
    state.update({k: client[k] for k in state if k in client})  # DeepSpeed adds its own keys
    state["resumed_from"] = state["resumed_from"] + [state["step"]]


def save_checkpoint(ws: WorkerSetup, state: dict, metrics: dict) -> None:
    """Report ``metrics`` with a checkpoint of the engine (or LoRA + optimizer) and the loop state."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as d:
        if ws.zero_stage is not None:
            ws.engine.save_checkpoint(d, tag="state", client_state=dict(state),
                                      exclude_frozen_parameters=True)
        elif ws.rank == 0:
            lora = {k: v for k, v in ws.model.state_dict().items() if "lora_" in k}
            torch.save({**state, "lora": lora, "optimizer": ws.optimizer.state_dict(),
                        "scheduler": ws.scheduler.state_dict()}, Path(d) / "loop.pt")
        has_files = any(Path(d).iterdir())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if has_files else None)


def torch_backend(tc) -> str | None:
    """``train.backend`` for Ray Train's TorchConfig (None = Ray's choice: nccl with GPUs, else gloo)."""
    return None if tc.backend == "auto" else tc.backend


def optimizer_step(ws: "WorkerSetup", max_grad_norm: float) -> None:
    """One optimizer step outside DeepSpeed (its engine steps itself): clip, step, schedule, zero."""
    import torch

    torch.nn.utils.clip_grad_norm_(ws.params, max_grad_norm)
    ws.optimizer.step()
    ws.scheduler.step()
    ws.optimizer.zero_grad()
