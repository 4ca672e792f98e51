"""End of a Train run: gather the LoRA weights (ZeRO-3), probe logits, write the PEFT adapter and
``metrics.json`` and publish them as a new version of ``adapters/<name>/`` (rank 0)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cm_ray.train.setup import WorkerSetup

PROBE_TEXT = "The customs of my country"


def gather_lora(ws: WorkerSetup) -> dict | None:
    """LoRA weights as full tensors (ZeRO-3 gathers its partitions on every rank); else None."""
    if ws.zero_stage != 3:
        return None
    import deepspeed

    named = [(n, p) for n, p in ws.model.named_parameters() if "lora_" in n]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().to("cpu").clone() for n, p in named}


def probe_logits(ws: WorkerSetup) -> list[float]:
    """Last-position logits (first 8) of a fixed prompt: lets a reloaded adapter be checked exactly."""
    import torch

    ids = ws.tok(PROBE_TEXT, return_tensors="pt")["input_ids"].to(ws.device)
    ws.engine.eval()
    with torch.no_grad():  # every rank runs it: under ZeRO-3 the forward is collective
        logits = ws.engine(input_ids=ids).logits[0, -1, :8].float().tolist()
    ws.engine.train()
    return [round(x, 6) for x in logits]


def adapter_metrics(ws: WorkerSetup, spec: dict, state: dict, report: dict, probe: list[float],
                    steady_seconds: float) -> dict:
    """The adapter's ``metrics.json``."""
    tc = spec["train"]
    return {
        "adapter": spec["adapter"], "mode": tc.mode, "preset": tc.preset, "base_model": spec["model_ref"],
        "steps": state["step"], "total_steps": spec["total_steps"], "epochs": tc.epochs, "rows": spec["rows"],
        "loss_curve": state["loss_curve"], "first_loss": state["loss_curve"][0][1] if state["loss_curve"] else None,
        "final_loss": report["loss"], "val_loss": report["val_loss"], "tokens": state["tokens"],
        "tokens_per_s": report["tokens_per_s"], "steady_seconds": steady_seconds, "probe_logits": probe,
        "resumed_from": state["resumed_from"],
        "world_size": ws.world, "zero_stage": ws.zero_stage, "device": "cuda" if ws.use_gpu else "cpu",
        "lora": {"r": tc.lora_r, "alpha": tc.lora_alpha, "dropout": tc.lora_dropout,
                 "target_modules": tc.target_modules}, "lr": tc.lr, "run_name": spec["run_name"],
    }


def publish_adapter(ws: WorkerSetup, spec: dict, metrics: dict, report: dict, lora_sd: dict | None) -> None:
    """Rank 0: save the adapter (checked non-empty) + metrics, publish to ``adapters/<name>/`` and
    report them as the run's final checkpoint."""
    import ray.train

    from cm_ray import artifacts
    from cm_ray.storage import ArtifactStore
    from cm_ray.train.lora import save_adapter

    with tempfile.TemporaryDirectory() as d:
        save_adapter(ws.model, d, state_dict=lora_sd)
        Path(d, "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        # A new version beside the current one, then one pointer switch: a crash here never
        # leaves a half-written or missing adapter (ArtifactStore.publish_dir).
        ArtifactStore(spec["root"]).publish_dir(d, *artifacts.adapter_dir(spec["adapter"]))
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
