"""What serving costs: dollars per 1M output tokens and per request, from $/GPU-hour and throughput.

Pure functions and plain data, shared by the router's live gauges and `awq-serve cost`. A request's
cost is its share of the GPU-hour: its output tokens at the measured throughput (batching spreads
one GPU's price over every sequence decoded together).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

SECONDS_PER_HOUR = 3600.0
MILLION = 1_000_000
DEFAULT_PRICES = Path(__file__).resolve().parents[2] / "configs" / "cost.yaml"


def cost_per_million_tokens(dollars_per_hour: float, tokens_per_s: float) -> float | None:
    """Dollars per 1M output tokens; None when nothing was generated (the cost is undefined)."""
    if tokens_per_s <= 0:
        return None
    return dollars_per_hour / (tokens_per_s * SECONDS_PER_HOUR) * MILLION


def cost_per_request(
    dollars_per_hour: float, tokens_per_s: float, tokens_per_request: float
) -> float | None:
    """Dollars for one request of `tokens_per_request` output tokens at the measured throughput."""
    per_million = cost_per_million_tokens(dollars_per_hour, tokens_per_s)
    return None if per_million is None else per_million * tokens_per_request / MILLION


# ---- prices --------------------------------------------------------------------------------
class GpuPrice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="GPU type as shown in the table.")
    dollars_per_hour: float = Field(ge=0, description="On-demand price of one GPU for an hour.")


class CostConfig(BaseModel):
    """`configs/cost.yaml`: the GPU types `awq-serve cost` compares."""

    model_config = ConfigDict(extra="forbid")

    gpus: list[GpuPrice] = Field(min_length=1, description="GPU types and their hourly prices.")

    @field_validator("gpus")
    @classmethod
    def _unique(cls, gpus: list[GpuPrice]) -> list[GpuPrice]:
        names = [g.name for g in gpus]
        if len(set(names)) != len(names):
            raise ValueError(f"GPU names must be unique: {names}")
        return gpus


def load_prices(path: Path = DEFAULT_PRICES) -> CostConfig:
    return CostConfig.model_validate(yaml.safe_load(Path(path).read_text()))


# ---- throughput ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Throughput:
    """A measured output rate and, when known, the mean output tokens of one request."""

    output_tok_per_s: float
    tokens_per_request: float | None
    source: str

    def __post_init__(self) -> None:
        if not self.output_tok_per_s > 0:
            raise ValueError(
                f"throughput must be positive, got {self.output_tok_per_s} output tok/s "
                f"({self.source}); a run with no successful requests has no cost per token"
            )
        if self.tokens_per_request is not None and self.tokens_per_request < 0:
            raise ValueError(f"tokens per request must be >= 0, got {self.tokens_per_request}")


def throughput_from_benchmark(path: Path) -> Throughput:
    """Read `summary.output_tok_per_s` (and output tokens per ok request) of a `load.py` JSON."""
    try:
        summary = json.loads(Path(path).read_text())["summary"]
        tok_per_s = float(summary["output_tok_per_s"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{path} is not a benchmarks/load.py result: it needs summary.output_tok_per_s ({e})"
        ) from e
    ok = summary.get("ok") or 0
    per_request = summary["output_tokens"] / ok if ok and "output_tokens" in summary else None
    return Throughput(tok_per_s, per_request, f"{Path(path).name}")


@dataclass(frozen=True)
class CostRow:
    gpu: str
    dollars_per_hour: float
    per_million: float | None
    per_request: float | None


def cost_rows(prices: CostConfig, throughput: Throughput) -> list[CostRow]:
    """One row per GPU type, all at the same measured throughput."""
    rows = []
    for gpu in prices.gpus:
        tps = throughput.output_tok_per_s
        per_request = (
            None
            if throughput.tokens_per_request is None
            else cost_per_request(gpu.dollars_per_hour, tps, throughput.tokens_per_request)
        )
        rows.append(
            CostRow(
                gpu.name,
                gpu.dollars_per_hour,
                cost_per_million_tokens(gpu.dollars_per_hour, tps),
                per_request,
            )
        )
    return rows


def _dollars(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"${value:.{digits}f}"


def cost_table(rows: Sequence[CostRow], throughput: Throughput) -> str:
    """A plain-text table: GPU, $/hour, $ per 1M output tokens, $ per request."""
    per_req = (
        "n/a"
        if throughput.tokens_per_request is None
        else f"{throughput.tokens_per_request:.0f} output tokens"
    )
    header = (
        f"throughput {throughput.output_tok_per_s:.1f} output tok/s ({throughput.source}); "
        f"request = {per_req}"
    )
    lines = [header, f"{'GPU':<16}{'$/hour':>10}{'$/1M out':>12}{'$/request':>14}"]
    for r in rows:
        lines.append(
            f"{r.gpu:<16}{r.dollars_per_hour:>10.2f}{_dollars(r.per_million, 3):>12}"
            f"{_dollars(r.per_request, 6):>14}"
        )
    return "\n".join(lines)


# ---- live throughput in the router ---------------------------------------------------------
class ThroughputWindow:
    """Output tokens per second over the requests that finished in the last `window_s` seconds.

    The rate is tokens / (last finish - first start) of those requests, the same definition as a
    benchmark's output_tokens / wall time, so idle time between bursts does not count.
    """

    def __init__(self, window_s: float = 60.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self._done: deque[tuple[float, float, int]] = deque()  # (started, finished, tokens)

    def add(self, started: float, finished: float, tokens: int) -> None:
        self._done.append((started, finished, tokens))
        while self._done and self._done[0][1] < finished - self.window_s:
            self._done.popleft()

    def tokens_per_s(self) -> float:
        if not self._done:
            return 0.0
        span = max(f for _, f, _ in self._done) - min(s for s, _, _ in self._done)
        tokens = sum(n for _, _, n in self._done)
        return tokens / span if span > 0 else 0.0

    def tokens_per_request(self) -> float:
        return sum(n for _, _, n in self._done) / len(self._done) if self._done else 0.0
