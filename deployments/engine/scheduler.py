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
from dataclasses import dataclass
from pathlib import Path

import torch

from deployments.engine.hardware import cpu_features, kernel_paths
from deployments.engine.interface import EngineStats
from deployments.engine.model_runner import ModelRunner, load_model
from deployments.engine.prompts import chat_prompt_ids, completion_prompt_ids
from deployments.engine.sampling import make_generator, sample_next
from deployments.engine.text_stream import TextStream
from deployments.errors import (
    ContextLengthExceeded,
    EngineOverloaded,
    EngineUnavailable,
    InvalidPrompt,
    OutOfMemory,
    RequestFailed,
    error_info,
)
from deployments.protocol import (
    Delta,
    Failed,
    Finished,
    GenerateRequest,
    SamplingParams,
    Timings,
    Usage,
)
from quantization.compute import pick_device

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
    # How a decode step runs (ModelRunner `decode_step`): auto = a captured CUDA graph on CUDA,
    # the native C++ step on CPU (eager where it cannot run); `compile` (torch.compile, CPU or
    # CUDA) compiles for ~70 s per batch bucket and key layout on 2 cores, so it is opt-in.
    decode_step: str = "auto"


EngineEvent = Delta | Finished | Failed


class RequestStream:
    """Async iterator of a request's events, fed from the engine thread; ends after the
    `Finished` or `Failed` event."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request_id = request_id
        self._loop = loop or asyncio.get_running_loop()
        self._queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._done = False

    def push(self, event: EngineEvent) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> EngineEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        self._done = not isinstance(event, Delta)
        return event


@dataclass
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    text: TextStream
    generator: torch.Generator | None
    arrived: float
    started: float | None = None
    first_token: float | None = None

    @property
    def generated(self) -> list[int]:
        return self.text.tokens


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
        self._draining = False
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
            decode_step=cfg.decode_step,
        )
        self.max_model_len = self.runner.max_len
        self.hardware = {
            "device": str(self.device),
            "cpu": cpu_features(),
            "kernels": kernel_paths(
                self.model,
                self.runner.lm_head_path,
                cfg.batch_invariant,
                self.runner.step_mode,
                self.runner.int4_kernel,
            ),
            "decode_step": self.runner.step_mode,
            **({"native_unavailable": r} if (r := self.runner.native_unavailable) else {}),
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
    def open_stream(self, request_id: str) -> RequestStream:
        return RequestStream(request_id)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def encode(self, request: GenerateRequest) -> list[int]:
        """The request's prompt as token ids; a template or tokenizer failure is this request's
        fault (a 400), never the engine's."""
        try:
            if request.kind == "chat":
                messages = [{"role": m.role, "content": m.content} for m in request.messages]
                return self.encode_chat(messages)
            return completion_prompt_ids(self.tokenizer, request.prompt)
        except InvalidPrompt:
            raise
        except Exception as e:
            raise InvalidPrompt(f"The prompt could not be tokenized: {type(e).__name__}.") from e

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Reject what can never run: too long for the context, or an empty prompt."""
        n = len(prompt_ids)
        if n == 0:
            raise InvalidPrompt("The prompt is empty.", param="prompt", code="empty_prompt")
        if n + params.max_tokens > self.max_model_len:
            raise ContextLengthExceeded(n, params.max_tokens, self.max_model_len)

    def submit(self, request: GenerateRequest, stream: RequestStream) -> None:
        """Queue a request; its events arrive on `stream`. Raises the domain error that keeps
        it from running (nothing is queued then)."""
        if not self.healthy or self._draining:
            raise EngineUnavailable("The engine is not accepting requests (stopping or failed).")
        self.enqueue(request.request_id, self.encode(request), request.params, stream)

    def enqueue(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, stream: RequestStream
    ) -> None:
        """`submit` for a prompt that is already token ids (benchmarks, tests)."""
        if not self.healthy or self._draining:
            raise EngineUnavailable("The engine is not accepting requests (stopping or failed).")
        self.check(prompt_ids, params)
        seq = _Sequence(
            request_id,
            prompt_ids,
            params,
            stream,
            TextStream(self._decode_text, params.stop),
            make_generator(params.seed),
            time.monotonic(),
        )
        with self._cond:
            if len(self._waiting) >= self.config.max_waiting:
                raise EngineOverloaded("The engine's queue is full; retry shortly.")
            self._waiting.append(seq)
            self._cond.notify()

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    def drain(self, timeout_s: float) -> bool:
        """Stop admitting new requests and wait for in-flight ones; True if all finished."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self._running or self._waiting:
            if time.monotonic() >= deadline or not self.healthy:
                return False
            time.sleep(0.05)
        return True

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
            err = EngineUnavailable("The inference engine failed; retry.")
            for seq in [*self._running, *self._waiting]:
                seq.stream.push(self._failed(seq, err))
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
        except Exception as e:  # a forward that broke: its batch fails, the engine goes on
            log.exception("step failed; failing its %d sequences", len(self._running))
            failure = RequestFailed(f"The model failed on this batch: {type(e).__name__}.")
            self._fail_running(failure)
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
            for seq in [s for s in self._waiting if s.request_id in cancelled]:
                self._waiting.remove(seq)
                seq.stream.push(self._finished(seq, "cancelled"))
        gone = [i for i, s in enumerate(self._running) if s.request_id in cancelled]
        for i in reversed(gone):
            self._running[i].stream.push(self._finished(self._running[i], "cancelled"))
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
        logits = self.runner.prefill(first, [s.prompt_ids for s in group])
        self._advance_rows(first, logits)

    def _next_prefill_group(self) -> list[_Sequence]:
        group: list[_Sequence] = []
        tokens = 0
        with self._cond:
            while self._waiting and len(self._running) + len(group) < self.max_running:
                tokens += len(self._waiting[0].prompt_ids)
                if group and tokens > self.max_prefill_tokens:
                    break
                group.append(self._waiting.popleft())
        return group

    def _decode(self) -> None:
        perm = self.runner.order_slots(len(self._running))
        if perm is not None:
            self._running = [self._running[j] for j in perm]
        tokens = [s.generated[-1] for s in self._running]
        logits = self.runner.decode(tokens)  # (n, vocab)
        self.stats.steps += 1
        self.stats.last_batch_size = len(tokens)
        self._advance_rows(0, logits)

    def _advance_rows(self, first: int, logits: torch.Tensor) -> None:
        """Sample a token for running sequences first.. (one logits row each) and advance them;
        finished or failed ones leave."""
        seqs = self._running[first : first + logits.shape[0]]
        done = []
        for i, (seq, token) in enumerate(zip(seqs, self._sample(logits, seqs), strict=True)):
            try:
                finished = token is None or self._advance(seq, token)
            except Exception as e:  # this request's text pipeline broke: it alone fails
                log.exception("request %s failed", seq.request_id)
                seq.stream.push(self._failed(seq, RequestFailed(f"Generation failed: {e!r}"[:200])))
                finished = True
            if finished:
                done.append(first + i)
        for i in reversed(done):
            self._release(i)

    def _sample(self, logits: torch.Tensor, seqs: list[_Sequence]) -> list[int | None]:
        """Batched sampling; if the batch fails, row by row, so one bad row fails alone (None)."""
        try:
            return list(sample_next(logits, [s.params for s in seqs], [s.generator for s in seqs]))
        except Exception:
            log.exception("batched sampling failed; sampling row by row")
        out: list[int | None] = []
        for row, seq in zip(logits, seqs, strict=True):
            try:
                out.append(sample_next(row.unsqueeze(0), [seq.params], [seq.generator])[0])
            except Exception as e:
                seq.stream.push(self._failed(seq, RequestFailed(f"Sampling failed: {e!r}"[:200])))
                out.append(None)
        return out

    def _advance(self, seq: _Sequence, token: int) -> bool:
        """Append a token, stream the new text; True when the sequence is finished."""
        if seq.first_token is None:
            seq.first_token = time.monotonic()
        p = seq.params
        is_eos = token in self.eos_ids and not p.ignore_eos
        # EOS counts as a generated token (as in vLLM's usage); it decodes to no text.
        stopped = seq.text.add(token)
        self.stats.generated_tokens += 1
        length = len(seq.generated) >= p.max_tokens
        if is_eos or stopped or length:
            reason = "length" if length and not (is_eos or stopped) else "stop"
            seq.stream.push(self._finished(seq, reason, text=seq.text.rest(stopped)))
            return True
        piece = seq.text.ready(self.stream_interval)
        if piece:
            seq.stream.push(Delta(piece))
        return False

    def _usage(self, seq: _Sequence) -> Usage:
        return Usage(len(seq.prompt_ids), len(seq.generated))

    def _finished(self, seq: _Sequence, reason: str, text: str = "") -> Finished:
        timings = Timings(
            queue_s=(seq.started - seq.arrived) if seq.started else None,
            ttft_s=(seq.first_token - seq.arrived) if seq.first_token else None,
        )
        return Finished(reason, self._usage(seq), timings, text)  # type: ignore[arg-type]

    def _failed(self, seq: _Sequence, error: Exception) -> Failed:
        return Failed(error_info(error), self._usage(seq))

    def _release(self, index: int) -> None:
        """Free a running sequence's slot, moving the last sequence down to keep 0..n-1 dense."""
        last = len(self._running) - 1
        if index != last:
            self.runner.move(last, index)
            self._running[index] = self._running[last]
        else:
            self.runner.release(index)
        self._running.pop()

    def _fail_running(self, error: Exception) -> None:
        for seq in self._running:
            seq.stream.push(self._failed(seq, error))
        self._running.clear()
        self.runner.reset()

    def _recover_from_oom(self, e: BaseException) -> None:
        """Fail the running batch with a clear error, halve the batch cap, keep serving."""
        self.stats.oom_events += 1
        self._fail_running(OutOfMemory("Out of memory while running this batch; retry."))
        self.set_limits(max_running=max(1, self.max_running // 2))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory (%s); max_running is now %d", e, self.max_running)
