"""The inference engine: continuous batching over a slot KV cache, streaming, cancellation.

One background thread runs the scheduler: between decode steps it admits waiting requests (prefill,
bounded by a token budget so running streams keep flowing), then decodes one token for every
running sequence at once; a finished or cancelled sequence leaves at once. Callers on an asyncio
loop get a `RequestStream` per request. No Ray here: the ModelServer deployment wraps this.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deployments.errors import ApiError, ContextLengthError, OverloadedError
from deployments.hardware import cpu_features, kernel_paths
from deployments.model_runner import ModelRunner, load_model, pick_device
from deployments.sampling import SamplingParams, StopChecker, make_generator, sample_next

log = logging.getLogger("awq_serve.engine")

WARMUP_TEXT = "Hello, how are you today?"


@dataclass(frozen=True)
class EngineConfig:
    model_dir: Path
    device: str = "auto"
    max_running: int = 16
    max_model_len: int = 2048
    max_prefill_tokens: int = 512
    max_waiting: int = 256
    cpu_threads: int | None = None
    # Tokens per stream event after the first (vLLM's `stream_interval`): each event crosses two
    # Ray hops and an SSE write, so on a small host fewer, larger events leave the CPU to decoding.
    stream_interval: int = 1
    lm_head_dtype: str = "auto"
    prefix_cache_mb: float = 256.0
    # A greedy answer independent of batch-mates (fixed-shape attention and dense matmul calls).
    batch_invariant: bool = True


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class StreamEvent:
    """A piece of output. The last event of a stream has `finish_reason` set."""

    text: str = ""
    finish_reason: str | None = None  # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_s: float | None = None
    ttft_s: float | None = None
    error: ApiError | None = None


class RequestStream:
    """Async iterator of a request's events, fed from the engine thread."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request_id = request_id
        self._loop = loop or asyncio.get_running_loop()
        self._queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._done = False

    def push(self, event: StreamEvent) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        self._done = event.finish_reason is not None
        return event


@dataclass
class _Sequence:
    request: GenerationRequest
    stream: RequestStream
    stop: StopChecker
    generator: torch.Generator | None
    arrived: float
    generated: list[int] = field(default_factory=list)
    unsent: str = ""  # text decoded but not yet pushed (stream_interval > 1)
    unsent_tokens: int = 0
    started: float | None = None
    first_token: float | None = None


@dataclass
class EngineStats:
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


