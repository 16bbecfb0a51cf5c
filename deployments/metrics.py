"""Every metric, declared once. Labels come from closed sets: model, variant, status class.

Router metrics use prometheus-client and are served on the router's `/metrics`. Replica metrics use
`ray.util.metrics`, which Ray exports on each node's metrics port (Prometheus format), because a
replica has no HTTP endpoint of its own.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 64)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class RouterMetrics:
    """Request-level metrics, measured where the client sees them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        labels = ("model", "variant", "status")
        self.requests = Counter(
            "inference_requests", "Requests by model, variant and status class", labels, registry=r
        )
        self.latency = Histogram(
            "inference_latency_seconds",
            "End-to-end request latency",
            ("model", "variant"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "awq_serve_time_to_first_token_seconds",
            "Arrival to first token",
            ("model", "variant"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "awq_serve_time_per_output_token_seconds",
            "Mean time per output token after the first",
            ("model", "variant"),
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "awq_serve_queue_time_seconds",
            "Arrival to start of prefill",
            ("model", "variant"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "awq_serve_prompt_tokens", "Prompt tokens processed", ("model", "variant"), registry=r
        )
        self.generated_tokens = Counter(
            "awq_serve_generation_tokens",
            "Output tokens generated",
            ("model", "variant"),
            registry=r,
        )
        self.in_flight = Gauge(
            "awq_serve_requests_in_flight", "Requests inside the router", ("model",), registry=r
        )
        self.cost_per_million = Gauge(
            "awq_serve_cost_per_1m_output_tokens_dollars",
            "GPU $/hour divided by measured output tokens/hour, per 1M tokens",
            ("model",),
            registry=r,
        )

    def observe(
        self, model: str, variant: str, status: int, latency_s: float, result: dict[str, Any] | None
    ) -> None:
        self.requests.labels(model, variant, status_class(status)).inc()
        if status >= 400 or result is None:
            return
        self.latency.labels(model, variant).observe(latency_s)
        n_out = result.get("completion_tokens", 0)
        self.prompt_tokens.labels(model, variant).inc(result.get("prompt_tokens", 0))
        self.generated_tokens.labels(model, variant).inc(n_out)
        if result.get("ttft_s") is not None:
            self.ttft.labels(model, variant).observe(result["ttft_s"])
            if n_out > 1:
                self.tpot.labels(model, variant).observe(
                    (latency_s - result["ttft_s"]) / (n_out - 1)
                )
        if result.get("queue_s") is not None:
            self.queue_time.labels(model, variant).observe(result["queue_s"])

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ReplicaMetrics:
    """Engine-level metrics from inside a replica, exported by Ray."""

    def __init__(self, model: str, variant: str) -> None:
        from ray.util import metrics as ray_metrics

        tags = {"model": model, "variant": variant}
        keys = tuple(tags)
        self.batch_size = ray_metrics.Histogram(
            "awq_serve_batch_size",
            "Sequences per decode step",
            boundaries=list(BATCH_BUCKETS),
            tag_keys=keys,
        )
        self.step_seconds = ray_metrics.Histogram(
            "awq_serve_decode_step_seconds",
            "Wall time of one decode step",
            boundaries=list(TOKEN_LATENCY_BUCKETS),
            tag_keys=keys,
        )
        self.running = ray_metrics.Gauge("awq_serve_running_requests", "Decoding now", keys)
        self.waiting = ray_metrics.Gauge("awq_serve_waiting_requests", "Queued in engine", keys)
        self.kv_bytes = ray_metrics.Gauge("awq_serve_kv_cache_bytes", "KV cache in use", keys)
        self.memory = ray_metrics.Gauge("awq_serve_replica_memory_bytes", "Replica RSS", keys)
        self.model_load_seconds = ray_metrics.Gauge(
            "awq_serve_model_load_seconds", "Load + warm-up time", keys
        )
        for m in (
            self.batch_size,
            self.step_seconds,
            self.running,
            self.waiting,
            self.kv_bytes,
            self.memory,
            self.model_load_seconds,
        ):
            m.set_default_tags(tags)

    def observe_step(self, batch_size: int, seconds: float, stats: Any) -> None:
        self.batch_size.observe(batch_size)
        self.step_seconds.observe(seconds)
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_bytes.set(stats.kv_cache_bytes)
