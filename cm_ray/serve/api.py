"""OpenAI-shaped requests and responses, and the checks every request passes before it runs.

Errors are ``ApiError(status, message, param)`` and render as OpenAI's
``{"error": {"message", "type", "param", "code"}}``. Bad input is always a 4xx naming the problem;
nothing a client gets back names the artifact root, a local path or a storage URI (``scrub``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from cm_ray.serve.openai_types import (IGNORED_FIELDS, MAX_CHOICES, NEUTRAL, ChatRequest,  # noqa: F401
                                       CompletionRequest, Message, _Common, is_neutral)

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # always fullmatch: '$' would accept a trailing newline
_URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S*")
_PATH = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:)?[/\\](?:[^\s/\\'\"]+[/\\])+[^\s'\"]*")
MAX_MESSAGE = 1000
"""Longest error message sent to a client (an echoed value never makes a huge answer)."""


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None,
                 code: str | None = None):
        message = str(message)
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "..."
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_
        self.headers, self.code = headers, code

    def body(self) -> dict:
        """OpenAI's error object (``code``: a string or null, as the API's schema says)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def relay(self) -> dict:
        """``body()`` plus the HTTP status, as the adapter servers hand an error to the ingress."""
        return {**self.body(), "status": self.status}


def scrub(message: str, *roots: str | None) -> str:
    """``message`` without the artifact root, storage URIs or local filesystem paths."""
    for root in roots:
        if root:
            message = message.replace(str(root), "<root>")
    return _PATH.sub("<path>", _URI.sub("<uri>", message))


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def decode_json(raw: bytes) -> Any:
    """The JSON body, or ApiError 400 naming what is wrong (syntax, NaN, huge numbers, nesting, a
    string with a code point UTF-8 cannot encode, e.g. a lone surrogate ``\\ud800``)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, >4300-digit integers, NaN
        raise ApiError(400, f"malformed JSON body: {e}") from None
    check_encodable(body)
    return body


def check_encodable(body: Any) -> None:
    """ApiError 400 naming the first field (dotted path) whose key or string value holds a code
    point that UTF-8 cannot encode (lone surrogates): every string field, at any depth."""
    todo = [((), body)]
    while todo:
        path, v = todo.pop()
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, x in items:
            where = (*path, str(k)[:64] if _encodable(str(k)) else "<key>")
            if not _encodable(str(k)) or isinstance(x, str) and not _encodable(x):
                field = ".".join(where)
                raise ApiError(400, f"{field}: contains a code point that is not valid Unicode text "
                                    "(a lone surrogate); send UTF-8 text", field)
            if isinstance(x, (dict, list)):
                todo.append((where, x))


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _field_error(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p)[:64] for p in err["loc"]) or None
    msg = err["msg"].removeprefix("Value error, ")
    if where is None and ":" in msg:  # a model-level check names its field itself
        where = msg.split(":", 1)[0]
        return ApiError(400, msg, where)
    return ApiError(400, f"{where}: {msg}" if where else msg, where)


def parse_request(cls: type[_Common], body: Any, s) -> _Common:
    """Validate a decoded JSON body against the serve section ``s``; raise ApiError 400/413
    naming the field and the limit (validation errors are 400, as OpenAI's API)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    msgs = body.get("messages")
    if isinstance(msgs, list) and len(msgs) > s.max_messages:
        raise ApiError(400, f"messages: {len(msgs)} messages; the limit is {s.max_messages} "
                            "(serve.max_messages)", "messages")
    unknown = sorted(k for k in body if k not in cls.model_fields and k not in IGNORED_FIELDS
                     and not (k in NEUTRAL and is_neutral(k, body[k])))
    if unknown:
        shown = ", ".join(repr(k[:64]) for k in unknown[:8])
        raise ApiError(400, f"unsupported field{'s' if len(unknown) > 1 else ''}: {shown} (this "
                            "server does not implement them; only their neutral values such as "
                            "null, false or 0 are accepted)", unknown[0][:64])
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        raise _field_error(e) from None
    except RecursionError:
        raise ApiError(400, "request nested too deeply") from None
    field = "messages" if cls is ChatRequest else "prompt"
    if req.chars() > s.max_prompt_chars:
        raise ApiError(413, f"prompt has {req.chars()} characters; the limit is "
                            f"{s.max_prompt_chars} (serve.max_prompt_chars)", field)
    if req.choices() > MAX_CHOICES:
        raise ApiError(400, f"n: {req.n} choices for each of {len(req.payloads())} prompts; at most "
                            f"{MAX_CHOICES} choices in all", "n")
    if (req.new_tokens() or 0) > s.max_new_tokens:
        got = req.new_tokens()
        name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        raise ApiError(400, f"{name}: at most {s.max_new_tokens} (serve.max_new_tokens), got "
                            f"{got if got < 10**30 else 'a larger number'}", name)
    return req


def check_prompt_tokens(req: _Common, tokenizer, limit: int) -> int:
    """Prompt tokens of ``req`` as the replica will run it (chat template rendered with the
    generation prompt, no extra special tokens; the longest of several prompts); ApiError 400
    past ``limit``. Token-id prompts must be ids of the tokenizer's vocabulary (400)."""
    field = "messages" if isinstance(req, ChatRequest) else "prompt"
    if isinstance(req, ChatRequest):
        try:
            texts = [tokenizer.apply_chat_template(req.payload()["messages"], tokenize=False,
                                                   add_generation_prompt=True)]
        except Exception as e:  # a template that refuses this sequence of roles
            raise ApiError(400, f"messages: the model's chat template refused them: "
                                f"{type(e).__name__}: {e}", field) from None
    else:
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for ids in req.token_ids() for t in ids):
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", field)
        req.decode(tokenizer)
        texts = [p["prompt"] for p in req.payloads()]
    n = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    if n > limit:
        raise ApiError(400, f"{field}: the prompt is {n} tokens; the limit is {limit} "
                            "(serve.max_prompt_tokens)", field, "invalid_request_error",
                       code="context_length_exceeded")
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
