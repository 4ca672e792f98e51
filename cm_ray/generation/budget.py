"""Prompt budgets: a prompt may take ``context_limit(cfg) - max_new_tokens`` tokens, counted with the
generator's tokenizer and chat template before generation.

An engine refuses a prompt longer than its context (vLLM: ``max_model_len``), and inside
``ray.data.llm`` one refused prompt fails the whole run. So the synthesis stage counts each prompt,
trims its grounding until it fits (``fit_prompts``), and marks a row that still cannot fit with
``skip_reason`` = ``prompt_over_limit``: ``generate`` never sends such a row to an engine, and the
stage counts it (``checks`` kind ``prompt_over_limit``).

``context_limit(cfg)`` is the limit a budget is checked against:

- ``vllm``: the configured ``synthesis.vllm.max_model_len`` (an ``engine_kwargs`` value wins), not
  the loaded model's own context, so a rehearsal that stands a small model of the same family in
  for the production generator checks its prompts against the production limit. Where the
  generator is a known hub id (``KNOWN_CONTEXT``), its context must not be lower than the
  configured length (a config error naming ``synthesis.vllm.max_model_len``).
- ``transformers``: the model's own context (``KNOWN_CONTEXT``, else ``max_position_embeddings``
  in its config).
- ``openai``: None, no check (the endpoint's context is not known here; an endpoint that refuses
  a prompt fails that row only, ``generation_error``).

Counts use the tokenizer of ``models.generator`` (in a rehearsal, the stand-in's: a smaller
vocabulary than Llama 3's writes more tokens for the same text, so the check errs on the safe side).
Light at import: transformers is imported when a tokenizer is loaded.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

KNOWN_CONTEXT = {
    "meta-llama/Llama-3.1-8B-Instruct": 131072,
    "meta-llama/Meta-Llama-3.1-8B-Instruct": 131072,
}
"""Context lengths of hub ids the project's configs name (the model card's figure)."""

OVER_LIMIT = "prompt_over_limit"
"""The ``skip_reason`` (and rejection reason) of a row whose prompt cannot fit its budget."""


def context_limit(cfg: Any) -> int | None:
    """The context length (tokens) prompts are checked against; None = no known limit."""
    from cm_ray.config import ConfigError

    s, generator = cfg.synthesis, cfg.models.generator
    if s.engine == "vllm":
        limit = int(s.vllm.engine_kwargs.get("max_model_len", s.vllm.max_model_len))
        native = KNOWN_CONTEXT.get(generator)
        if native is not None and native < limit:
            raise ConfigError(f"synthesis.vllm.max_model_len: {limit} is longer than {generator}'s "
                              f"context of {native} tokens")
        return limit
    if s.engine == "transformers":
        return model_context(generator, cfg.models.cache_dir)
    return None


def model_context(model: str, cache_dir: str | None = None) -> int | None:
    """A model's own context length: ``KNOWN_CONTEXT``, else its config's ``max_position_embeddings``."""
    if model in KNOWN_CONTEXT:
        return KNOWN_CONTEXT[model]
    from cm_ray.models import resolve_model

    path = resolve_model(model, cache_dir)
    conf = Path(path) / "config.json"
    if conf.exists():
        value = json.loads(conf.read_text()).get("max_position_embeddings")
    else:  # a hub id: its config only
        from transformers import AutoConfig

        value = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    return int(value) if value else None


def prompt_budget(cfg: Any, max_new_tokens: int) -> dict | None:
    """What a worker needs to count and fit prompts: ``{model, cache_dir, limit, max_new_tokens,
    budget}`` (plain data), or None where the engine has no known limit."""
    from cm_ray.config import ConfigError

    limit = context_limit(cfg)
    if limit is None:
        return None
    if max_new_tokens >= limit:
        raise ConfigError(f"synthesis.max_new_tokens: {max_new_tokens} leaves no room for a prompt in the "
                          f"model's context of {limit} tokens")
    return {"model": cfg.models.generator, "cache_dir": cfg.models.cache_dir, "limit": limit,
            "max_new_tokens": max_new_tokens, "budget": limit - max_new_tokens}


@lru_cache(maxsize=4)
def tokenizer(model: str, cache_dir: str | None = None):
    """The generator's tokenizer (loaded once per process)."""
    from transformers import AutoTokenizer

    from cm_ray.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model, cache_dir))


def count_tokens(tok: Any, messages: list[dict]) -> int:
    """Tokens of one conversation as the engine sees it: the chat template with the generation
    prompt, tokenized with special tokens (an engine given the text adds them too)."""
    conv = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(f"{m['role']}: {m['content']}" for m in conv)
    return len(tok(text, add_special_tokens=True)["input_ids"])


def counter(budget: dict | None) -> Callable[[list[dict]], int] | None:
    """``messages -> tokens`` with the budget's tokenizer, or None without a budget."""
    if not budget:
        return None
    tok = tokenizer(budget["model"], budget.get("cache_dir"))
    return lambda messages: count_tokens(tok, messages)


def fit_prompts(build: Callable[[int], list[list[dict]]], levels: int,
                count: Callable[[list[dict]], int] | None, budget: int | None) -> tuple[int, list, list[int]]:
    """The first trim level (0 = untrimmed, up to ``levels - 1``) at which every conversation
    ``build(level)`` returns fits ``budget`` tokens.

    Returns:
        (level, its conversations, their token counts); the last level's when none fits (the
        caller rejects the conversations still over), level 0 with counts of 0 without ``count``.
    """
    if count is None or budget is None:
        convs = build(0)
        return 0, convs, [0] * len(convs)
    for level in range(levels):
        convs = build(level)
        counts = [count(c) for c in convs]
        if max(counts, default=0) <= budget:
            break
    return level, convs, counts
