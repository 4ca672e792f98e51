"""The five evaluated systems over one base model and its PEFT adapters (``EvalModel``; in the
evaluation stage it runs inside Ray actors, ``eval.workers``).

- ``base``: the base model, the task prompt only.
- ``prompted``: the base model with the culture system prompt (``artifacts.culture_system_prompt``).
- ``joint``: the all-culture adapter (``adapters/_joint``) with the same prompt it was trained with.
- ``culturemanager``: the router reads the request alone (what a user sends, no prompt the
  evaluation adds) and picks a culture adapter; ``none`` or a culture without an adapter falls
  back to the base model. ``culturemanager_locale``: the same with a declared language as metadata.
- ``oracle``: the true culture's adapter (perfect routing: CultureManager's upper bound); the base
  model for a culture that has no adapter. Oracle minus culturemanager is the router's cost.

Each adapter is asked with the system prompt it was trained with (``artifacts.adapter_system_prompt``).

Closed-form answers (labels, option numbers) are scored by the log-probability of each full answer
(answer tokens + end of turn) after the chat prompt, so the model's whole answer distribution is
exact rather than sampled; free-form answers are greedy generations.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from cm_ray import artifacts
from cm_ray.artifacts import JOINT

SYSTEMS = ("base", "prompted", "joint", "culturemanager", "culturemanager_locale", "oracle")


@dataclass
class Route:
    adapter: str | None
    """Adapter name (culture key or ``_joint``); None = the base model."""
    system: str | None
    """System prompt; None = none."""


class EvalModel:
    """A base causal LM with named LoRA adapters that can be switched per batch."""

    def __init__(self, model_dir: str, adapters: dict[str, str] | None = None, batch_size: int = 8,
                 use_gpu: bool = False):
        """``use_gpu``: put the model on CUDA in bfloat16 when this process has it (decided here,
        where the model runs); else float32 on CPU."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cm_ray.models import default_dtype

        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, default_dtype(self.device))).to(self.device).eval()
        self.batch_size = batch_size
        self.adapters: list[str] = []
        for name, path in (adapters or {}).items():
            self.add_adapter(name, path)

    def add_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if not self.adapters:
            self.lm = PeftModel.from_pretrained(self.lm, path, adapter_name=name).eval()
        else:
            self.lm.load_adapter(path, adapter_name=name)
        self.adapters.append(name)

    @contextmanager
    def using(self, adapter: str | None):
        if adapter is None:
            if self.adapters:
                with self.lm.disable_adapter():
                    yield
            else:
                yield
            return
        if adapter not in self.adapters:
            raise KeyError(f"adapter {adapter!r} not loaded (have {self.adapters})")
        self.lm.set_adapter(adapter)
        yield

    def prompt_ids(self, conversation: list[dict]) -> list[int]:
        text = self.tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def score(self, conversations: list[list[dict]], choices: list[list[str]],
              adapter: str | None = None) -> list[list[float]]:
        """Log-probability of each complete answer (answer + end of turn) per conversation.

        The prompt is encoded once and its key/value cache shared by all of its choices.
        """
        import torch

        end = [self.tok.eos_token_id]
        out = []
        with self.using(adapter), torch.inference_mode():
            for conv, opts in zip(conversations, choices):
                prompt = torch.tensor([self.prompt_ids(conv)], device=self.device)
                first = self.lm(input_ids=prompt, use_cache=True)
                last_lp = torch.log_softmax(first.logits[0, -1].float(), -1)
                conts = [self.tok(o, add_special_tokens=False)["input_ids"] + end for o in opts]
                width = max(len(c) for c in conts)
                ids = torch.full((len(conts), width), self.tok.pad_token_id, device=self.device)
                mask = torch.zeros((len(conts), prompt.shape[1] + width), dtype=torch.long, device=self.device)
                mask[:, :prompt.shape[1]] = 1
                for i, c in enumerate(conts):
                    ids[i, :len(c)] = torch.tensor(c, device=self.device)
                    mask[i, prompt.shape[1]:prompt.shape[1] + len(c)] = 1
                cache = first.past_key_values
                cache.batch_repeat_interleave(len(conts))
                nxt = self.lm(input_ids=ids, attention_mask=mask, past_key_values=cache)
                lps = torch.log_softmax(nxt.logits.float(), -1)
                scores = []
                for i, c in enumerate(conts):
                    s = float(last_lp[c[0]])
                    for j in range(1, len(c)):
                        s += float(lps[i, j - 1, c[j]])
                    scores.append(s)
                out.append(scores)
        return out

    def generate(self, conversations: list[list[dict]], adapter: str | None = None,
                 max_new_tokens: int = 24) -> list[str]:
        """Greedy answers (left-padded batches)."""
        import torch

        self.tok.padding_side = "left"
        texts = [self.tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        out: list[str] = []
        with self.using(adapter), torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(self.device)
                ids = self.lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=self.tok.pad_token_id)
                out += self.tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [o.strip() for o in out]


