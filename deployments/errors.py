"""One error type for the whole API, rendered once as the OpenAI error body."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error a client can act on; `status` is the HTTP status it maps to."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ModelNotFoundError(ApiError):
    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(
            404,
            f"The model '{model}' does not exist. Served models: {', '.join(sorted(served))}.",
            param="model",
            code="model_not_found",
        )


class ContextLengthError(ApiError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context: int) -> None:
        super().__init__(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
            "for the completion). Please reduce the prompt or max_tokens.",
            param="messages",
            code="context_length_exceeded",
        )


class OverloadedError(ApiError):
    def __init__(self, retry_after_s: int = 1) -> None:
        super().__init__(
            503,
            "The server is at capacity; retry after the given number of seconds.",
            type="server_overloaded",
            code="overloaded",
            headers={"Retry-After": str(retry_after_s)},
        )
