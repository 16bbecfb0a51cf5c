"""What the model server needs from an engine: the contract, without torch.

`deployments.engine.Engine` implements it on a real model; tests use a small fake that keeps the
same promises (events end with `Finished` or `Failed`, `cancel` ends a stream, domain errors from
`submit`), so the server logic is tested without loading a model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from deployments.protocol import Delta, Failed, Finished, GenerateRequest


class EventStream(Protocol):
    """A request's events as an async iterator; the last is `Finished` or `Failed`."""

    def __aiter__(self) -> AsyncIterator[Delta | Finished | Failed]: ...


class InferenceEngine(Protocol):
    device: Any  # where the model runs (a torch.device on the real engine)
    max_model_len: int
    hardware: dict[str, Any]  # CPU features and kernel paths, for /health

    def start(self) -> None: ...

    def open_stream(self, request_id: str) -> EventStream:
        """A stream bound to the caller's event loop, to pass to `submit`."""

    def submit(self, request: GenerateRequest, stream: Any) -> None:
        """Queue a request; raises a `deployments.errors.EngineError` if it cannot run."""

    def cancel(self, request_id: str) -> None: ...

    def drain(self, timeout_s: float) -> bool:
        """Stop admitting, wait for in-flight requests; True if all finished in time."""

    def shutdown(self, drain_timeout_s: float = 30.0) -> None: ...

    def set_limits(
        self,
        max_running: int | None = None,
        max_prefill_tokens: int | None = None,
        stream_interval: int | None = None,
    ) -> None: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def stats(self) -> Any:
        """running, waiting, kv_cache_bytes, steps, ... (see `EngineStats`)."""