Router = Callable[..., list[tuple[str, float]]]
"""``router(texts, metadata=None) -> [(culture or "none", probability)]``."""


def plan_routes(system: str, culture: str, request_texts: Sequence[str], adapters: Sequence[str],
                router: Router | None = None, recipe: str = "culturemanager") -> list[Route]:
    """Which adapter and system prompt answer each request of ``culture`` under ``system``.

    The router reads only what a user sends: ``culturemanager`` the request texts,
    ``culturemanager_locale`` the texts and a declared language (the culture's first language,
    as a client's locale would say it); never a prompt the evaluation adds. Every adapter is asked
    with the prompt it was trained with (``artifacts.adapter_system_prompt``); ``prompted`` uses
    the one culture prompt; the base model, as a fallback, gets the request alone, as in Serve.
    """
    n = len(request_texts)
    if system == "base":
        return [Route(None, None)] * n
    if system == "prompted":
        return [Route(None, artifacts.culture_system_prompt(culture))] * n
    if system == "joint":
        return [Route(JOINT, artifacts.adapter_system_prompt(JOINT, culture, recipe))] * n

    def to(pick: str) -> Route:  # a culture without an adapter is served by the base model
        if pick in adapters and pick != JOINT:
            return Route(pick, artifacts.adapter_system_prompt(pick, pick, recipe))
        return Route(None, None)

    if system == "oracle":
        return [to(culture)] * n
    if system in ("culturemanager", "culturemanager_locale"):
        if router is None:
            raise ValueError(f"{system} needs a router")
        texts = list(request_texts)
        if system == "culturemanager":
            picks = router(texts)
        else:
            from cm_ray.cultures import get_culture

            picks = router(texts, metadata=[{"language": get_culture(culture).language}] * n)
        return [to(c) for c, _ in picks]
    raise ValueError(f"unknown system {system!r} (known: {', '.join(SYSTEMS)})")


def missing_artifact(system: str, cultures: Sequence[str], adapters: Sequence[str],
                     router: Any) -> str | None:
    """Why a system cannot run with these artifacts, or None when it can."""
    if system == "joint" and JOINT not in adapters:
        return "no adapters/_joint (train.joint_baseline=false or train.mode without a joint adapter)"
    if system in ("oracle", "culturemanager", "culturemanager_locale"):
        have = [c for c in cultures if c in adapters]
        if not have:
            return "no per-culture adapters under adapters/"
    if system.startswith("culturemanager") and router is None:
        return "no router artifact under router/"
    return None


def available_adapters(store: Any, names: Sequence[str]) -> list[str]:
    """Which of ``names`` have a published adapter (nothing is downloaded)."""
    return [n for n in names if artifacts.published_adapter(store, n) is not None]


def load_adapters(store: Any, names: Sequence[str]) -> tuple[dict[str, str], Path | None]:
    """Local dirs of the adapters that exist in the store (S3 ones are downloaded to a temp dir).

    Returns ``({name: dir}, temp_dir_to_remove_or_None)``.
    """
    found: dict[str, str] = {}
    tmp: Path | None = None
    for name in names:
        got = artifacts.published_adapter(store, name)  # its current version, never a half-written one
        if got is None:
            continue
        local = store.local_path(*got[0])
        if local is None:
            tmp = tmp or Path(tempfile.mkdtemp(prefix="cm_ray_eval_"))
            local = store.download_dir(tmp / name, *got[0])
        found[name] = str(local)
    return found, tmp


def load_router_fn(store: Any) -> Router | None:
    """The trained router as a function of texts, or None when there is no router artifact."""
    if artifacts.published_router(store) is None:
        return None
    from cm_ray.router.model import load_router

    router = load_router(store)
    def route(texts, metadata=None):
        return router.predict(list(texts), metadata)

    route.router = router  # the full router: the router benchmark reads its probabilities
    return route


def cleanup(tmp: Path | None) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
