"""Generation engines behind one interface: chat conversations in, texts (and token counts) out.

``make_engine(cfg)`` picks the engine named by ``cfg.synthesis.engine``. Each engine is a plain
object (no Ray) so it can run inside a Ray Data UDF, a Serve replica or a unit test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = 0
    json_schema: dict | None = None
    """Constrain the output to this JSON schema where the engine supports it."""
    stop: list[str] = field(default_factory=list)


@dataclass
class Generation:
    text: str
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = "stop"


class Engine(Protocol):
    name: str
    model: str

    def generate(self, conversations: list[list[dict]], params: GenerationParams) -> list[Generation]:
        ...


class TransformersEngine:
    """Batched generation with Hugging Face transformers (the embedded default, CPU or GPU)."""

    name = "transformers"

    def __init__(self, model: str, dtype: str = "auto", device: str | None = None,
                 cache_dir: str | None = None, batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cm_ray.models import default_dtype, resolve_model

        self.model = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = default_dtype(self.device)
        path = resolve_model(model, cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # decoder-only: pad on the left for batched generate
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(self.device)
        self.lm.eval()
        self.batch_size = batch_size

    def prompt_text(self, conversation: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def generate(self, conversations: list[list[dict]], params: GenerationParams) -> list[Generation]:
        out: list[Generation] = []
        for i in range(0, len(conversations), self.batch_size):
            out.extend(self._generate_batch(conversations[i:i + self.batch_size], params))
        return out

    def _generate_batch(self, conversations: list[list[dict]], params: GenerationParams) -> list[Generation]:
        import torch

        texts = [self.prompt_text(c) for c in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = params.temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, do_sample=sample,
                                      pad_token_id=self.tokenizer.pad_token_id)
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            ids = self.lm.generate(**enc, **kwargs)
        n_prompt = enc["input_ids"].shape[1]
        results = []
        for row, mask in zip(ids, enc["attention_mask"]):
            new = row[n_prompt:]
            n_out = int((new != self.tokenizer.pad_token_id).sum())
            eos_hit = bool((new == self.tokenizer.eos_token_id).any())
            results.append(Generation(
                text=self.tokenizer.decode(new, skip_special_tokens=True),
                prompt_tokens=int(mask.sum()), output_tokens=n_out,
                finish_reason="stop" if eos_hit or n_out < params.max_new_tokens else "length"))
        return results


def make_engine(cfg: Any, engine: str | None = None) -> Engine:
    """Build the engine a config names (``cfg.synthesis.engine``) for ``cfg.models.generator``."""
    kind = engine or cfg.synthesis.engine
    if kind == "transformers":
        return TransformersEngine(cfg.models.generator, dtype=cfg.synthesis.dtype,
                                  cache_dir=cfg.models.cache_dir, batch_size=cfg.synthesis.batch_size)
    raise ValueError(f"synthesis.engine: unknown engine {kind!r}")
