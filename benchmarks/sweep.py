"""Concurrency sweep of benchmarks.compare: throughput and TTFT p95 of each system per client count.

One figure at 16 clients hides where a system saturates and where its queueing starts; a sweep
(`--sweep 1,4,16,32`) shows the curve. Parsing, tabulation and the plot live here, pure but for
the plot's file; compare.py runs the loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, Field

from benchmarks.stats import BenchSummary
from benchmarks.tree_memory import MemoryPeak

# Fewer requests than this at a low level would make p95 the worst of a handful.
MIN_REQUESTS = 8


class SweepPoint(BaseModel):
    """One system at one concurrency level."""

    concurrency: int = Field(description="Closed-loop clients.")
    requests: int = Field(description="Requests issued.")
    ok: int = 0
    errors: int = 0
    output_tok_per_s: float | None = None
    ttft_p95_s: float | None = None
    peak_tree_mib: float | None = Field(None, description="Peak RSS of the server's tree.")


def parse_levels(text: str) -> tuple[int, ...]:
    """'1,4,16,32' as sorted distinct client counts; ValueError names what is wrong."""
    try:
        levels = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"--sweep takes comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ValueError(f"--sweep levels must be positive integers, got {text!r}")
    return tuple(sorted(levels))


def requests_for(level: int, minimum: int = MIN_REQUESTS) -> int:
    """Two requests per client, so every client runs a second one against a full batch."""
    return max(level * 2, minimum)


def sweep_point(level: int, summary: BenchSummary, memory: MemoryPeak | None) -> SweepPoint:
    return SweepPoint(
        concurrency=level,
        requests=summary.count,
        ok=summary.ok,
        errors=summary.errors,
        output_tok_per_s=summary.output_tok_per_s if summary.ok else None,
        ttft_p95_s=summary.ttft.p95,
        peak_tree_mib=memory.peak_tree_mib if memory else None,
    )


def sweep_cell(point: SweepPoint | None) -> str:
    """'123.4 tok/s, 0.52 s' (TTFT p95), with failed requests counted; '-' when not run."""
    if point is None:
        return "-"
    tput = "-" if point.output_tok_per_s is None else f"{point.output_tok_per_s:.1f} tok/s"
    ttft = "-" if point.ttft_p95_s is None else f"{point.ttft_p95_s:.2f} s"
    errors = f" ({point.errors}/{point.requests} failed)" if point.errors else ""
    return f"{tput}, {ttft}{errors}"


def format_sweep_table(series: Mapping[str, Sequence[SweepPoint]], levels: Sequence[int]) -> str:
    """Markdown, one row per system and one column per client count."""
    header = "| system | " + " | ".join(f"{level} clients" for level in levels) + " |"
    lines = [
        "Concurrency sweep: output tok/s, TTFT p95 s",
        header,
        "|---|" + "---|" * len(levels),
    ]
    for label, points in series.items():
        by_level = {p.concurrency: p for p in points}
        cells = [sweep_cell(by_level.get(level)) for level in levels]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _nan(value: float | None) -> float:
    # A level with no successful request leaves a gap in its line rather than a false zero.
    return math.nan if value is None else value


def plot_sweep(series: Mapping[str, Sequence[SweepPoint]], path: Path) -> None:
    """Two panels, tok/s and TTFT p95 against clients (log2 axis), one line per system."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), layout="tight")
    FigureCanvasAgg(figure)
    tput, ttft = figure.subplots(1, 2)
    for label, points in series.items():
        if not points:
            continue
        xs = [p.concurrency for p in points]
        tput.plot(xs, [_nan(p.output_tok_per_s) for p in points], marker="o", label=label)
        ttft.plot(xs, [_nan(p.ttft_p95_s) for p in points], marker="o", label=label)
    tput.set_ylabel("output tokens / s")
    tput.set_title("Throughput (higher is better)")
    ttft.set_ylabel("seconds")
    ttft.set_title("TTFT p95 (lower is better)")
    levels = sorted({p.concurrency for points in series.values() for p in points})
    for axes in (tput, ttft):
        axes.set_xscale("log", base=2)
        if levels:
            axes.set_xticks(levels, [str(level) for level in levels])
        axes.set_xlabel("concurrent clients")
        axes.grid(alpha=0.3)
        if levels:
            axes.legend()
    figure.savefig(path, dpi=120)
