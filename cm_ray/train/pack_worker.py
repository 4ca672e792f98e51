"""The Ray Train worker of a pack: K culture adapters on one loaded base model.

``packed_train_fn_per_worker(spec)`` runs on every worker of the pack's ``TorchTrainer``:

1. reads every member's token rows from the unsplit ``pack`` dataset and takes its equal share;
   plans each adapter's steps (``steps_plan``, as alone);
2. loads the base model once and adds one PEFT named adapter per culture (``add_adapter``), each
   initialised from ``seed`` (the init it gets alone);
3. per adapter: torch AdamW over that adapter's parameters only, its own LR schedule
   (``get_scheduler``) and, under DeepSpeed (ZeRO 0-2), its own engine over the shared module, which
   clips that adapter's gradients and partitions its optimizer state; without DeepSpeed the worker
   clips and all-reduces each adapter's gradients itself;
4. rounds: each adapter still training is activated (``set_adapter``) and takes one optimizer step
   on its own micro-batches (``pack_loop``); checkpoints hold every adapter's weights, optimizer,
   schedule and loop state, so a restarted worker resumes the whole pack;
5. per adapter: validation loss, probe logits, ``metrics.json``, and (rank 0) the PEFT adapter
   published as a new version of ``adapters/<culture>/``, the layout of the one-adapter path.

``spec``: ``train``, ``seed``, ``model_ref``, ``cache_dir``, ``root``, ``adapters``,
``data_errors``, ``run_name``, ``pack`` (index) and ``fault`` (test hook, per culture).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from cm_ray.train.pack_loop import Slot, adapter_step, read_pack_rows, validation_loss, worker_share
from cm_ray.train.setup import WorkerSetup, deepspeed_config, import_deepspeed


def _plan_slots(spec: dict, rank: int, world: int, errors: dict) -> list[Slot]:
    import ray.train

    from cm_ray.train.loop import steps_plan

    tc = spec["train"]
    rows = read_pack_rows(ray.train.get_dataset_shard("pack"), spec["adapters"], tc.packing, tc.max_seq_len)
    slots = []
    for name in spec["adapters"]:
        phases = [rows[name].get(i, {"train": [], "validation": []}) for i in range(max(rows[name]) + 1)] \
            if rows[name] else []
        try:
            plan, total = steps_plan([(f"train_{i}", len(p["train"])) for i, p in enumerate(phases)], tc, world)
            if not plan:
                raise ValueError(f"adapter {name}: no training rows")
        except ValueError as e:
            errors[name] = f"ValueError: adapter {name}: {e}"
            continue
        val = [r for p in phases for r in p["validation"]]
        slots.append(Slot(name=name, phases=plan, total_steps=total,
                          train=[worker_share(p["train"], rank, world) for p in phases],
                          val=worker_share(val, rank, world) if len(val) >= world else []))
    return slots


def setup_pack(spec: dict, slots: list[Slot]):
    """Base model + one named adapter, optimizer, schedule (and DeepSpeed engine) per slot."""
    import ray.train
    import ray.train.torch
    import torch
    from peft import get_peft_model
    from transformers import get_scheduler

    from cm_ray.models import default_dtype, resolve_model
    from cm_ray.train.data import get_tokenizer
    from cm_ray.train.lora import load_base_model, lora_config

    tc = spec["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = tc.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{ray.train.torch.get_device().index or 0}") if use_gpu else torch.device("cpu")
    model_path = resolve_model(spec["model_ref"], spec["cache_dir"])
    tok = get_tokenizer(model_path)
    model = load_base_model(model_path, default_dtype("cuda" if use_gpu else "cpu"), str(device))
    for i, slot in enumerate(slots):
        torch.manual_seed(spec["seed"])  # each adapter's init is the one it gets alone
        if i == 0:
            model = get_peft_model(model, lora_config(tc), adapter_name=slot.name)
        else:
            model.add_adapter(slot.name, lora_config(tc))
    ds_cfg = deepspeed_config(tc, world, use_gpu) if tc.deepspeed is not None else None
    deepspeed = import_deepspeed() if ds_cfg is not None else None
    for slot in slots:
        model.set_adapter(slot.name)  # this adapter's parameters are the trainable ones now
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        bad = [n for n, _ in named if "lora_" not in n or f".{slot.name}." not in n]
        if bad or not named:
            raise RuntimeError(f"adapter {slot.name}: unexpected trainable parameters {bad[:5]}")
        params = [p for _, p in named]
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.0)
        sched = get_scheduler(tc.scheduler, opt, num_warmup_steps=int(tc.warmup_ratio * slot.total_steps),
                              num_training_steps=slot.total_steps)
        engine, zero_stage = model, None
        if ds_cfg is not None:
            zero_stage = ds_cfg["zero_optimization"]["stage"]
            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                   config=json.loads(json.dumps(ds_cfg)))
        slot.ws = WorkerSetup(tok=tok, model=model, engine=engine, optimizer=opt, scheduler=sched,
                              params=params, zero_stage=zero_stage, device=device, use_gpu=use_gpu,
                              rank=rank, world=world)
    return model, tok, rank, world


def save_pack_checkpoint(model, slots: list[Slot], pack_state: dict, metrics: dict) -> None:
    """Report ``metrics`` with a checkpoint of every adapter: DeepSpeed engines (``engines/<name>``)
    or LoRA weights + optimizers + schedules, and all loop states (``pack.pt``)."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as d:
        rank = slots[0].ws.rank
        extra = {}
        for s in slots:
            if s.ws.zero_stage is not None:
                model.set_adapter(s.name)  # exclude_frozen_parameters: this adapter's weights only
                s.ws.engine.save_checkpoint(str(Path(d, "engines", s.name)), tag="state",
                                            exclude_frozen_parameters=True)
            else:
                extra.setdefault("optimizer", {})[s.name] = s.ws.optimizer.state_dict()
                extra.setdefault("scheduler", {})[s.name] = s.ws.scheduler.state_dict()
        if rank == 0:
            if "optimizer" in extra:
                extra["lora"] = {k: v for k, v in model.state_dict().items() if "lora_" in k}
            torch.save({**pack_state, "states": {s.name: s.state for s in slots}, **extra}, Path(d, "pack.pt"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def restore_pack(model, slots: list[Slot], pack_state: dict) -> None:
    """After a failure: every adapter's engine/optimizer/schedule and loop state, the pack's round."""
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if not ckpt:
        return
    with ckpt.as_directory() as d:
        saved = torch.load(Path(d, "pack.pt"), weights_only=False)
        if "lora" in saved:
            model.load_state_dict(saved["lora"], strict=False)
        for s in slots:
            if s.ws.zero_stage is not None:
                model.set_adapter(s.name)
                s.ws.engine.load_checkpoint(str(Path(d, "engines", s.name)), tag="state",
                                            load_module_strict=False)
            else:
                s.ws.optimizer.load_state_dict(saved["optimizer"][s.name])
                s.ws.scheduler.load_state_dict(saved["scheduler"][s.name])
            s.state.update(saved["states"][s.name])
    pack_state.update({k: saved[k] for k in pack_state})
    for s in slots:
        s.state["resumed_from"] = s.state["resumed_from"] + [s.state["step"]]


def publish(model, slot: Slot, metrics: dict, root: str) -> None:
    """Rank 0: the slot's adapter in PEFT's layout (checked non-empty) + ``metrics.json``, published
    as a new version of ``adapters/<name>/``."""
    from cm_ray import artifacts
    from cm_ray.storage import ArtifactStore
    from cm_ray.train.lora import check_adapter
    from cm_ray.train.save import record_base

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, selected_adapters=[slot.name], safe_serialization=True)
        out = Path(d, slot.name)  # PEFT writes a named adapter into its own subdirectory
        check_adapter(out)
        record_base(out, metrics["base_model"])  # the reference trained from, not this node's path
        Path(out, "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        ArtifactStore(root).publish_dir(out, *artifacts.adapter_dir(slot.name))


def packed_train_fn_per_worker(spec: dict) -> None:
    import ray.train

    from cm_ray.train.loop import _maybe_crash, all_sum
    from cm_ray.train.save import adapter_metrics, probe_logits

    tc, errors = spec["train"], dict(spec["data_errors"])
    clock = [("start", time.perf_counter())]
    ctx = ray.train.get_context()
    slots = _plan_slots(spec, ctx.get_world_rank(), ctx.get_world_size(), errors)
    if not slots:
        ray.train.report({"adapter_errors": json.dumps(errors), "adapters_trained": 0})
        return
    clock.append(("data_s", time.perf_counter()))
    model, tok, rank, world = setup_pack(spec, slots)
    clock.append(("setup_s", time.perf_counter()))
    pack_state = {"round": 0, "failed": {}}
    restore_pack(model, slots, pack_state)
    rounds = max(s.total_steps for s in slots)
    every = tc.checkpoint_every_steps or max(1, max(s.phases[0]["micro_per_epoch"] for s in slots) // tc.grad_accum)
    model.train()
    while True:
        active = [s for s in slots if s.state["step"] < s.total_steps and s.name not in pack_state["failed"]]
        if not active:
            break
        for s in active:
            model.set_adapter(s.name)
            try:
                adapter_step(s, tc, spec["seed"], tok)
            except Exception as e:  # this adapter's data or state broke: the others go on
                pack_state["failed"][s.name] = f"{type(e).__name__}: {str(e).strip()[-500:]}"
                for p in s.ws.params:
                    p.grad = None
                continue
            _maybe_crash(spec["fault"].get(s.name), s.state["step"])
        pack_state["round"] += 1
        if pack_state["round"] % every == 0 and pack_state["round"] < rounds:
            save_pack_checkpoint(model, slots, pack_state, {"round": pack_state["round"]})
    clock.append(("train_s", time.perf_counter()))
    seconds = {k: round(t - clock[i][1], 2) for i, (k, t) in enumerate(clock[1:])}
    errors.update(pack_state["failed"])
    done = [s for s in slots if s.name not in errors]

    # Collectives below run on every rank, per adapter, in this order.
    for s in done:
        model.set_adapter(s.name)
        val = validation_loss(s, tc.batch_size, tok)
        probe = probe_logits(s.ws)
        tokens, secs = all_sum([s.state["steady_tokens"], s.state["steady_seconds"]])
        st = s.state
        report = {"step": st["step"], "loss": st["loss_curve"][-1][1] if st["loss_curve"] else None,
                  "val_loss": val, "tokens_per_s": tokens / (secs / world) if secs > 0 else None}
        if rank == 0:
            one = {"train": tc, "adapter": s.name, "model_ref": spec["model_ref"], "run_name": spec["run_name"],
                   "total_steps": s.total_steps, "rows": {p["dataset"]: p["rows"] for p in s.phases}}
            metrics = adapter_metrics(s.ws, one, st, report, probe, secs / world)
            metrics["pack"] = {"index": spec["pack"], "adapters": [x.name for x in slots],
                               "rounds": pack_state["round"], "seconds": seconds}
            publish(model, s, metrics, spec["root"])
    ray.train.report({"adapter_errors": json.dumps(errors), "adapters_trained": len(done)})
