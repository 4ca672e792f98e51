"""OpenAI-shaped requests and responses, and the checks every request passes before it runs.

Errors are ``ApiError(status, message, param)`` and render as OpenAI's
``{"error": {"message", "type", "param", "code"}}``. Bad input is always a 4xx naming the problem;
nothing a client gets back names the artifact root, a local path or a storage URI (``scrub``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cm_ray.artifacts import AUTO

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # always fullmatch: '$' would accept a trailing newline
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8}){0,3}")
_URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S*")
_PATH = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:)?[/\\](?:[^\s/\\'\"]+[/\\])+[^\s'\"]*")
MAX_MESSAGE = 1000
"""Longest error message sent to a client (an echoed value never makes a huge answer)."""


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        message = str(message)
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "..."
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


def scrub(message: str, *roots: str | None) -> str:
    """``message`` without the artifact root, storage URIs or local filesystem paths."""
    for root in roots:
        if root:
            message = message.replace(str(root), "<root>")
    return _PATH.sub("<path>", _URI.sub("<uri>", message))


def _printable(v: str, what: str) -> str:
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp") for c in v):
        raise ValueError(f"{what} contains control or format characters")
    return v


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


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


IGNORED_FIELDS = frozenset({"user"})
"""OpenAI fields accepted and ignored (they change nothing about the answer). Every other field
the server does not implement (tools, logprobs, seed, ...) is a 400 naming it."""


class _Common(BaseModel):
    # strict: "5" is not an integer and 1 is not a string; unsupported fields: see parse_request.
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str = Field(AUTO, max_length=64)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    """Default 0 = greedy (reproducible answers; OpenAI's default is 1)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    """Up to 4 stop strings of at most 256 characters (as OpenAI)."""
    culture: str | None = Field(None, max_length=64)
    """Explicit culture override (same as the X-Culture header) when model is auto."""
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    """Router hints: ``language`` (ISO 639) and ``country`` (any culture alias). At most 16 pairs,
    keys <= 64 and values <= 512 characters, no control characters."""

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
            _printable(key, "a key"), _printable(value, f"{key[:64]!r}")
        if (v or {}).get("language") and not _LANGUAGE.fullmatch(v["language"]):
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
        return {"messages": [m.model_dump() for m in self.messages]}

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)

    def router_text(self) -> str:
        return self.prompt

    def chars(self) -> int:
        return len(self.prompt)

    def payload(self) -> dict:
        return {"prompt": self.prompt}

    def new_tokens(self) -> int | None:
        return self.max_tokens


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def decode_json(raw: bytes) -> Any:
    """The JSON body, or ApiError 400 naming what is wrong (syntax, NaN, huge numbers, nesting)."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, >4300-digit integers, NaN
        raise ApiError(400, f"malformed JSON body: {e}") from None


def parse_request(cls: type[_Common], body: Any, s) -> _Common:
    """Validate a decoded JSON body against the serve section ``s``; raise ApiError 400/413/422
    naming the field and the limit."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    msgs = body.get("messages")
    if isinstance(msgs, list) and len(msgs) > s.max_messages:
        raise ApiError(400, f"messages: {len(msgs)} messages; the limit is {s.max_messages} "
                            "(serve.max_messages)", "messages")
    unknown = sorted(k for k in body if k not in cls.model_fields and k not in IGNORED_FIELDS)
    if unknown:
        shown = ", ".join(repr(k[:64]) for k in unknown[:8])
        raise ApiError(400, f"unsupported field{'s' if len(unknown) > 1 else ''}: {shown} (this "
                            "server does not implement them)", unknown[0][:64])
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p)[:64] for p in err["loc"]) or None
        raise ApiError(422, f"{where}: {err['msg']}" if where else err["msg"], where) from None
    except RecursionError:
        raise ApiError(400, "request nested too deeply") from None
    field = "messages" if cls is ChatRequest else "prompt"
    if req.chars() > s.max_prompt_chars:
        raise ApiError(413, f"prompt has {req.chars()} characters; the limit is "
                            f"{s.max_prompt_chars} (serve.max_prompt_chars)", field)
    if (req.new_tokens() or 0) > s.max_new_tokens:
        got = req.new_tokens()
        name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise ApiError(422, f"{name}: at most {s.max_new_tokens} (serve.max_new_tokens), got "
                            f"{got if got < 10**30 else 'a larger number'}", name)
    return req


def check_prompt_tokens(req: _Common, tokenizer, limit: int) -> int:
    """Prompt tokens of ``req`` as the replica will run it (chat template rendered with the
    generation prompt, no extra special tokens); ApiError 400 past ``limit``."""
    field = "messages" if isinstance(req, ChatRequest) else "prompt"
    if isinstance(req, ChatRequest):
        try:
            text = tokenizer.apply_chat_template(req.payload()["messages"], tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # a template that refuses this sequence of roles
            raise ApiError(400, f"messages: the model's chat template refused them: "
                                f"{type(e).__name__}: {e}", field) from None
    else:
        text = req.prompt
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if n > limit:
        raise ApiError(400, f"{field}: the prompt is {n} tokens; the limit is {limit} "
                            "(serve.max_prompt_tokens)", field, "context_length_exceeded")
    return n


def check_adapter_id(value: str, param: str = "model") -> str:
    """Normalise a culture/adapter id (``mx`` -> ``MX``); refuse anything path-like with a 400."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{param}: must be a non-empty string", param)
    shown = repr(value[:64])
    if "/" in value or "\\" in value or ".." in value:
        raise ApiError(400, f"{param}: {shown} must not contain path separators or '..'", param)
    if not _ID.fullmatch(value):
        raise ApiError(400, f"{param}: {shown} may only contain letters, digits, '_' and '-' "
                            "(at most 64)", param)
    return value.upper() if len(value) == 2 else value
