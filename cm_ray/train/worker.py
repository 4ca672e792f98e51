"""The Ray Train worker: LoRA SFT of one adapter with DeepSpeed (or DDP), resumable from checkpoints.

``train_fn_per_worker(config)`` runs on every worker of a ``TorchTrainer``. It streams token rows
from ``ray.train.get_dataset_shard``, steps a DeepSpeed engine (ZeRO-1/2/3, torch AdamW client
optimizer: no op compilation), checkpoints engine + loop state through ``ray.train.report`` and,
when restarted after a failure, continues from the last checkpoint (same step, same epoch position).
Rank 0 finally writes the PEFT adapter and ``metrics.json`` to ``adapters/<name>/`` in the store.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

from cm_ray.config import config_from_dict


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


def _all_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _maybe_crash(fault: dict | None, step: int) -> None:
    """Fault injection for resume tests: exit hard once at ``fault['at_step']`` (marker file)."""
    if fault and step == fault["at_step"] and not os.path.exists(fault["marker"]):
        Path(fault["marker"]).write_text(str(step))
        os._exit(1)


def train_fn_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from transformers import get_scheduler

    from cm_ray.models import default_dtype, resolve_model
    from cm_ray.storage import ArtifactStore
    from cm_ray.train.data import collate, get_tokenizer
    from cm_ray.train.lora import load_base_model, make_lora_model, save_adapter

    cfg = config_from_dict(config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = tc.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{ray.train.torch.get_device().index or 0}") if use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)

    model_path = resolve_model(config["model_ref"], cfg.models.cache_dir)
    tok = get_tokenizer(model_path)
    model = load_base_model(model_path, default_dtype("cuda" if use_gpu else "cpu"), str(device))
    model = make_lora_model(model, tc)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.0)
    total_steps = config["total_steps"]
    scheduler = get_scheduler(tc.scheduler, optimizer, num_warmup_steps=int(tc.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    zero_stage = None
    if tc.deepspeed is not None:
        import deepspeed

        ds_cfg = deepspeed_config(tc, world, use_gpu)
        zero_stage = ds_cfg["zero_optimization"]["stage"]
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_cfg)
    else:
        engine = ray.train.torch.prepare_model(model) if world > 1 else model

    # Loop state; restored from the last checkpoint after a failure.
    state = {"step": 0, "micro": 0, "phase": 0, "epoch": 0, "in_epoch": 0, "loss_curve": [],
             "tokens": 0, "resumed_from": []}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            if zero_stage is not None:
                _, client = engine.load_checkpoint(d, tag="state", load_module_strict=False)
            else:
                client = torch.load(Path(d) / "loop.pt", weights_only=False)
                model.load_state_dict(client.pop("lora"), strict=False)
                optimizer.load_state_dict(client.pop("optimizer"))
                scheduler.load_state_dict(client.pop("scheduler"))
        state.update({k: client[k] for k in state if k in client})  # DeepSpeed adds its own keys
        state["resumed_from"] = state["resumed_from"] + [state["step"]]

    def checkpoint(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            if zero_stage is not None:
                engine.save_checkpoint(d, tag="state", client_state=dict(state),
                                       exclude_frozen_parameters=True)
            elif rank == 0:
                lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
                torch.save({**state, "lora": lora, "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict()}, Path(d) / "loop.pt")
            has_files = any(Path(d).iterdir())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if has_files else None)

    accum = tc.grad_accum
    every = tc.checkpoint_every_steps or max(1, config["phases"][0]["micro_per_epoch"] // accum)
    micro_loss, micro_tokens = 0.0, 0
    t_first = None  # steady-state clock starts after the first optimizer step (warm-up excluded)
    steady_tokens = 0
    engine.train()
    for phase_i in range(state["phase"], len(config["phases"])):
        phase = config["phases"][phase_i]
        shard = ray.train.get_dataset_shard(phase["dataset"])
        while state["micro"] < phase["end_micro"]:
            batches = shard.iter_batches(batch_size=tc.batch_size, batch_format="numpy",
                                         local_shuffle_buffer_size=tc.shuffle_buffer or None,
                                         local_shuffle_seed=cfg.seed + state["epoch"])
            seen = 0
            for i, batch in enumerate(batches):
                seen += 1
                if i < state["in_epoch"]:
                    continue  # consumed before the restart
                if state["micro"] >= phase["end_micro"]:
                    break
                inputs = collate(batch, tok.pad_token_id, device)
                loss = engine(**inputs).loss
                if zero_stage is not None:
                    engine.backward(loss)
                    engine.step()
                else:
                    (loss / accum).backward()
                n_tok = int(inputs["attention_mask"].sum())
                micro_loss += float(loss.detach()) / accum
                micro_tokens += n_tok
                state["micro"] += 1
                state["in_epoch"] = i + 1
                if state["micro"] % accum:
                    continue
                if zero_stage is None:
                    torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                state["step"] += 1
                state["tokens"] += micro_tokens
                if t_first is None:
                    t_first = time.perf_counter()
                else:
                    steady_tokens += micro_tokens
                state["loss_curve"].append([state["step"], round(micro_loss, 5)])
                micro_loss, micro_tokens = 0.0, 0
                if state["step"] % every == 0 and state["step"] < total_steps:
                    checkpoint({"step": state["step"], "loss": state["loss_curve"][-1][1],
                                "epoch": state["epoch"]})
                _maybe_crash(config.get("fault"), state["step"])
            else:
                if not seen:
                    raise RuntimeError(f"dataset {phase['dataset']}: this worker's shard is empty")
                state["epoch"] += 1
                state["in_epoch"] = 0
        state.update(phase=phase_i + 1, epoch=0, in_epoch=0)
    elapsed = (time.perf_counter() - t_first) if t_first else 0.0

    val_loss = _validation_loss(engine, tok, device, tc.batch_size) if config["has_validation"] else None
    probe = _probe_logits(engine, tok, device)
    steady_tok, secs = _all_sum([steady_tokens, elapsed])
    tokens_per_s = steady_tok / (secs / world) if secs > 0 else None
    lora_sd = _gather_lora(engine, model, zero_stage)

    report = {"step": state["step"], "loss": state["loss_curve"][-1][1] if state["loss_curve"] else None,
              "val_loss": val_loss, "tokens_per_s": tokens_per_s}
    if rank != 0:
        ray.train.report(report)
        return
    metrics = {
        "adapter": config["adapter"], "mode": tc.mode, "preset": tc.preset, "base_model": config["model_ref"],
        "steps": state["step"], "total_steps": total_steps, "epochs": tc.epochs, "rows": config["rows"],
        "loss_curve": state["loss_curve"], "first_loss": state["loss_curve"][0][1] if state["loss_curve"] else None,
        "final_loss": report["loss"], "val_loss": val_loss, "tokens": state["tokens"],
        "tokens_per_s": tokens_per_s, "steady_seconds": secs / world, "probe_logits": probe, "resumed_from": state["resumed_from"],
        "world_size": world, "zero_stage": zero_stage, "device": "cuda" if use_gpu else "cpu",
        "lora": {"r": tc.lora_r, "alpha": tc.lora_alpha, "dropout": tc.lora_dropout,
                 "target_modules": tc.target_modules}, "lr": tc.lr, "run_name": config["run_name"],
    }
    with tempfile.TemporaryDirectory() as d:
        save_adapter(model, d, state_dict=lora_sd)
        Path(d, "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        ArtifactStore(cfg.root).upload_dir(d, "adapters", config["adapter"])
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))


def _gather_lora(engine, model, zero_stage) -> dict | None:
    """LoRA weights as full tensors (ZeRO-3 gathers its partitions on every rank); else None."""
    if zero_stage != 3:
        return None
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().to("cpu").clone() for n, p in named}


PROBE_TEXT = "The customs of my country"


def _probe_logits(engine, tok, device) -> list[float]:
    """Last-position logits (first 8) of a fixed prompt: lets a reloaded adapter be checked exactly."""
    import torch

    ids = tok(PROBE_TEXT, return_tensors="pt")["input_ids"].to(device)
    engine.eval()
    with torch.no_grad():  # every rank runs it: under ZeRO-3 the forward is collective
        logits = engine(input_ids=ids).logits[0, -1, :8].float().tolist()
    engine.train()
    return [round(x, 6) for x in logits]


def _validation_loss(engine, tok, device, batch_size: int) -> float | None:
    """Token-weighted mean loss on the validation shard, summed over all workers."""
    import ray.train
    import torch

    from cm_ray.train.data import IGNORE, collate

    engine.eval()
    loss_sum, n = 0.0, 0
    with torch.no_grad():
        for batch in ray.train.get_dataset_shard("validation").iter_batches(batch_size=batch_size,
                                                                             batch_format="numpy"):
            inputs = collate(batch, tok.pad_token_id, device)
            k = int((inputs["labels"][:, 1:] != IGNORE).sum())
            loss_sum += float(engine(**inputs).loss) * k
            n += k
    engine.train()
    loss_sum, n = _all_sum([loss_sum, n])
    return round(loss_sum / n, 5) if n else None


def steps_plan(phase_rows: list[tuple[str, int]], train_cfg, world: int) -> tuple[list[dict], int]:
    """Micro-batch boundaries per phase and the total optimizer steps.

    Args:
        phase_rows: (dataset name, rows) per phase, in training order.
    Returns:
        (phases with ``micro_per_epoch`` and cumulative ``end_micro``, total optimizer steps).
    """
    phases, end = [], 0
    budget = train_cfg.max_steps * train_cfg.grad_accum if train_cfg.max_steps else None
    for name, rows in phase_rows:
        per_worker = rows // world  # streaming_split(equal=True) gives every worker this many
        if per_worker == 0:
            raise ValueError(f"dataset {name}: {rows} rows for {world} workers")
        micro_per_epoch = math.ceil(per_worker / train_cfg.batch_size)
        n = max(train_cfg.grad_accum, math.ceil(train_cfg.epochs * micro_per_epoch))
        n -= n % train_cfg.grad_accum  # end each phase on an optimizer step
        if budget is not None:
            n = min(n, max(0, budget - end))
        end += n
        phases.append({"dataset": name, "rows": rows, "micro_per_epoch": micro_per_epoch, "end_micro": end})
    return phases, end // train_cfg.grad_accum
