"""An engine without a model that keeps the `InferenceEngine` promises, for the model server's
fast tests: words are tokens, the answer is the prompt's words in reverse, one word per step.

What it keeps from the real engine: `submit` raises the same domain errors (empty prompt, context
too long, full queue, not accepting) and queues nothing then; every stream ends with exactly one
`Finished` or `Failed`; `cancel` ends a stream with `Finished("cancelled")`; `drain` stops
admission and waits for in-flight requests; `max_tokens` and stop strings end a generation.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from deployments.engine.interface import EngineStats
from deployments.errors import (
    ContextLengthExceeded,
    EngineOverloaded,
    EngineUnavailable,
    InvalidPrompt,
)
from deployments.protocol import Delta, Failed, Finished, GenerateRequest, Timings, Usage

# A completion prompt with this word raises an unexpected error inside `submit` (a tokenizer bug).
CRASH_WORD = "__crash__"


@dataclass
class FakeStream:
    request_id: str
    queue: asyncio.Queue[Delta | Finished | Failed] = field(default_factory=asyncio.Queue)
    done: bool = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Delta | Finished | Failed:
        if self.done:
            raise StopAsyncIteration
        event = await self.queue.get()
        self.done = not isinstance(event, Delta)
        return event


class FakeEngine:
    device = "cpu"

    def __init__(self, max_model_len: int = 64, max_waiting: int = 4, step_s: float = 0.005):
        self.max_model_len = max_model_len
        self.hardware: dict[str, Any] = {"kernel_paths": {"linear": "fake"}}
        self.max_waiting = max_waiting
        self.step_s = step_s
        self.stats = EngineStats(max_running=8)
        self.cancelled: list[str] = []
        self.limits: tuple[int | None, int | None, int | None] | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._draining = False
        self._alive = False

    def start(self) -> None:
        self._alive = True

    @property
    def healthy(self) -> bool:
        return self._alive

    def kill(self) -> None:
        """What a crashed engine thread looks like from outside."""
        self._alive = False

    def open_stream(self, request_id: str) -> FakeStream:
        return FakeStream(request_id)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return [hash(w) % 1000 for m in messages for w in m["content"].split()]

    def _words(self, request: GenerateRequest) -> list[str]:
        if request.kind == "chat":
            return [w for m in request.messages for w in m.content.split()]
        if CRASH_WORD in request.prompt.split():
            raise RuntimeError("tokenizer exploded")
        return request.prompt.split()

    def submit(self, request: GenerateRequest, stream: Any) -> None:
        if not self.healthy or self._draining:
            raise EngineUnavailable("The engine is not accepting requests (stopping or failed).")
        words = self._words(request)
        if not words:
            raise InvalidPrompt("The prompt is empty.", param="prompt", code="empty_prompt")
        if len(words) + request.params.max_tokens > self.max_model_len:
            raise ContextLengthExceeded(len(words), request.params.max_tokens, self.max_model_len)
        if len(self._tasks) >= self.max_waiting:
            raise EngineOverloaded("The engine's queue is full; retry shortly.")
        task = asyncio.get_running_loop().create_task(self._run(request, words, stream))
        self._tasks[request.request_id] = task
        self.stats.running = len(self._tasks)

    async def _run(self, request: GenerateRequest, words: list[str], stream: FakeStream) -> None:
        arrived = time.monotonic()
        params, out = request.params, ""
        answer = list(reversed(words))
        n = 0
        try:
            for n, word in enumerate(answer[: params.max_tokens], start=1):
                await asyncio.sleep(self.step_s)
                piece = (" " if out else "") + word
                out += piece
                self.stats.steps += 1
                self.stats.generated_tokens += 1
                if any(s in out for s in params.stop):
                    stream.queue.put_nowait(self._finished("stop", words, n, arrived))
                    return
                stream.queue.put_nowait(Delta(piece))
            reason = "length" if len(answer) >= params.max_tokens else "stop"
            stream.queue.put_nowait(self._finished(reason, words, n, arrived))
        except asyncio.CancelledError:
            stream.queue.put_nowait(self._finished("cancelled", words, n, arrived))
        finally:
            self._tasks.pop(request.request_id, None)
            self.stats.running = len(self._tasks)

    @staticmethod
    def _finished(reason: str, words: list[str], n: int, arrived: float) -> Finished:
        return Finished(
            reason,  # type: ignore[arg-type]
            Usage(len(words), n),
            Timings(queue_s=0.0, ttft_s=time.monotonic() - arrived),
        )

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    def drain(self, timeout_s: float) -> bool:
        """Blocks like the real engine's (the server calls it from a worker thread)."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self._tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._tasks

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        self._draining = True
        self._alive = False

    def set_limits(
        self,
        max_running: int | None = None,
        max_prefill_tokens: int | None = None,
        stream_interval: int | None = None,
    ) -> None:
        self.limits = (max_running, max_prefill_tokens, stream_interval)
