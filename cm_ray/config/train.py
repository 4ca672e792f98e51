"""The ``train`` section and the seed papers' presets (``cm_ray/config/presets/<name>.yaml``).

A preset is data: the LoRA / optimizer values of a paper, applied under the values the config
sets itself, so an explicit ``lora_r: 8`` with ``preset: clca`` stays 8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from cm_ray.config.base import Section, invalid

PRESET_DIR = Path(__file__).parent / "presets"
PRESETS: dict[str, dict[str, Any]] = {p.stem: yaml.safe_load(p.read_text())
                                      for p in sorted(PRESET_DIR.glob("*.yaml"))}
"""Preset name -> the train fields it fills (docs: METHODS.md)."""


class TrainConfig(Section):
    mode: Literal["per_culture", "joint", "continual", "multitask"] = "per_culture"
    """per_culture, joint, continual or multitask."""
    preset: Literal["culturespa", "clca"] | None = None
    """culturespa or clca: fill LoRA/optimizer settings from the seed papers (presets/*.yaml);
    the fields the config sets itself keep their values."""
    lora_r: int = Field(8, gt=0)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1)
    """Module names, or ["all-linear"]."""
    lr: float = Field(1e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_seq_len: int = Field(512, ge=16)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    packing: bool = False
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    """One GPU per Train worker; the worker itself falls back to CPU where CUDA is absent."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl when workers ask for GPUs, else gloo."""
    deepspeed: dict | None = {"zero_optimization": {"stage": 2}}
    """DeepSpeed config (merged over defaults); None = plain torch DDP."""
    max_parallel_trials: int | None = Field(None, gt=0)
    """None = derived from cluster resources."""
    max_failures: int = Field(1, ge=0)
    checkpoint_every_steps: int = Field(0, ge=0)
    """0 = once per epoch."""
    joint_baseline: bool = True
    """Also train the all-culture adapter (paper ablation) next to the per-culture ones."""
    tasks: list[str] | None = None
    """Task partitions to train on (per_culture, joint); None = the run's `tasks`. multitask
    mode always mixes every task partition of the culture."""
    continual_first: list[str] = []
    """continual mode: tasks of the first phase (culture SFT on general / task-agnostic data);
    the remaining `tasks` form the second phase (task adaptation)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Logical CPUs per Train worker."""
    max_steps: int = Field(0, ge=0)
    """Stop after this many optimizer steps (0 = the epochs decide); for smoke runs and benches."""
    shuffle_buffer: int = 256
    """Rows in each worker's local shuffle buffer (0 = data order)."""
    max_grad_norm: float = 1.0
    trials: Literal["per_adapter", "packed"] = "per_adapter"
    """How culture adapters map to Tune trials. per_adapter: one trial (one Ray Train run, one
    base-model load) per adapter. packed: cultures are packed by token count into `packs` trials,
    each training its cultures' adapters as PEFT named adapters on one loaded base model, each
    with its own optimizer, LR schedule, clipping, metrics and checkpoint state (README: Training).
    The joint adapter always gets a trial of its own. Not to be confused with `packing`."""
    packs: int | None = Field(None, gt=0)
    """packed: the number of packs (trials); None = as many as run at once
    (`max_parallel_trials`, or what the cluster holds)."""
    max_adapters_per_pack: int | None = Field(None, gt=0)
    """packed: at most this many adapters in one pack (more packs when needed); None = no cap."""
    local_tokenize_rows: int = Field(5000, ge=0)
    """A trial whose synth rows number at most this many tokenizes them in its own process instead
    of through Ray Data tasks (whose worker start-up costs more than a small culture's tokenizing);
    0 = always Ray Data. The token rows are the same either way."""

    @model_validator(mode="before")
    @classmethod
    def _preset_under_explicit_values(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @field_validator("deepspeed")
    @classmethod
    def _zero_stage(cls, ds):
        if ds is not None:
            stage = (ds.get("zero_optimization") or {}).get("stage", 2)
            if stage not in (0, 1, 2, 3):
                raise invalid("zero_optimization.stage", f"must be 0, 1, 2 or 3, got {stage!r}")
        return ds

    @model_validator(mode="after")
    def _packed_needs_zero_0_to_2(self):
        stage = ((self.deepspeed or {}).get("zero_optimization") or {}).get("stage", 2)
        if self.trials == "packed" and self.deepspeed is not None and stage == 3:
            # ZeRO-3 partitions the parameters of the one module it wraps with its own hooks;
            # a pack needs one engine per adapter over the same module.
            raise invalid("deepspeed.zero_optimization.stage",
                          "packed trials support ZeRO stages 0-2 (one engine per adapter); "
                          "ZeRO-3 needs trials: per_adapter")
        return self

    @model_validator(mode="after")
    def _continual_needs_phase_one(self):
        if self.mode == "continual" and not self.continual_first:
            raise invalid("continual_first", "continual mode needs the tasks of its first phase (culture SFT data)")
        return self


def apply_preset(train_cfg: TrainConfig) -> TrainConfig:
    """``train_cfg`` with its preset filling the fields it did not set (validation already does
    this; kept for configs changed after validation, e.g. ``model_copy(update={"preset": ...})``)."""
    if not train_cfg.preset:
        return train_cfg
    return TrainConfig.model_validate(train_cfg.model_dump(include=train_cfg.model_fields_set))
