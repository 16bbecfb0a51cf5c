"""What the model server needs from an engine: the contract, without torch.

`deployments.engine.scheduler.Engine` implements it on a real model; tests use a small fake that
keeps the same promises (events end with `Finished` or `Failed`, `cancel` ends a stream, domain
errors from `submit`), so the server logic is tested without loading a model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.protocol import Delta, Failed, Finished, GenerateRequest


@dataclass
class EngineStats:
    """What an engine reports for /health and the replica's gauges."""

    running: int = 0
    waiting: int = 0
    kv_cache_bytes: int = 0
    max_running: int = 0
    steps: int = 0
    last_batch_size: int = 0
    generated_tokens: int = 0
    oom_events: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # of which reused


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
    def stats(self) -> EngineStats: ...
