"""OpenAI-shaped response bodies (chat and text completions, SSE chunks, usage) with the routing
decision as extra fields, and the X-Culture / X-Router-* / X-Adapter-* / X-Batch-* headers.
"""

from __future__ import annotations

import time
import uuid


def usage_body(result: dict) -> dict:
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
            "usage": usage_body(result), **route}


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
    if route.get("router_evidence"):
        h["X-Router-Evidence"] = route["router_evidence"]
    if result:
        h["X-Adapter-Cold"] = "1" if result.get("adapter_cold") else "0"
        if result.get("adapter_cold"):
            h["X-Adapter-Load-Ms"] = f"{result.get('adapter_load_ms', 0.0):.1f}"
        h["X-Batch-Size"] = str(result.get("batch_size", 1))
        h["X-Batch-Adapters"] = str(result.get("batch_adapters", 1))
    return h
