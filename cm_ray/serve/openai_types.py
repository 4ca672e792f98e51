"""The OpenAI request bodies the ingress accepts (chat and text completions), as real clients send
them: message ``content`` as a string or an array of text parts, roles ``system``, ``developer``
(rendered as ``system``), ``user`` and ``assistant``, ``n`` choices, ``prompt`` as a string, a list
of strings, token ids or lists of token ids, ``stream_options.include_usage`` null.

Optional OpenAI fields this server does not implement are accepted at their neutral value (null,
``logprobs: false``, ``presence_penalty: 0``, ``echo: false``, ``best_of: 1``, ...; ``NEUTRAL``)
and refused with a 400 naming them otherwise (``cm_ray.serve.api.parse_request``).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cm_ray.artifacts import AUTO

LANGUAGE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8}){0,3}")
MAX_CHOICES = 16
"""Choices one request may ask for (``n`` times the number of prompts)."""

NEUTRAL: dict[str, tuple] = {
    "logprobs": (False,), "top_logprobs": (0,), "presence_penalty": (0,), "frequency_penalty": (0,),
    "echo": (False,), "best_of": (1,), "logit_bias": ({},), "suffix": ("",), "tool_choice": ("none",),
    "parallel_tool_calls": (True, False), "store": (False,), "service_tier": ("auto", "default"),
    "modalities": (["text"],), "seed": (), "tools": (), "functions": (), "function_call": ("none",),
    "prediction": (), "audio": (), "reasoning_effort": (), "web_search_options": (), "prompt_cache_key": (),
    "safety_identifier": (), "verbosity": (),
}
"""Fields accepted (and ignored) at these values or null; any other value is a 400 naming them."""
IGNORED_FIELDS = frozenset({"user"})
"""OpenAI fields accepted and ignored whatever their value (they change nothing about the answer)."""


def is_neutral(name: str, value: Any) -> bool:
    """Whether ``value`` of the unimplemented field ``name`` asks for nothing (null or its default;
    ``True`` is not ``1``)."""
    return value is None or any(type(value) is type(v) and value == v or
                                type(value) in (int, float) and type(v) in (int, float) and value == v
                                for v in NEUTRAL.get(name, ()))


def printable(v: str, what: str) -> str:
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in v):
        raise ValueError(f"{what} contains control or format characters")
    return v


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v):
        """An array of text parts is their texts joined by newlines (OpenAI's content parts)."""
        if not isinstance(v, list):
            return v
        if not v:
            raise ValueError("an array of content parts must not be empty")
        texts = []
        for i, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text":
                got = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"part {i}: only text parts are supported, got {str(got)[:64]!r}")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i}: 'text' must be a string")
            texts.append(part["text"])
        return "\n".join(texts)

    def rendered(self) -> dict:
        """The message as the chat template sees it (``developer`` is the system turn)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool | None = None


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``text``, ``json_object`` (any JSON object) or ``json_schema`` (guided decoding)."""
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Common(BaseModel):
    # strict: "5" is not an integer and 1 is not a string; unsupported fields: see parse_request.
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str = Field(AUTO, max_length=64)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(0.0, ge=0.0, le=2.0)
    """Default 0 = greedy (reproducible answers; OpenAI's default is 1); null = the default."""
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stop: str | list[str] | None = None
    """Up to 4 stop strings of at most 256 characters (as OpenAI)."""
    culture: str | None = Field(None, max_length=64)
    """Explicit culture override (same as the X-Culture header) when model is auto."""
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    """Router hints: ``language`` (ISO 639) and ``country`` (any culture alias). At most 16 pairs,
    keys <= 64 and values <= 512 characters, no control characters."""

    @model_validator(mode="after")
    def _defaults(self):
        self.temperature = 0.0 if self.temperature is None else self.temperature
        self.top_p = 1.0 if self.top_p is None else self.top_p
        self.n, self.stream = self.n or 1, bool(self.stream)
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        v = [v] if isinstance(v, str) else v
        if v is not None and (len(v) > 4 or any(len(x) > 256 for x in v)):
            raise ValueError("at most 4 stop strings of at most 256 characters")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        from cm_ray.cultures import normalize_culture

        for key, value in (v or {}).items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError(f"key {key[:64]!r}: keys <= 64 and values <= 512 characters")
            printable(key, "a key"), printable(value, f"{key[:64]!r}")
        if (v or {}).get("language") and not LANGUAGE.fullmatch(v["language"]):
            raise ValueError(f"language {v['language'][:64]!r} is not an ISO 639 / BCP 47 tag")
        if (v or {}).get("country"):
            try:
                normalize_culture(v["country"])
            except KeyError:
                raise ValueError(f"country {v['country'][:64]!r} is not a known culture "
                                 "(use an ISO 3166-1 code such as 'MX')") from None
        return v

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        if v is not None and (v.type == "json_schema") != (v.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        if v is not None and v.json_schema is not None:
            import jsonschema

            try:
                jsonschema.validators.validator_for(v.json_schema.schema_).check_schema(
                    v.json_schema.schema_)
            except jsonschema.SchemaError as e:
                raise ValueError(f"json_schema.schema is not a valid JSON Schema: {e.message}") from None
        return v

    def json_schema(self, max_string_chars: int | None) -> dict | None:
        """The schema guided decoding enforces (free strings bounded), or None for text."""
        from cm_ray.generation.base import bounded_schema

        f = self.response_format
        if f is None or f.type == "text":
            return None
        if f.type == "json_object":
            return {"type": "object"}
        return bounded_schema(f.json_schema.schema_, max_string_chars, 10)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def choices(self) -> int:
        """Choices in the answer: ``n`` per prompt."""
        return self.n * len(self.payloads())


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, v):
        if not any(m.role == "user" and m.content.strip() for m in v):
            raise ValueError("must contain a non-empty user message")
        return v

    def router_text(self) -> str:
        return next(m.content for m in reversed(self.messages) if m.role == "user")

    def chars(self) -> int:
        return sum(len(m.content) for m in self.messages)

    def payload(self) -> dict:
        return {"messages": [m.rendered() for m in self.messages]}

    def payloads(self) -> list[dict]:
        return [self.payload()]

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    """One prompt (a string or token ids) or several (one choice group each)."""

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        if v == "" or v == []:
            raise ValueError("must not be empty")
        if isinstance(v, list) and all(isinstance(x, list) for x in v) and any(x == [] for x in v):
            raise ValueError("a list of token ids must not be empty")
        if isinstance(v, list) and all(isinstance(x, str) for x in v) and any(x == "" for x in v):
            raise ValueError("a prompt in the list must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def token_ids(self) -> list[list[int]]:
        return [p for p in self.prompts() if not isinstance(p, str)]

    def decode(self, tokenizer) -> None:
        """Token-id prompts become their text (the replicas tokenize text)."""
        self.prompt = [p if isinstance(p, str) else tokenizer.decode(p) for p in self.prompts()]

    def router_text(self) -> str:
        return "\n".join(p for p in self.prompts() if isinstance(p, str))

    def chars(self) -> int:
        return sum(len(p) for p in self.prompts())

    def payloads(self) -> list[dict]:
        return [{"prompt": p} for p in self.prompts()]

    def payload(self) -> dict:
        return self.payloads()[0]

    def new_tokens(self) -> int | None:
        return self.max_tokens
