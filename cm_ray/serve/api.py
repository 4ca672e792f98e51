"""OpenAI-shaped requests and responses, and the checks every request passes before it runs.

Errors are ``ApiError(status, message, param)`` and render as OpenAI's
``{"error": {"message", "type", "param", "code"}}``. Bad input is always a 4xx naming the problem.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cm_ray.artifacts import AUTO
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    # strict: "5" is not an integer and 1 is not a string; unknown OpenAI fields are ignored.
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str = AUTO
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    """Default 0 = greedy (reproducible answers; OpenAI's default is 1)."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    culture: str | None = None
    """Explicit culture override (same as the X-Culture header) when model is auto."""
    metadata: dict[str, str] | None = None
    """Router hints: ``language`` (ISO 639) and ``country`` (any culture alias)."""

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        return [v] if isinstance(v, str) else v


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


def parse_request(cls: type[_Common], body: Any, max_chars: int, max_new_tokens: int) -> _Common:
    """Validate a decoded JSON body; raise ApiError 400/413/422 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(422, f"{where}: {err['msg']}" if where else err["msg"], where) from None
    if req.chars() > max_chars:
        raise ApiError(413, f"prompt has {req.chars()} characters; the limit is {max_chars} "
                            f"(serve.max_prompt_chars)", "messages" if cls is ChatRequest else "prompt")
    if (req.new_tokens() or 0) > max_new_tokens:
        raise ApiError(422, f"max_tokens: at most {max_new_tokens} (serve.max_new_tokens), got "
                            f"{req.new_tokens()}", "max_tokens")
    return req


def check_adapter_id(value: str, param: str = "model") -> str:
    """Normalise a culture/adapter id (``mx`` -> ``MX``); refuse anything path-like with a 400."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{param}: must be a non-empty string", param)
    if "/" in value or "\\" in value or ".." in value:
        raise ApiError(400, f"{param}: {value!r} must not contain path separators or '..'", param)
    if not _ID.match(value):
        raise ApiError(400, f"{param}: {value!r} may only contain letters, digits, '_' and '-'",
                       param)
    return value.upper() if len(value) == 2 else value


# -- responses --------------------------------------------------------------------------------


def _usage(result: dict) -> dict:
    p, c = result.get("prompt_tokens", 0), result.get("completion_tokens", 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion_body(chat: bool, model: str, result: dict, route: dict) -> dict:
    """The non-streaming response, with the routing decision as extra fields."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                  "finish_reason": result["finish_reason"]}
    else:
        choice = {"index": 0, "text": result["text"], "finish_reason": result["finish_reason"],
                  "logprobs": None}
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": _usage(result), **route}


def chunk_body(chat: bool, cid: str, model: str, delta: str | None, finish: str | None,
               route: dict) -> dict:
    """One SSE chunk (``chat.completion.chunk`` / ``text_completion``)."""
    if chat:
        choice = {"index": 0, "delta": {"content": delta} if delta is not None else {},
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta or "", "finish_reason": finish}
    return {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], **route}


def route_headers(route: dict, result: dict | None = None) -> dict[str, str]:
    h = {"X-Culture": route["culture"], "X-Router-Confidence": f"{route['router_confidence']:.4f}",
         "X-Routed-By": route["routed_by"]}
    if result:
        h["X-Adapter-Cold"] = "1" if result.get("adapter_cold") else "0"
        if result.get("adapter_cold"):
            h["X-Adapter-Load-Ms"] = f"{result.get('adapter_load_ms', 0.0):.1f}"
        h["X-Batch-Size"] = str(result.get("batch_size", 1))
        h["X-Batch-Adapters"] = str(result.get("batch_adapters", 1))
    return h
