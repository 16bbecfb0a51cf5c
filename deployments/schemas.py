"""Request and response models: the OpenAI-compatible API and the seed `/generate` API."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOKENS_CAP = 4096


class _Request(BaseModel):
    # Unknown OpenAI fields (logprobs, presence_penalty, ...) are accepted and ignored, as the
    # official clients send some of them by default.
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(_Request):
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k (vLLM extension).")
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = Field(False, description="Decode to max_tokens (benchmarks).")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    def resolved_max_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)

    def prompt_text(self) -> str:
        """The messages' text, one per line (for token estimates and the audit log)."""
        return "\n".join(m.text() for m in self.messages)


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False

    @model_validator(mode="after")
    def _single_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("only one prompt per request is supported")
        return self

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class SeedGenerateRequest(BaseModel):
    """The seed API: one prompt in, text and timing figures out."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(128, ge=1, le=MAX_TOKENS_CAP)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    model: str | None = Field(None, description="Served model; the default model if omitted.")
    use_chat_template: bool = Field(True, description="Wrap the prompt as a user chat turn.")

    def prompt_text(self) -> str:
        return self.prompt

    def resolved_max_tokens(self, default: int) -> int:
        """Same contract as the OpenAI requests': `max_new_tokens` always has a value."""
        return self.max_new_tokens


class GenerateResponse(BaseModel):
    generated_text: str
    inference_time: float
    tokens_generated: int
    tokens_per_second: float
    memory_used: float = Field(description="Replica resident memory in MB.")
    model: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def now() -> int:
    return int(time.time())
