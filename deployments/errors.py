"""Errors: the engine's domain errors, the API's HTTP error, and the one mapping between them.

The engine raises what went wrong (`ContextLengthExceeded`, `EngineOverloaded`, ...) and knows
nothing of HTTP. `error_info` is the only place that turns an exception into a status and an
OpenAI error body; the router raises `ApiError`s, which carry one already.
"""

from __future__ import annotations

from deployments.protocol import ErrorInfo


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

    @classmethod
    def from_info(cls, info: ErrorInfo) -> ApiError:
        return cls(
            info.status,
            info.message,
            type=info.type,
            param=info.param,
            code=info.code,
            headers=dict(info.headers),
        )

    def info(self) -> ErrorInfo:
        return ErrorInfo(
            self.status, self.message, self.type, self.param, self.code, dict(self.headers)
        )

    def body(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
        return self.info().body()


class ModelNotFoundError(ApiError):
    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(
            404,
            f"The model '{model[:128]}' does not exist. Served models: "
            f"{', '.join(sorted(served))}.",
            param="model",
            code="model_not_found",
        )


def overloaded(retry_after_s: int = 1) -> ApiError:
    return ApiError(
        503,
        "The server is at capacity; retry after the given number of seconds.",
        type="server_overloaded",
        code="overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )


# ---- the engine's domain errors (no HTTP in them) ----------------------------------------------
class EngineError(Exception):
    """A request the engine cannot serve; `param` names the request field at fault, if any."""

    code = "engine_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidPrompt(EngineError):
    """The prompt cannot be built or tokenized (empty, no chat template, bad text)."""

    code = "invalid_prompt"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param)
        self.code = code or InvalidPrompt.code


class ContextLengthExceeded(EngineError):
    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_tokens: int, context: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
            "for the completion). Please reduce the prompt or max_tokens.",
            param="messages",
        )


class EngineOverloaded(EngineError):
    code = "overloaded"


class EngineUnavailable(EngineError):
    """The engine is not running (failed, or draining for shutdown)."""

    code = "engine_unavailable"


class OutOfMemory(EngineError):
    code = "out_of_memory"


class RequestFailed(EngineError):
    """Something unexpected broke while serving this one request; the engine goes on."""

    code = "request_failed"


_STATUS: dict[type[EngineError], tuple[int, str, str | None]] = {
    # domain error -> (HTTP status, OpenAI error type, Retry-After seconds)
    InvalidPrompt: (400, "invalid_request_error", None),
    ContextLengthExceeded: (400, "invalid_request_error", None),
    EngineOverloaded: (503, "server_overloaded", "1"),
    EngineUnavailable: (503, "server_error", "1"),
    OutOfMemory: (503, "server_overloaded", "1"),
    RequestFailed: (500, "server_error", None),
}


def error_info(exc: BaseException) -> ErrorInfo:
    """The HTTP rendering of any exception; an unexpected one is a 500 that names its type only
    (internals stay in the log)."""
    if isinstance(exc, ApiError):
        return exc.info()
    if isinstance(exc, EngineError):
        status, kind, retry = _STATUS.get(type(exc), (500, "server_error", None))
        headers = {"Retry-After": retry} if retry else {}
        return ErrorInfo(status, str(exc), kind, exc.param, exc.code, headers)
    return ErrorInfo(
        500, f"Internal error ({type(exc).__name__}).", "server_error", None, "internal_error"
    )
