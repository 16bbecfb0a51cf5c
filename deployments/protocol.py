"""The messages between router, model server and engine: one definition, no torch.

The router sends a `GenerateRequest` through a Serve handle; the replica streams back a closed
set of events: `Accepted` (or `Failed`) first, then `Delta`s, then one `Finished` or `Failed`.
They are plain frozen dataclasses (cheap to pickle across Ray, one per streamed chunk), the way
Ray Serve LLM passes typed request objects across its handles instead of dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# What fits where a value reaches torch or a generator: token ids, top_k and seeds are int64.
INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop. The router fills every field."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One generation. The engine keys it by `request_id`, made by the server, so two clients
    sending the same X-Request-Id cannot cancel each other; `trace_id` is that header's value
    (or Serve's), for logs only."""

    request_id: str
    kind: Literal["chat", "completion"]
    params: SamplingParams
    messages: tuple[Message, ...] = ()  # kind == "chat"
    prompt: str = ""  # kind == "completion"
    trace_id: str = ""


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An error as it crosses processes; the HTTP edge renders it as the OpenAI error body."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, dict[str, str | None]]:
        """`{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Timings:
    queue_s: float | None = None  # arrival to first scheduled
    ttft_s: float | None = None  # arrival to first token


@dataclass(frozen=True, slots=True)
class Accepted:
    """The replica took the request; `variant` is the served model that did."""

    variant: str


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of a generation that ended normally; `text` is its last piece."""

    reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    timings: Timings = Timings()
    text: str = ""
    memory_mb: float = 0.0


@dataclass(frozen=True, slots=True)
class Failed:
    """The last event of a request that failed, before or after output began."""

    error: ErrorInfo
    usage: Usage = Usage()


Event = Accepted | Delta | Finished | Failed
