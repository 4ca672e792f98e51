"""End of a Train run: gather the LoRA weights (ZeRO-3), probe logits, write the PEFT adapter and
``metrics.json`` and publish them as a new version of ``adapters/<name>/`` (rank 0).

An adapter names its base by the reference it was trained from (``models.base``: a hub id,
``embedded:<name>``, ``s3://...``), never by the directory that reference resolved to on the
training node (a model cache path that exists on one machine): ``record_base``.
"""

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


def _hub_id(ref: str) -> bool:
    return (ref.count("/") == 1 and not ref.startswith((".", "/", "~"))
            and not ref.startswith(("embedded:", "s3://")) and not Path(ref).expanduser().exists())


def record_base(adapter_dir: str | Path, model_ref: str) -> None:
    """Name ``model_ref`` as the base of the PEFT adapter in ``adapter_dir``: its
    ``adapter_config.json`` ``base_model_name_or_path``, and the model card PEFT writes beside it
    (``base_model`` and its ``base_model:adapter:`` tag: a hub id there, else no base named)."""
    cfg_path = Path(adapter_dir, "adapter_config.json")
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = model_ref
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    card_path = Path(adapter_dir, "README.md")
    if card_path.exists():
        from huggingface_hub import ModelCard

        card = ModelCard.load(card_path)
        tags = [t for t in card.data.tags or [] if not t.startswith("base_model:")]
        if _hub_id(model_ref):
            card.data.base_model = model_ref
            tags.append(f"base_model:adapter:{model_ref}")
        else:
            card.data.base_model = None
        card.data.tags = sorted(tags) or None
        card.save(card_path)


def write_and_publish(model, out_dir: str | Path, spec: dict, metrics: dict, lora_sd: dict | None = None) -> None:
    """Save the adapter (checked non-empty) naming its base by ``spec["model_ref"]``, write
    ``metrics.json`` and publish ``out_dir`` as a new version of ``adapters/<spec["adapter"]>/``
    under ``spec["root"]``."""
    from cm_ray import artifacts
    from cm_ray.storage import ArtifactStore
    from cm_ray.train.lora import save_adapter

    save_adapter(model, out_dir, state_dict=lora_sd)
    record_base(out_dir, spec["model_ref"])
    Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    # A new version beside the current one, then one pointer switch: a crash here never
    # leaves a half-written or missing adapter (ArtifactStore.publish_dir).
    ArtifactStore(spec["root"]).publish_dir(str(out_dir), *artifacts.adapter_dir(spec["adapter"]))


def publish_adapter(ws: WorkerSetup, spec: dict, metrics: dict, report: dict, lora_sd: dict | None) -> None:
    """Rank 0: ``write_and_publish`` the adapter and report it as the run's final checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        write_and_publish(ws.model, d, spec, metrics, lora_sd)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
