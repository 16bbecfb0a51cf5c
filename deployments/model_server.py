"""The replica: owns one engine, admits requests with `@serve.batch`, streams events back.

A plain class; `app.py` turns it into a Serve deployment with the config's resources. Requests that
arrive together are admitted as one batch (their prompts prefilled back to back before the next
decode step); from then on the engine batches continuously. It speaks `deployments.protocol` on
both sides: `GenerateRequest` in, `Accepted`/`Delta`/`Finished`/`Failed` out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil
import ray
from ray import serve

from deployments.config import ModelConfig
from deployments.engine.interface import EventStream, InferenceEngine
from deployments.errors import EngineError, error_info
from deployments.logging_setup import configure_logging
from deployments.metrics import ReplicaMetrics
from deployments.model_source import resolve_model_dir
from deployments.protocol import Accepted, Delta, Event, Failed, Finished, GenerateRequest

log = logging.getLogger("awq_serve.replica")

# How long a stopping replica lets its in-flight streams run: Serve's `graceful_shutdown_timeout_s`
# for downscale and redeploy (app.py), and the wait of a drain (`graceful_run`) before shutdown.
# Read at import in every process of the app; Ray workers inherit the environment of `serve run`.
DRAIN_TIMEOUT_S = float(os.environ.get("AWQ_SERVE_DRAIN_S", "30"))

EngineFactory = Callable[[ModelConfig, Any, Callable[[int, float], None]], InferenceEngine]


def build_engine(
    config: ModelConfig, model_dir: Any, on_step: Callable[[int, float], None]
) -> InferenceEngine:
    """The real engine on the model folder (imported here: it loads torch)."""
    from deployments.engine.scheduler import Engine, EngineConfig

    return Engine(
        EngineConfig(
            model_dir=model_dir,
            device=config.device,
            max_running=config.batching.max_running,
            max_model_len=config.max_model_len,
            max_prefill_tokens=config.batching.max_prefill_tokens,
            stream_interval=config.batching.stream_interval,
            cpu_threads=max(1, int(config.num_cpus)),
            lm_head_dtype=config.lm_head_dtype,
            prefix_cache_mb=config.prefix_cache_mb,
            batch_invariant=config.batch_invariant,
            decode_step=config.decode_step,
        ),
        on_step=on_step,
    )


class ModelServer:
    def __init__(
        self,
        config: ModelConfig,
        variant: str | None = None,
        engine_factory: EngineFactory = build_engine,
    ) -> None:
        self._closed = False
        configure_logging()  # LOG_LEVEL from the environment the replica inherits
        self.config = config
        self.variant = variant or config.name
        model_dir, self.model_ref = resolve_model_dir(config.source, config.registry, config.verify)
        started = time.perf_counter()
        self.metrics = ReplicaMetrics(config.name, self.variant)
        self.engine = engine_factory(config, model_dir, self.metrics.observe_step)
        self.engine.start()
        self.metrics.load_seconds = time.perf_counter() - started
        engine = self.engine
        self.metrics.start_sampling(lambda: (engine.stats, resident_memory_mb() * 1e6))
        self._apply_batching(config.batching.max_batch_size, config.batching.batch_wait_timeout_s)
        log.info("replica ready: %s on %s", self.model_ref, self.engine.device)

    def _apply_batching(self, max_batch_size: int, wait_s: float) -> None:
        self._admit.set_max_batch_size(max_batch_size)
        self._admit.set_batch_wait_timeout_s(wait_s)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live changes from `user_config`, no restart: batching sizes, and `draining: true`
        (sent by `graceful_run` before shutdown) that stops admitting and returns once this
        replica's streams are done, so Serve reports the update only when every replica drained."""
        batching = user_config.get("batching", {})
        if batching:
            merged = self.config.batching.model_copy(update=batching)
            self._apply_batching(merged.max_batch_size, merged.batch_wait_timeout_s)
            self.engine.set_limits(
                merged.max_running, merged.max_prefill_tokens, merged.stream_interval
            )
        if user_config.get("draining"):
            await self.drain()

    async def drain(self) -> bool:
        """Refuse new requests (503 with Retry-After) and wait for in-flight ones, up to
        DRAIN_TIMEOUT_S; True if all finished. Off the event loop: streams keep flowing."""
        drained = await asyncio.to_thread(self.engine.drain, DRAIN_TIMEOUT_S)
        log.info("replica drained" if drained else "drain timed out with requests in flight")
        return drained

    def check_health(self) -> None:
        if not self.engine.healthy:
            raise RuntimeError("engine is not healthy")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _admit(self, requests: list[GenerateRequest]) -> list[EventStream | Failed]:
        """Admit a batch of concurrent requests into the engine together; one that cannot run
        fails alone."""
        admitted: list[EventStream | Failed] = []
        for request in requests:
            try:
                stream = self.engine.open_stream(request.request_id)
                self.engine.submit(request, stream)
                admitted.append(stream)
            except Exception as e:  # domain errors and anything unexpected: this request only
                if not isinstance(e, EngineError):
                    log.exception("admitting %s failed", request.request_id)
                admitted.append(Failed(error_info(e)))
        return admitted

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        """Stream a request's events; the first is `Accepted` or `Failed`."""
        admitted = await self._admit(request)
        if isinstance(admitted, Failed):
            yield admitted
            return
        yield Accepted(self.variant)
        log.debug("admitted", extra={"request_id": request.trace_id or request.request_id})
        finished = False
        try:
            async for event in admitted:
                finished = not isinstance(event, Delta)
                if isinstance(event, Finished):
                    event = dataclasses.replace(event, memory_mb=resident_memory_mb())
                    log.info("generation finished", extra=finish_fields(request, event))
                yield event
        finally:
            if not finished:  # client went away: free the sequence's slot
                self.engine.cancel(request.request_id)

    def info(self) -> dict[str, Any]:
        stats = self.engine.stats
        return {
            "model": self.config.name,
            "variant": self.variant,
            "source": self.model_ref,
            "device": str(self.engine.device),
            "max_model_len": self.engine.max_model_len,
            "running": stats.running,
            "waiting": stats.waiting,
            "healthy": self.engine.healthy,
            "memory_mb": resident_memory_mb(),
            "pid": os.getpid(),
            "hardware": self.engine.hardware,
            # Which Ray node holds this replica: shows spread placement and what a node loss takes.
            "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None,
        }

    def close(self) -> None:
        """Stop the gauge sampler and the engine; safe to call twice. Serve reaches it through
        `__del__`; a process that builds servers itself (a test) calls it, since `@serve.batch`
        keeps the server alive and its sampler would go on writing Ray metrics for as long as
        the process lives, into whatever Ray session it joins next."""
        if getattr(self, "_closed", True):  # closed already, or __init__ never began
            return
        self._closed = True
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.stop_sampling()
        engine = getattr(self, "engine", None)
        if engine is not None:
            # Serve calls this once the replica's ongoing requests are done (or its graceful
            # timeout passed), so the engine has little or nothing left to finish.
            engine.shutdown(drain_timeout_s=DRAIN_TIMEOUT_S)

    def __del__(self) -> None:
        self.close()


def resident_memory_mb() -> float:
    return psutil.Process().memory_info().rss / 1e6


def finish_fields(request: GenerateRequest, event: Finished) -> dict[str, Any]:
    """A finished generation's log fields, keyed by the server's request id."""
    t = event.timings
    return {
        "request_id": request.trace_id or request.request_id,
        "finish_reason": event.reason,
        "prompt_tokens": event.usage.prompt_tokens,
        "completion_tokens": event.usage.completion_tokens,
        "queue_s": None if t.queue_s is None else round(t.queue_s, 4),
        "ttft_s": None if t.ttft_s is None else round(t.ttft_s, 4),
    }
