"""OpenAI response and stream-chunk bodies, built from the replica's events."""

from __future__ import annotations

import json
from typing import Any

from deployments.gateway.schemas import now
from deployments.protocol import Finished, Usage

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop"}


def usage_body(u: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


def completion_id(kind: str, request_id: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"


def full_response(kind: str, request_id: str, model: str, text: str, final: Finished) -> dict:
    """Non-streaming body for /v1/chat/completions or /v1/completions."""
    reason = FINISH_REASONS[final.reason]
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
    return {
        "id": completion_id(kind, request_id),
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": now(),
        "model": model,
        "choices": [choice],
        "usage": usage_body(final.usage),
    }


def chunk(
    kind: str,
    request_id: str,
    model: str,
    text: str | None,
    finish_reason: str | None = None,
    role: bool = False,
) -> dict:
    """One streamed chunk; `role` marks the chat stream's opening chunk."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason}
    choice["logprobs"] = None
    return {
        "id": completion_id(kind, request_id),
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": now(),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(kind: str, request_id: str, model: str, final: Finished) -> dict:
    """The extra last chunk of `stream_options.include_usage`: no choices, usage set."""
    body = chunk(kind, request_id, model, None)
    body["choices"] = []
    body["usage"] = usage_body(final.usage)
    return body


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
