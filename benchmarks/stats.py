"""Benchmark statistics: per-request latencies from a recorded stream, and the run summary.

Pure functions only; `benchmarks.load` records, this module measures. Times are seconds on one
monotonic clock (the load generator uses `time.perf_counter()` relative to the run start).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from deployments.ops.cost import cost_per_million_tokens

QUANTILES: tuple[float, ...] = (50.0, 95.0, 99.0)


class RequestRecord(BaseModel):
    """What one request did on the wire: when it was sent, when each token arrived, how it ended."""

    index: int = Field(0, description="Order in which the load generator issued the request.")
    send_s: float = Field(description="Time the request was sent.")
    first_token_s: float | None = Field(None, description="Arrival of the first content chunk.")
    token_times_s: list[float] = Field(
        default_factory=list, description="Arrival time of every content chunk, in order."
    )
    end_s: float = Field(description="Time the response ended ([DONE], error, or disconnect).")
    output_tokens: int = Field(0, ge=0, description="Usage's completion_tokens, else chunk count.")
    prompt_tokens: int | None = Field(None, ge=0, description="Usage's prompt_tokens if sent.")
    status: int | None = Field(None, description="HTTP status; None when no response came.")
    error: str | None = Field(None, description="Why the request failed; None when it succeeded.")
    finish_reason: str | None = Field(None, description="'stop' or 'length' as the server said.")

    @property
    def ok(self) -> bool:
        """A request counts as successful only with HTTP 200 and no error in the stream."""
        return self.status == 200 and self.error is None


@dataclass(frozen=True)
class RequestMetrics:
    """Latencies of one request, in seconds."""

    ttft_s: float | None
    tpot_s: float | None
    itl_s: tuple[float, ...]
    e2e_s: float


class LatencyStats(BaseModel):
    """Mean and percentiles of one latency, in seconds; None when there were no samples."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class BenchSummary(BaseModel):
    """Everything a benchmark run reports; latencies count successful requests only."""

    count: int = Field(description="Requests issued.")
    ok: int = Field(description="Requests that finished with HTTP 200 and no stream error.")
    errors: int = Field(description="Requests that failed.")
    errors_by_status: dict[str, int] = Field(
        default_factory=dict, description="Failed requests by HTTP status ('none' = no response)."
    )
    wall_time_s: float = Field(description="From the first send to the last response end.")
    output_tokens: int = Field(description="Output tokens of successful requests.")
    prompt_tokens: int = Field(description="Prompt tokens of successful requests, where reported.")
    output_tok_per_s: float = Field(description="output_tokens / wall_time_s.")
    requests_per_s: float = Field(description="Successful requests / wall_time_s.")
    goodput_rps: float = Field(description="Successful requests meeting both SLOs / wall_time_s.")
    slo_ttft_s: float | None = Field(None, description="TTFT SLO used for goodput; None = any.")
    slo_tpot_s: float | None = Field(None, description="TPOT SLO used for goodput; None = any.")
    ttft: LatencyStats = Field(description="Time to first token.")
    tpot: LatencyStats = Field(description="Time per output token after the first.")
    itl: LatencyStats = Field(description="Inter-token (inter-chunk) latency, pooled.")
    e2e: LatencyStats = Field(description="End-to-end request latency.")
    gpu_dollars_per_hour: float | None = Field(None, description="Price used for the cost.")
    cost_per_1m_output_tokens: float | None = Field(
        None, description="Dollars per 1M output tokens at the measured throughput."
    )


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation (numpy's default); None for no values."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def latency_stats(values: Sequence[float]) -> LatencyStats:
    """Mean, p50, p95 and p99 of a list of latencies."""
    if not values:
        return LatencyStats()
    p50, p95, p99 = (percentile(values, q) for q in QUANTILES)
    return LatencyStats(
        count=len(values), mean=sum(values) / len(values), p50=p50, p95=p95, p99=p99
    )


def request_metrics(record: RequestRecord) -> RequestMetrics:
    """TTFT, TPOT = (e2e - ttft) / (n_out - 1), inter-token gaps and e2e of one request."""
    e2e = record.end_s - record.send_s
    ttft = None if record.first_token_s is None else record.first_token_s - record.send_s
    tpot = None
    if ttft is not None and record.output_tokens > 1:
        tpot = (e2e - ttft) / (record.output_tokens - 1)
    times = record.token_times_s
    itl = tuple(later - earlier for earlier, later in itertools.pairwise(times))
    return RequestMetrics(ttft_s=ttft, tpot_s=tpot, itl_s=itl, e2e_s=e2e)


def meets_slo(metrics: RequestMetrics, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """Whether a successful request met the SLOs; a request with no token misses a TTFT SLO."""
    if slo_ttft_s is not None and (metrics.ttft_s is None or metrics.ttft_s > slo_ttft_s):
        return False
    # One output token has no TPOT, so it cannot miss a TPOT SLO.
    return slo_tpot_s is None or metrics.tpot_s is None or metrics.tpot_s <= slo_tpot_s


def error_key(record: RequestRecord) -> str:
    """The bucket a failed request is counted under: its HTTP status, or 'none'."""
    return "none" if record.status is None else str(record.status)


def cost_per_1m_tokens(dollars_per_hour: float | None, tok_per_s: float) -> float | None:
    """Dollars per 1M output tokens = $/h / (tok/s * 3600) * 1e6; None if unpriced or 0 tok/s."""
    if dollars_per_hour is None:
        return None
    return cost_per_million_tokens(dollars_per_hour, tok_per_s)


def summarize(
    records: Sequence[RequestRecord],
    wall_time_s: float,
    gpu_dollars_per_hour: float | None = None,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
) -> BenchSummary:
    """Aggregate a run: failed requests are counted by status but left out of every latency."""
    if wall_time_s <= 0:
        raise ValueError(f"wall_time_s must be positive, got {wall_time_s}")
    good = [r for r in records if r.ok]
    metrics = [request_metrics(r) for r in good]
    output_tokens = sum(r.output_tokens for r in good)
    tok_per_s = output_tokens / wall_time_s
    return BenchSummary(
        count=len(records),
        ok=len(good),
        errors=len(records) - len(good),
        errors_by_status=dict(Counter(error_key(r) for r in records if not r.ok)),
        wall_time_s=wall_time_s,
        output_tokens=output_tokens,
        prompt_tokens=sum(r.prompt_tokens or 0 for r in good),
        output_tok_per_s=tok_per_s,
        requests_per_s=len(good) / wall_time_s,
        goodput_rps=sum(meets_slo(m, slo_ttft_s, slo_tpot_s) for m in metrics) / wall_time_s,
        slo_ttft_s=slo_ttft_s,
        slo_tpot_s=slo_tpot_s,
        ttft=latency_stats([m.ttft_s for m in metrics if m.ttft_s is not None]),
        tpot=latency_stats([m.tpot_s for m in metrics if m.tpot_s is not None]),
        itl=latency_stats([gap for m in metrics for gap in m.itl_s]),
        e2e=latency_stats([m.e2e_s for m in metrics]),
        gpu_dollars_per_hour=gpu_dollars_per_hour,
        cost_per_1m_output_tokens=cost_per_1m_tokens(gpu_dollars_per_hour, tok_per_s),
    )
