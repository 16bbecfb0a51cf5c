"""Every metric, declared once. Labels come from closed sets: model, variant, status class.

Router metrics use prometheus-client and are served on the router's `/metrics`. Replica metrics use
`ray.util.metrics`, which Ray exports on each node's metrics export port (Prometheus format)
because a replica has no HTTP endpoint of its own. Ray renames them on export: `ray_` in front,
and counters get `_total`; `EXPORTED_REPLICA_METRICS` holds the names a Prometheus query uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from deployments.ops.cost import ThroughputWindow, cost_per_million_tokens, cost_per_request
from deployments.protocol import Finished

log = logging.getLogger("awq_serve.metrics")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 64)

# A requested name that is not served (a 404) is counted under this label, never as sent.
UNKNOWN_MODEL = "unknown"
NO_VARIANT = "-"
RAY_PREFIX = "ray_"  # what Ray's exporter puts before every custom metric name


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class RouterMetrics:
    """Request-level metrics, measured where the client sees them.

    `prices` maps each served model (variant) to its $/GPU-hour; `aliases` are the other names
    clients may send. Together they are the closed set of `model` label values.
    """

    def __init__(
        self,
        prices: Mapping[str, float],
        aliases: Iterable[str] = (),
        window_s: float = 60.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.prices = dict(prices)
        self.names = frozenset([*self.prices, *aliases])
        self.clock = clock
        self.windows = {v: ThroughputWindow(window_s) for v in self.prices}
        self.registry = CollectorRegistry()
        r = self.registry
        mv = ("model", "variant")
        self.requests = Counter(
            "inference_requests",
            "Requests by model, variant and status class",
            (*mv, "status"),
            registry=r,
        )
        self.latency = Histogram(
            "inference_latency_seconds",
            "End-to-end request latency",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "awq_serve_time_to_first_token_seconds",
            "Arrival at the engine to first token",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "awq_serve_time_per_output_token_seconds",
            "Mean time per output token after the first",
            mv,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "awq_serve_queue_time_seconds",
            "Arrival at the engine to start of prefill",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "awq_serve_prompt_tokens", "Prompt tokens of successful requests", mv, registry=r
        )
        self.generated_tokens = Counter(
            "awq_serve_generation_tokens", "Output tokens of successful requests", mv, registry=r
        )
        self.output_tok_per_s = Gauge(
            "awq_serve_output_tokens_per_second",
            f"Output tokens/s over the requests finished in the last {window_s:g}s",
            ("variant",),
            registry=r,
        )
        self.cost_per_million = Gauge(
            "awq_serve_cost_per_1m_output_tokens_dollars",
            "Configured $/GPU-hour over the live output tokens/hour, per 1M tokens",
            ("variant",),
            registry=r,
        )
        self.cost_per_request = Gauge(
            "awq_serve_cost_per_request_dollars",
            "Mean output tokens per request at the live cost per token",
            ("variant",),
            registry=r,
        )

    def _model(self, name: str) -> str:
        return name if name in self.names else UNKNOWN_MODEL

    def _variant(self, name: str) -> str:
        return name if name in self.prices else NO_VARIANT

    def observe(
        self, model: str, variant: str, status: int, latency_s: float, result: Finished | None
    ) -> None:
        """Count one finished request; a successful one also feeds latency, tokens and cost."""
        model, variant = self._model(model), self._variant(variant)
        self.requests.labels(model, variant, status_class(status)).inc()
        if status >= 400 or result is None:
            return
        self.latency.labels(model, variant).observe(latency_s)
        n_out = result.usage.completion_tokens
        self.prompt_tokens.labels(model, variant).inc(result.usage.prompt_tokens)
        self.generated_tokens.labels(model, variant).inc(n_out)
        ttft, queue = result.timings.ttft_s, result.timings.queue_s
        if ttft is not None:
            self.ttft.labels(model, variant).observe(ttft)
            if n_out > 1:
                self.tpot.labels(model, variant).observe(max(0.0, latency_s - ttft) / (n_out - 1))
        if queue is not None:
            self.queue_time.labels(model, variant).observe(queue)
        if variant in self.windows:
            now = self.clock()
            self._update_cost(variant, now - latency_s, now, n_out)

    def _update_cost(self, variant: str, started: float, finished: float, n_out: int) -> None:
        window = self.windows[variant]
        window.add(started, finished, n_out)
        tps = window.tokens_per_s()
        self.output_tok_per_s.labels(variant).set(tps)
        price = self.prices[variant]
        if price <= 0:  # no price configured: no cost series rather than a made-up $0
            return
        per_million = cost_per_million_tokens(price, tps)
        if per_million is not None:
            self.cost_per_million.labels(variant).set(per_million)
            self.cost_per_request.labels(variant).set(
                cost_per_request(price, tps, window.tokens_per_request()) or 0.0
            )

    def render(self) -> bytes:
        return generate_latest(self.registry)


# Names as declared in ReplicaMetrics; the exported name is RAY_PREFIX + name (+ _bucket/_sum/
# _count for histograms). Tests and the dashboard query the exported names.
REPLICA_METRICS = {
    "batch_size": "awq_serve_batch_size",
    "step_seconds": "awq_serve_decode_step_seconds",
    "running": "awq_serve_running_requests",
    "waiting": "awq_serve_waiting_requests",
    "kv_bytes": "awq_serve_kv_cache_bytes",
    "memory": "awq_serve_replica_memory_bytes",
    "model_load_seconds": "awq_serve_model_load_seconds",
    "generated_tokens": "awq_serve_engine_generated_tokens",  # a counter: exported with _total
    # vLLM's pair: hit rate = hits / queries, in prompt tokens.
    "prefix_cache_queries": "awq_serve_prefix_cache_queries",  # counter
    "prefix_cache_hits": "awq_serve_prefix_cache_hits",  # counter
}
EXPORTED_REPLICA_METRICS = {k: RAY_PREFIX + v for k, v in REPLICA_METRICS.items()}


class ReplicaMetrics:
    """Engine-level metrics from inside a replica, exported by Ray.

    Histograms are observed on every decode step. Gauges and the token counter are sampled by a
    background thread: the engine only calls back on steps, so an idle engine would otherwise
    keep showing its last busy values, and Ray drops a gauge series that is not set again within
    two report intervals. Ray exports a histogram's `_sum` from bucket midpoints (approximate);
    its bucket counts and `_count` are exact.
    """

    def __init__(self, model: str, variant: str) -> None:
        from ray.util import metrics as ray_metrics

        tags = {"model": model, "variant": variant}
        keys = tuple(tags)
        n = REPLICA_METRICS
        self.batch_size = ray_metrics.Histogram(
            n["batch_size"],
            "Sequences per decode step",
            boundaries=list(BATCH_BUCKETS),
            tag_keys=keys,
        )
        self.step_seconds = ray_metrics.Histogram(
            n["step_seconds"],
            "Wall time of one decode step",
            boundaries=list(TOKEN_LATENCY_BUCKETS),
            tag_keys=keys,
        )
        self.running = ray_metrics.Gauge(n["running"], "Sequences decoding now", keys)
        self.waiting = ray_metrics.Gauge(n["waiting"], "Requests queued in the engine", keys)
        self.kv_bytes = ray_metrics.Gauge(n["kv_bytes"], "KV cache bytes holding tokens", keys)
        self.memory = ray_metrics.Gauge(n["memory"], "Replica resident memory (RSS)", keys)
        self.model_load_seconds = ray_metrics.Gauge(
            n["model_load_seconds"], "Model load + warm-up time of this replica", keys
        )
        self.generated_tokens = ray_metrics.Counter(
            n["generated_tokens"], "Tokens generated by this replica's engine", keys
        )
        self.prefix_cache_queries = ray_metrics.Counter(
            n["prefix_cache_queries"], "Prompt tokens looked up in the prefix cache", keys
        )
        self.prefix_cache_hits = ray_metrics.Counter(
            n["prefix_cache_hits"], "Prompt tokens served from the prefix cache", keys
        )
        for m in (
            self.batch_size,
            self.step_seconds,
            self.running,
            self.waiting,
            self.kv_bytes,
            self.memory,
            self.model_load_seconds,
            self.generated_tokens,
            self.prefix_cache_queries,
            self.prefix_cache_hits,
        ):
            m.set_default_tags(tags)
        self.load_seconds = 0.0
        self._counted: dict[str, int] = {}
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def observe_step(self, batch_size: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.step_seconds.observe(seconds)

    def sample(self, stats: Any, memory_bytes: float) -> None:
        """Set the gauges from engine stats; add the tokens generated since the last sample."""
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_bytes.set(stats.kv_cache_bytes)
        self.memory.set(memory_bytes)
        self.model_load_seconds.set(self.load_seconds)
        for name in ("generated_tokens", "prefix_cache_queries", "prefix_cache_hits"):
            total, seen = getattr(stats, name), self._counted.get(name, 0)
            if total > seen:  # Ray counters refuse inc(0)
                getattr(self, name).inc(total - seen)
                self._counted[name] = total

    def start_sampling(
        self, read: Callable[[], tuple[Any, float]], interval_s: float = 1.0
    ) -> None:
        """Every `interval_s`, `sample(*read())` where read() -> (engine stats, memory bytes)."""

        def sample() -> None:
            while True:
                try:
                    self.sample(*read())
                except Exception:  # a failed sample must not kill the sampler
                    log.exception("sampling replica gauges failed")
                if self._stop.wait(interval_s):
                    return

        self._sampler = threading.Thread(target=sample, name="metrics-sampler", daemon=True)
        self._sampler.start()

    def stop_sampling(self) -> None:
        """Returns once the sampler has stopped: no sample is written after this."""
        self._stop.set()
        if self._sampler is not None and self._sampler is not threading.current_thread():
            self._sampler.join(timeout=10)