class Engine:
    """Owns a model and its scheduler thread; `start()` returns once the model serves.

    Every torch call (load, warm-up, prefill, decode) runs on the engine thread: OpenMP keeps one
    thread team per calling thread, and a second team left by another thread made each decode
    step ~25% slower on 2 cores (measured: 99 vs 78 ms at batch 16).
    """

    def __init__(
        self, config: EngineConfig, on_step: Callable[[int, float], None] | None = None
    ) -> None:
        self.config = config
        self.device = pick_device(config.device)
        self.max_running = config.max_running
        self.max_prefill_tokens = config.max_prefill_tokens
        self.stream_interval = config.stream_interval
        self._on_step = on_step
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._cancelled: set[str] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.fatal_error: BaseException | None = None
        self.stats = EngineStats(max_running=self.max_running)

    def _load(self) -> None:
        if self.config.cpu_threads:
            torch.set_num_threads(self.config.cpu_threads)
        self.model, self.tokenizer = load_model(self.config.model_dir, self.device)
        cfg = self.config
        self.runner = ModelRunner(
            self.model,
            cfg.max_running,
            cfg.max_model_len,
            cfg.lm_head_dtype,
            prefix_cache_mb=cfg.prefix_cache_mb,
            batch_invariant=cfg.batch_invariant,
        )
        self.max_model_len = self.runner.max_len
        self.hardware = {
            "device": str(self.device),
            "cpu": cpu_features(),
            "kernels": kernel_paths(self.model, self.runner.lm_head_path, cfg.batch_invariant),
        }
        log.info("hardware and kernel paths: %s", self.hardware)
        self.eos_ids = self._eos_ids()
        self._warm_up()

    def _warm_up(self) -> None:
        """A prefill at the token budget over every slot, then a decode at the full batch, so
        neither the first burst of requests nor the first full batch pays first-call costs
        (allocator growth, page faults, kernel set-up). vLLM's profile run does the same."""
        slots = self.runner.slots
        per_slot = max(1, min(self.max_prefill_tokens // slots, self.max_model_len - 1))
        text = list(self.tokenizer.encode(WARMUP_TEXT))
        prompt = (text * per_slot)[:per_slot]
        logits = self.runner.prefill(0, [prompt] * slots)
        self.runner.decode(logits.argmax(-1).tolist())
        self.runner.reset(forget_prefixes=True)

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout_s: float = 600.0) -> None:
        """Load and warm up on the engine thread; raise its error if loading failed."""
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"engine did not load {self.config.model_dir} in {timeout_s}s")
        if self.fatal_error is not None:
            raise RuntimeError(f"engine failed to load: {self.fatal_error}") from self.fatal_error

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Finish in-flight requests (up to the timeout), then stop the loop."""
        deadline = time.monotonic() + drain_timeout_s
        while (self._running or self._waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread:
            self._thread.join(timeout=5)

    @property
    def healthy(self) -> bool:
        return self.fatal_error is None and self._thread is not None and self._thread.is_alive()

    def set_limits(
        self,
        max_running: int | None = None,
        max_prefill_tokens: int | None = None,
        stream_interval: int | None = None,
    ) -> None:
        with self._cond:
            if max_running:
                self.max_running = min(max_running, self.runner.slots)
            if max_prefill_tokens:
                self.max_prefill_tokens = max_prefill_tokens
            if stream_interval:
                self.stream_interval = stream_interval
            self.stats.max_running = self.max_running

    # ---- requests --------------------------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """Reject what can never run: too long for the context, or an empty prompt."""
        n = len(request.prompt_ids)
        if n == 0:
            raise ApiError(400, "The prompt is empty.", param="prompt", code="empty_prompt")
        if n + request.params.max_tokens > self.max_model_len:
            raise ContextLengthError(n, request.params.max_tokens, self.max_model_len)

    def submit(self, request: GenerationRequest, stream: RequestStream) -> None:
        self.check(request)
        if not self.healthy:
            raise ApiError(503, "The engine is not running.", type="server_error")
        seq = _Sequence(
            request,
            stream,
            StopChecker(request.params.stop),
            make_generator(request.params.seed),
            time.monotonic(),
        )
        with self._cond:
            if len(self._waiting) >= self.config.max_waiting:
                raise OverloadedError()
            self._waiting.append(seq)
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    # ---- scheduler -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._load()
        except BaseException as e:
            self.fatal_error = e
            return
        finally:
            self._ready.set()
        try:
            while True:
                with self._cond:
                    while not (self._waiting or self._running or self._stopping):
                        self._cond.wait()
                    if self._stopping:
                        return
                self._step()
        except BaseException as e:  # a broken engine must fail health checks, not hang clients
            log.exception("engine loop died")
            self.fatal_error = e
            err = ApiError(500, f"The inference engine failed: {e}", type="server_error")
            for seq in [*self._running, *self._waiting]:
                seq.stream.push(self._final(seq, "error", error=err))
            self._running.clear()
            self._waiting.clear()

    def _step(self) -> None:
        self._drop_cancelled()
        try:
            self._admit()
            if self._running:
                t0 = time.perf_counter()
                self._decode()
                if self._on_step:
                    self._on_step(self.stats.last_batch_size, time.perf_counter() - t0)
        except torch.OutOfMemoryError as e:
            self._recover_from_oom(e)
        self.stats.running = len(self._running)
        self.stats.waiting = len(self._waiting)
        self.stats.kv_cache_bytes = self.runner.cache.bytes_in_use()
        self.stats.prefix_cache_queries = self.runner.prefix_cache.stats.queries
        self.stats.prefix_cache_hits = self.runner.prefix_cache.stats.hits

    def _drop_cancelled(self) -> None:
        with self._cond:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return
            for seq in [s for s in self._waiting if s.request.request_id in cancelled]:
                self._waiting.remove(seq)
                seq.stream.push(self._final(seq, "cancelled"))
        gone = [i for i, s in enumerate(self._running) if s.request.request_id in cancelled]
        for i in reversed(gone):
            self._running[i].stream.push(self._final(self._running[i], "cancelled"))
            self._release(i)

    def _admit(self) -> None:
        """Prefill the next waiting requests as one packed row within the token budget.

        One packed forward costs far less than one per prompt (the int4 kernels are cheap per
        extra row), so a burst of arrivals gets its first tokens together instead of in turn.
        """
        group = self._next_prefill_group()
        if not group:
            return
        first = len(self._running)
        now = time.monotonic()
        for seq in group:
            seq.started = now
        self._running.extend(group)
        logits = self.runner.prefill(first, [s.request.prompt_ids for s in group])
        tokens = sample_next(
            logits, [s.request.params for s in group], [s.generator for s in group]
        )
        pairs = enumerate(zip(group, tokens, strict=True))
        finished = [first + i for i, (s, t) in pairs if self._advance(s, t)]
        for i in reversed(finished):
            self._release(i)

    def _next_prefill_group(self) -> list[_Sequence]:
        group: list[_Sequence] = []
        tokens = 0
        with self._cond:
            while self._waiting and len(self._running) + len(group) < self.max_running:
                tokens += len(self._waiting[0].request.prompt_ids)
                if group and tokens > self.max_prefill_tokens:
                    break
                group.append(self._waiting.popleft())
        return group

    def _decode(self) -> None:
        tokens = [s.generated[-1] for s in self._running]
        logits = self.runner.decode(tokens)  # (n, vocab)
        params = [s.request.params for s in self._running]
        nxt = sample_next(logits, params, [s.generator for s in self._running])
        self.stats.steps += 1
        self.stats.last_batch_size = len(tokens)
        finished = [
            i
            for i, (s, t) in enumerate(zip(self._running, nxt, strict=True))
            if self._advance(s, t)
        ]
        for i in reversed(finished):
            self._release(i)

    def _advance(self, seq: _Sequence, token: int) -> bool:
        """Append a token, stream the new text; True when the sequence is finished."""
        now = time.monotonic()
        if seq.first_token is None:
            seq.first_token = now
        p = seq.request.params
        is_eos = token in self.eos_ids and not p.ignore_eos
        # EOS counts as a generated token (as in vLLM's usage); it decodes to no text.
        seq.generated.append(token)
        self.stats.generated_tokens += 1
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        delta, stopped = seq.stop.feed(text)
        length = len(seq.generated) >= p.max_tokens
        if is_eos or stopped or length:
            reason = "length" if length and not (is_eos or stopped) else "stop"
            tail = "" if stopped else seq.stop.flush()
            seq.stream.push(self._final(seq, reason, text=seq.unsent + delta + tail))
            return True
        seq.unsent += delta
        seq.unsent_tokens += 1
        first = len(seq.generated) == 1
        if seq.unsent and (first or seq.unsent_tokens >= self.stream_interval):
            seq.stream.push(StreamEvent(text=seq.unsent))
            seq.unsent, seq.unsent_tokens = "", 0
        return False

    def _final(
        self, seq: _Sequence, reason: str, text: str = "", error: ApiError | None = None
    ) -> StreamEvent:
        return StreamEvent(
            text=text,
            finish_reason=reason,
            prompt_tokens=len(seq.request.prompt_ids),
            completion_tokens=len(seq.generated),
            queue_s=(seq.started - seq.arrived) if seq.started else None,
            ttft_s=(seq.first_token - seq.arrived) if seq.first_token else None,
            error=error,
        )

    def _release(self, index: int) -> None:
        """Free a running sequence's slot, moving the last sequence down to keep 0..n-1 dense."""
        last = len(self._running) - 1
        if index != last:
            self.runner.move(last, index)
            self._running[index] = self._running[last]
        else:
            self.runner.release(index)
        self._running.pop()

    def _recover_from_oom(self, e: BaseException) -> None:
        """Fail the running batch with a clear error, halve the batch cap, keep serving."""
        self.stats.oom_events += 1
        err = ApiError(
            503,
            "Out of memory while running this batch; retry.",
            type="server_overloaded",
            code="out_of_memory",
            headers={"Retry-After": "1"},
        )
        for seq in self._running:
            seq.stream.push(self._final(seq, "error", error=err))
        self._running.clear()
        self.runner.reset()
        self.set_limits(max_running=max(1, self.max_running // 2))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory (%s); max_running is now %d", e, self.max_running)
