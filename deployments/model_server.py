"""The replica: owns one engine, admits requests with `@serve.batch`, streams events back.

A plain class; `app.py` turns it into a Serve deployment with the config's resources. Requests that
arrive together are admitted as one batch (their prompts prefilled back to back before the next
decode step); from then on the engine batches continuously.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import psutil
import ray
from ray import serve

from deployments.config import ModelConfig
from deployments.engine import Engine, EngineConfig, GenerationRequest, RequestStream, StreamEvent
from deployments.errors import ApiError
from deployments.logging_setup import configure_logging
from deployments.metrics import ReplicaMetrics
from deployments.model_source import resolve_model_dir
from deployments.prompts import chat_prompt_ids, completion_prompt_ids
from deployments.sampling import SamplingParams

log = logging.getLogger("awq_serve.replica")


class ModelServer:
    def __init__(self, config: ModelConfig, variant: str | None = None) -> None:
        configure_logging()  # LOG_LEVEL from the environment the replica inherits
        self.config = config
        self.variant = variant or config.name
        model_dir, self.model_ref = resolve_model_dir(config.source, config.registry, config.verify)
        started = time.perf_counter()
        self.metrics = ReplicaMetrics(config.name, self.variant)
        self.engine = Engine(
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
            ),
            on_step=self._on_step,
        )
        self.engine.start()
        self.metrics.load_seconds = time.perf_counter() - started
        engine = self.engine
        self.metrics.start_sampling(lambda: (engine.stats, resident_memory_mb() * 1e6))
        self._apply_batching(config.batching.max_batch_size, config.batching.batch_wait_timeout_s)
        log.info("replica ready: %s on %s", self.model_ref, self.engine.device)

    def _on_step(self, batch_size: int, seconds: float) -> None:
        self.metrics.observe_step(batch_size, seconds)

    def _apply_batching(self, max_batch_size: int, wait_s: float) -> None:
        self._admit.set_max_batch_size(max_batch_size)
        self._admit.set_batch_wait_timeout_s(wait_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live changes from `user_config`: batching sizes, no restart."""
        batching = user_config.get("batching", {})
        if batching:
            merged = self.config.batching.model_copy(update=batching)
            self._apply_batching(merged.max_batch_size, merged.batch_wait_timeout_s)
            self.engine.set_limits(
                merged.max_running, merged.max_prefill_tokens, merged.stream_interval
            )

    def check_health(self) -> None:
        if not self.engine.healthy:
            raise RuntimeError(f"engine is not healthy: {self.engine.fatal_error!r}")

    def _request(self, body: dict[str, Any]) -> GenerationRequest:
        tok = self.engine.tokenizer
        if body["kind"] == "chat":
            ids = chat_prompt_ids(tok, body["messages"])
        else:
            ids = completion_prompt_ids(tok, body["prompt"])
        return GenerationRequest(body["request_id"], ids, SamplingParams(**body["params"]))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _admit(self, bodies: list[dict[str, Any]]) -> list[RequestStream | ApiError]:
        """Admit a batch of concurrent requests into the engine together."""
        admitted: list[RequestStream | ApiError] = []
        for body in bodies:
            try:
                stream = RequestStream(body["request_id"])
                self.engine.submit(self._request(body), stream)
                admitted.append(stream)
            except ApiError as e:
                admitted.append(e)
        return admitted

    async def generate(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream a request's events as dicts; the first event is an error or `accepted`."""
        admitted = await self._admit(body)
        if isinstance(admitted, ApiError):
            yield {"error": error_dict(admitted)}
            return
        yield {"accepted": True, "variant": self.variant}
        log.debug("admitted", extra={"request_id": body["request_id"]})
        finished = False
        try:
            async for event in admitted:
                finished = event.finish_reason is not None
                if finished:
                    log.info("generation finished", extra=finish_fields(body, event))
                yield event_dict(event)
        finally:
            if not finished:  # client went away: free the sequence's slot
                self.engine.cancel(body["request_id"])

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
            "hardware": self.engine.hardware,
            # Which Ray node holds this replica: shows spread placement and what a node loss takes.
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def __del__(self) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.stop_sampling()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(drain_timeout_s=float(os.environ.get("AWQ_SERVE_DRAIN_S", "30")))


def resident_memory_mb() -> float:
    return psutil.Process().memory_info().rss / 1e6


def finish_fields(body: dict[str, Any], event: StreamEvent) -> dict[str, Any]:
    """A finished generation's log fields, keyed by the router's request id."""
    return {
        "request_id": body["request_id"],
        "finish_reason": event.finish_reason,
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "queue_s": None if event.queue_s is None else round(event.queue_s, 4),
        "ttft_s": None if event.ttft_s is None else round(event.ttft_s, 4),
    }


def error_dict(e: ApiError) -> dict[str, Any]:
    return {"status": e.status, "headers": e.headers, **e.body()["error"]}


def event_dict(event: StreamEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"text": event.text}
    if event.finish_reason is not None:
        out.update(
            finish_reason=event.finish_reason,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            queue_s=event.queue_s,
            ttft_s=event.ttft_s,
            memory_mb=resident_memory_mb(),
        )
        if event.error is not None:
            out["error"] = error_dict(event.error)
    return out
