"""Request and response models: the OpenAI-compatible API and the seed `/generate` API.

Every field is typed and bounded where it reaches torch or a generator (int64 integers, finite
floats, capped strings and lists). OpenAI fields that would change the answer and are not
implemented (`logprobs`, `tools`, `response_format` other than text, penalties, ...) are refused
with a 400 naming them, never silently ignored.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOKENS_CAP = 4096
MAX_STOP = 4
MAX_NAME = 256  # model, user, a stop string
MAX_MESSAGES = 512
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# OpenAI fields this server does not implement, and the value that means "not used". The official
# clients send some of them with that value by default, so only another value is refused.
UNSUPPORTED: dict[str, object] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "echo": (None, False),
    "parallel_tool_calls": (None, True, False),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


class _Request(BaseModel):
    # Unknown fields are accepted and ignored (clients send metadata such as `store`), except the
    # OpenAI ones above that would change the answer.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: object) -> object:
        if isinstance(data, dict):
            for name, unused in UNSUPPORTED.items():
                if name in data and data[name] not in unused:  # type: ignore[operator]
                    raise ValueError(f"'{name}' is not supported by this server")
        return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(_Request):
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="0 disables top-k (vLLM extension).")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} strings.")
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=MAX_NAME)
    ignore_eos: bool = Field(False, description="Decode to max_tokens (benchmarks).")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP or any(not s or len(s) > MAX_NAME for s in stops):
            raise ValueError(
                f"stop must be up to {MAX_STOP} non-empty strings of at most {MAX_NAME} characters"
            )
        return stops

    def resolved_max_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class TextPart(BaseModel):
    """A content part; only text is supported (images and audio get a 400 naming the part)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)] | None = None
    name: str | None = Field(None, max_length=MAX_NAME)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    model: str = Field(max_length=MAX_NAME)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)

    def prompt_text(self) -> str:
        """The messages' text, one per line (for token estimates and the audit log)."""
        return "\n".join(m.text() for m in self.messages)


class CompletionRequest(SamplingFields):
    model: str = Field(max_length=MAX_NAME)
    prompt: str | list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _single_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("only one prompt per request is supported")
        return self

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class SeedGenerateRequest(BaseModel):
    """The seed API: one prompt in, text and timing figures out."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(128, ge=1, le=MAX_TOKENS_CAP)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0, le=1_000_000)
    model: str | None = Field(
        None, max_length=MAX_NAME, description="Served model; the default model if omitted."
    )
    use_chat_template: bool = Field(True, description="Wrap the prompt as a user chat turn.")

    def prompt_text(self) -> str:
        return self.prompt

    def resolved_max_tokens(self, default: int) -> int:
        """Same contract as the OpenAI requests': `max_new_tokens` always has a value."""
        return self.max_new_tokens


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error's body, as OpenAI's API writes it."""

    error: ErrorDetail


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
