"""The engine interface every generation engine implements: chat conversations in, texts (and
token counts) out, with ``GenerationParams`` saying how, and ``bounded_schema`` for guided JSON.

JSON-guided decoding: with ``GenerationParams.json_schema`` set, every engine constrains its output to
the schema (xgrammar logits masks for transformers, ``StructuredOutputsParams`` for vLLM,
``response_format`` for OpenAI). Small models fill unbounded strings and arrays until the token limit,
so ``bounded_schema`` caps them (``maxLength`` / ``maxItems``) before decoding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol

ENGINES = ("transformers", "vllm", "openai")


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
    """stop (EOS, a stop string or the end of the JSON value), length, or error."""
    retries: int = 0
    """Retried HTTP attempts (openai engine)."""
    cost_usd: float = 0.0
    error: str | None = None
    latency_s: float = 0.0
    """Seconds the engine spent on this row's request (its batch's call for batched engines)."""
    cached_prompt_tokens: int = 0
    """Prompt tokens served from the engine's prefix cache (vLLM; 0 where not reported)."""


class Engine(Protocol):
    name: str
    model: str

    def generate(self, conversations: list[list[dict]], params: GenerationParams) -> list[Generation]:
        ...


def bounded_schema(schema: dict, max_string_chars: int | None = 300, max_items: int | None = 10) -> dict:
    """Copy of ``schema`` where every free string has a ``maxLength`` and every array a ``maxItems``.

    Under guided decoding a 135M model keeps appending list items or string characters that the
    grammar allows, until the token limit cuts the JSON off; bounds let the grammar close the value.
    Strings with an ``enum``/``const``/``pattern`` and existing bounds are left as they are.
    """
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: walk(v) for k, v in node.items()}
            kind = node.get("type")
            if (kind == "string" and max_string_chars and "maxLength" not in node
                    and not {"enum", "const", "pattern"} & node.keys()):
                node["maxLength"] = max(max_string_chars, node.get("minLength", 0))
            if kind == "array" and max_items and "maxItems" not in node:
                node["maxItems"] = max(max_items, node.get("minItems", 0))
            return node
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(copy.deepcopy(schema))
