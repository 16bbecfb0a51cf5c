"""Load generator for OpenAI-compatible servers: streams requests, records each token's arrival.

Closed loop: `concurrency` clients each send requests back to back. Open loop: Poisson arrivals at
`rate` requests/s, however many are in flight. Both stop at `requests` issued or after `duration_s`
(in-flight requests finish). Results: a table on stdout, JSON and a latency CDF PNG in
`benchmarks/results/`. Run `python -m benchmarks.load --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, Field, model_validator
from tqdm import tqdm

from benchmarks.prompts import PROMPTS, pick_prompts
from benchmarks.stats import BenchSummary, LatencyStats, RequestRecord, summarize

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_REQUESTS = 64
Clock = Callable[[], float]


class LoadConfig(BaseModel):
    """One benchmark run: where to send, what to send, and when to stop."""

    base_url: str = Field("http://127.0.0.1:8000", description="Server root, without /v1.")
    model: str | None = Field(None, description="Model name; None = first of GET /v1/models.")
    endpoint: Literal["chat", "completions"] = Field("chat", description="Which /v1 API to call.")
    max_tokens: int = Field(128, ge=1, description="max_tokens of every request.")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature; 0 = greedy.")
    concurrency: int = Field(16, ge=1, description="Closed loop: number of clients.")
    requests: int | None = Field(
        None, ge=1, description=f"Requests to issue; {DEFAULT_REQUESTS} when no duration is set."
    )
    duration_s: float | None = Field(None, gt=0, description="Stop issuing after this long.")
    rate: float | None = Field(None, gt=0, description="Open loop: Poisson arrivals per second.")
    seed: int = Field(0, description="Seeds prompt order and arrival times.")
    api_key: str | None = Field(None, description="Sent as a bearer token.")
    timeout_s: float = Field(300.0, gt=0, description="Per-request read timeout.")
    slo_ttft_s: float | None = Field(2.0, gt=0, description="Goodput SLO on time to first token.")
    slo_tpot_s: float | None = Field(0.2, gt=0, description="Goodput SLO on time per output token.")
    gpu_dollars_per_hour: float | None = Field(
        None, ge=0, description="Machine price for cost per 1M tokens; None = not reported."
    )
    allow_remote: bool = Field(False, description="Allow a non-loopback base_url.")

    @model_validator(mode="after")
    def _check(self) -> LoadConfig:
        if not self.allow_remote:
            ensure_loopback(self.base_url)
        if self.requests is None and self.duration_s is None:
            self.requests = DEFAULT_REQUESTS
        return self

    @property
    def mode(self) -> Literal["closed", "open"]:
        """Open loop when a rate is set, closed loop otherwise."""
        return "closed" if self.rate is None else "open"

    def label(self) -> str:
        """Short name of the load shape, used in file names and titles."""
        return f"closed-c{self.concurrency}" if self.rate is None else f"open-r{self.rate:g}"


class LoadRun(BaseModel):
    """A finished run: what was asked, what each request did, and the summary."""

    config: LoadConfig
    model: str
    records: list[RequestRecord]
    summary: BenchSummary


def ensure_loopback(base_url: str) -> None:
    """Refuse any host but this machine, so a benchmark never loads someone else's server."""
    host = urlsplit(base_url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ValueError(
            f"base_url {base_url!r} is not on this machine; benchmarks only target loopback "
            "(127.0.0.1, ::1, localhost). Pass --allow-remote to override."
        )


@dataclass(frozen=True)
class StreamEvent:
    """One parsed SSE `data:` line of an OpenAI stream."""

    text: str = ""
    usage: dict[str, int] | None = None
    finish_reason: str | None = None
    error: str | None = None
    done: bool = False


def parse_sse_line(line: str) -> StreamEvent | None:
    """Parse one SSE line; None for blank, comment and non-data lines."""
    line = line.rstrip("\r\n")
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if data == "[DONE]":
        return StreamEvent(done=True)
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        return StreamEvent(error=f"malformed SSE data: {data[:200]!r}")
    if not isinstance(chunk, dict):
        return StreamEvent(error=f"SSE data is not a JSON object: {data[:200]!r}")
    if chunk.get("error"):
        return StreamEvent(error=_error_text(chunk["error"]))
    choice = (chunk.get("choices") or [{}])[0]
    # Chat chunks carry text in delta.content; completion chunks in text.
    text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
    return StreamEvent(
        text=text, usage=chunk.get("usage"), finish_reason=choice.get("finish_reason")
    )


def _error_text(error: Any) -> str:
    """The message of an OpenAI error object, or the object itself as text."""
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return str(error)


def response_error(status: int, body: bytes) -> str:
    """A one-line error for a non-200 response, from its OpenAI error body if it has one."""
    try:
        message = _error_text(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace").strip()
    return f"HTTP {status}: {message[:300]}"


def record_from_stream(
    index: int,
    send_s: float,
    events: Sequence[tuple[float, StreamEvent]],
    end_s: float,
    status: int | None,
    error: str | None = None,
) -> RequestRecord:
    """Fold timed stream events into a record; tokens come from usage, else the chunk count."""
    token_times = [t for t, event in events if event.text]
    usage = next((e.usage for _, e in reversed(events) if e.usage), {})
    finish = next((e.finish_reason for _, e in reversed(events) if e.finish_reason), None)
    if error is None:
        error = next((e.error for _, e in events if e.error), None)
    if error is None and status == 200 and not any(e.done for _, e in events):
        error = "stream ended before data: [DONE]"
    return RequestRecord(
        index=index,
        send_s=send_s,
        first_token_s=token_times[0] if token_times else None,
        token_times_s=token_times,
        end_s=end_s,
        output_tokens=usage.get("completion_tokens", len(token_times)),
        prompt_tokens=usage.get("prompt_tokens"),
        status=status,
        error=error,
        finish_reason=finish,
    )


def request_body(config: LoadConfig, model: str, prompt: str) -> dict[str, Any]:
    """The streaming request for one prompt, asking for usage in the last chunk."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def poisson_arrival_times(rate: float, seed: int = 0) -> Iterator[float]:
    """Endless arrival offsets of a Poisson process: 0, then exponential gaps of mean 1/rate."""
    rng = random.Random(seed)
    t = 0.0
    while True:
        yield t
        t += rng.expovariate(rate)


async def send_request(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], index: int, clock: Clock
) -> RequestRecord:
    """Send one streaming request and record the arrival time of every SSE event."""
    send_s = clock()
    events: list[tuple[float, StreamEvent]] = []
    status: int | None = None
    error: str | None = None
    try:
        async with client.stream("POST", path, json=body) as response:
            status = response.status_code
            if status != 200:
                error = response_error(status, await response.aread())
            else:
                async for line in response.aiter_lines():
                    event = parse_sse_line(line)
                    if event is None:
                        continue
                    events.append((clock(), event))
                    if event.done or event.error:
                        break
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    return record_from_stream(index, send_s, events, clock(), status, error)


Send = Callable[[int], Awaitable[RequestRecord]]


async def closed_loop(
    send: Send, clients: int, requests: int | None, deadline: float | None, clock: Clock
) -> list[RequestRecord]:
    """`clients` workers send back to back until `requests` are issued or `deadline` passes."""
    tickets = itertools.count()
    records: list[RequestRecord] = []

    async def client() -> None:
        for index in tickets:
            if (requests is not None and index >= requests) or (
                deadline is not None and clock() >= deadline
            ):
                return
            records.append(await send(index))

    await asyncio.gather(*(client() for _ in range(clients)))
    return records


async def open_loop(
    send: Send,
    rate: float,
    requests: int | None,
    deadline: float | None,
    clock: Clock,
    seed: int,
) -> list[RequestRecord]:
    """Start requests at Poisson arrival times, not waiting for earlier ones to finish."""
    tasks: list[asyncio.Task[RequestRecord]] = []
    for index, at in enumerate(poisson_arrival_times(rate, seed)):
        if (requests is not None and index >= requests) or (
            deadline is not None and at >= deadline
        ):
            break
        await asyncio.sleep(max(0.0, at - clock()))
        tasks.append(asyncio.create_task(send(index)))
    return list(await asyncio.gather(*tasks))


async def resolve_model(client: httpx.AsyncClient, model: str | None) -> str:
    """The model to load: the one asked for, else the first that GET /v1/models lists."""
    if model is not None:
        return model
    response = await client.get("/v1/models")
    response.raise_for_status()
    served = [m["id"] for m in response.json().get("data", [])]
    if not served:
        raise RuntimeError("GET /v1/models lists no model; pass --model")
    return served[0]


async def collect(
    config: LoadConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    progress: bool = True,
) -> LoadRun:
    """Run the load described by `config` and summarize it."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    # Open loop must not queue in the client's pool: that would hide the server's queueing.
    limit = config.concurrency if config.mode == "closed" else None
    async with httpx.AsyncClient(
        base_url=config.base_url,
        headers=headers,
        timeout=httpx.Timeout(config.timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        transport=transport,
        # Proxy variables would route loopback traffic through a proxy and skew latency.
        trust_env=config.allow_remote,
    ) as client:
        model = await resolve_model(client, config.model)
        prompts = pick_prompts(config.requests or len(PROMPTS), config.seed)
        path = "/v1/chat/completions" if config.endpoint == "chat" else "/v1/completions"
        bar = tqdm(total=config.requests, unit="req", desc=config.label(), disable=not progress)
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        async def send(index: int) -> RequestRecord:
            body = request_body(config, model, prompts[index % len(prompts)])
            record = await send_request(client, path, body, index, clock)
            bar.update(1)
            return record

        if config.rate is None:
            records = await closed_loop(
                send, config.concurrency, config.requests, config.duration_s, clock
            )
        else:
            records = await open_loop(
                send, config.rate, config.requests, config.duration_s, clock, config.seed
            )
        wall_time_s = clock()
        bar.close()
    records.sort(key=lambda r: r.index)
    summary = summarize(
        records, wall_time_s, config.gpu_dollars_per_hour, config.slo_ttft_s, config.slo_tpot_s
    )
    return LoadRun(config=config, model=model, records=records, summary=summary)


def run_load(
    config: LoadConfig,
    *,
    out_dir: Path | None = RESULTS_DIR,
    transport: httpx.AsyncBaseTransport | None = None,
    progress: bool = True,
) -> BenchSummary:
    """Run a benchmark synchronously; writes JSON and PNG to `out_dir` unless it is None."""
    run = asyncio.run(collect(config, transport=transport, progress=progress))
    if out_dir is not None:
        write_results(run, out_dir)
    return run.summary


def write_results(run: LoadRun, out_dir: Path) -> tuple[Path, Path]:
    """Write `<time>-<label>.json` (config, summary, records; no API key) and its CDF PNG."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{run.config.label()}"
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    payload = run.model_dump(mode="json", exclude={"config": {"api_key"}})
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    plot_latency_cdf(run, png_path)
    return json_path, png_path


def ecdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted values and the fraction of values at or below each."""
    ordered = sorted(values)
    return ordered, [(i + 1) / len(ordered) for i in range(len(ordered))]


def plot_latency_cdf(run: LoadRun, path: Path) -> None:
    """PNG of the TTFT and e2e latency CDFs of successful requests (Agg, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    good = [r for r in run.records if r.ok]
    series = {
        "TTFT": [r.first_token_s - r.send_s for r in good if r.first_token_s is not None],
        "end-to-end": [r.end_s - r.send_s for r in good],
    }
    figure = Figure(figsize=(7, 4.5), layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, values in series.items():
        if values:
            axes.step(*ecdf(values), where="post", label=f"{name} (n={len(values)})")
    axes.set_xlabel("latency (s)")
    axes.set_ylabel("fraction of requests")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.set_title(f"{run.model}: {run.config.label()}, max_tokens={run.config.max_tokens}")
    if good:
        axes.legend(loc="lower right")
    figure.savefig(path, dpi=120)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def format_table(run: LoadRun) -> str:
    """A plain-text report of one run: load shape, throughput, cost, and latency percentiles."""
    s, c = run.summary, run.config
    shape = f"{c.concurrency} clients" if c.rate is None else f"Poisson {c.rate:g} req/s"
    by_status = ", ".join(f"{k}: {v}" for k, v in sorted(s.errors_by_status.items()))
    cost = (
        "-"
        if s.cost_per_1m_output_tokens is None
        else f"${s.cost_per_1m_output_tokens:.3f} at ${s.gpu_dollars_per_hour:g}/h"
    )
    slo = (
        ", ".join(
            f"{name}<={value:g}s"
            for name, value in (("TTFT", c.slo_ttft_s), ("TPOT", c.slo_tpot_s))
            if value is not None
        )
        or "no SLO"
    )
    lines = [
        f"{run.model} @ {c.base_url} ({c.endpoint}), {c.mode} loop, {shape}, "
        f"max_tokens={c.max_tokens}",
        f"requests       {s.count} sent, {s.ok} ok, {s.errors} errors"
        + (f" ({by_status})" if by_status else ""),
        f"wall time      {s.wall_time_s:.2f} s",
        f"output tokens  {s.output_tokens} ({s.output_tok_per_s:.1f} tok/s)",
        f"requests/s     {s.requests_per_s:.2f} (goodput {s.goodput_rps:.2f} with {slo})",
        f"cost / 1M out  {cost}",
        "",
        f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p95':>10}{'p99':>10}",
    ]
    rows: dict[str, LatencyStats] = {"TTFT": s.ttft, "TPOT": s.tpot, "ITL": s.itl, "e2e": s.e2e}
    for name, stats in rows.items():
        cells = [_ms(v) for v in (stats.mean, stats.p50, stats.p95, stats.p99)]
        lines.append(f"{name:<14}" + "".join(f"{cell:>10}" for cell in cells))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line; flags map one to one onto LoadConfig fields."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description="Stream requests to an OpenAI-compatible server and report TTFT, TPOT, ITL, "
        "e2e percentiles, throughput, goodput and cost. Closed loop by default; --rate makes it "
        "open loop (Poisson arrivals).",
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model name (default: first of GET /v1/models)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    p.add_argument(
        "--requests", type=int, help=f"requests to issue (default {DEFAULT_REQUESTS} w/o duration)"
    )
    p.add_argument("--duration", type=float, help="seconds after which no request is issued")
    p.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    p.add_argument("--seed", type=int, default=0, help="prompt order and arrival times")
    p.add_argument("--api-key", help="bearer token")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO on TTFT (s)")
    p.add_argument("--slo-tpot", type=float, default=0.2, help="goodput SLO on TPOT (s)")
    p.add_argument("--dollars-per-hour", type=float, help="machine price, for cost per 1M tokens")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where JSON and PNG go")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--allow-remote", action="store_true", help="allow a base URL that is not loopback"
    )
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """LoadConfig from parsed flags."""
    return LoadConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        concurrency=args.concurrency,
        requests=args.requests,
        duration_s=args.duration,
        rate=args.rate,
        seed=args.seed,
        api_key=args.api_key,
        timeout_s=args.timeout,
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
        gpu_dollars_per_hour=args.dollars_per_hour,
        allow_remote=args.allow_remote,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: run, print the table, write the files."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    run = asyncio.run(collect(config, progress=not args.no_progress))
    json_path, png_path = write_results(run, args.out_dir)
    print(format_table(run))
    print(f"\nwrote {json_path}\n      {png_path}")
    return 0 if run.summary.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
