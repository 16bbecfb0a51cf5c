"""Soak test (not in CI): N minutes of mixed traffic with the hostile cases mixed in.

`concurrency` workers send normal chat, completion and streamed chat requests back to back
(after a 429 or 503 they wait its `Retry-After`, as a real client does); every
`hostile_every`-th request is the next case of benchmarks/hostile_cases.py. Prints, per
window (default 5 minutes): requests, status counts, p95 latency of the normal requests; the
replicas' RSS (`/health` `memory_mb`) after a warm-up (the KV cache and allocator pools are
touched by the first requests, so the RSS at launch is not the baseline) and at the end; and a
verdict line (target: zero 5xx, RSS growth under 10%). Loopback only. Stops by itself;
in-flight requests finish.

    python -m benchmarks.soak --minutes 20
    python -m benchmarks.soak --minutes 2 --window-minutes 0.5   # a short check

One client IP is one anonymous client: against serve_config.yaml's limits (100 requests/min per
IP) most of the traffic is refused with 429. To soak the model rather than the rate limiter,
serve a copy of the config with the limits raised, or pass `--api-key` with a key's own limits.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from benchmarks.hostile_cases import CASES, HostileCase
from benchmarks.load import ensure_loopback
from benchmarks.prompts import PROMPTS
from benchmarks.stats import percentile

MAX_RSS_GROWTH = 0.10


@dataclass(frozen=True)
class Sample:
    """One finished request: when it started (s from the run start), how it ended, how long."""

    start_s: float
    status: str  # the HTTP status, "stream-error" (200 with an error event), or an exception name
    latency_s: float
    hostile: bool


@dataclass(frozen=True)
class Window:
    index: int
    requests: int
    statuses: Counter[str]
    p95_s: float | None  # normal requests only: hostile ones are answered at once


def windows(samples: Sequence[Sample], window_s: float) -> list[Window]:
    """Samples grouped by the window their request started in, in order."""
    by_index: dict[int, list[Sample]] = {}
    for s in samples:
        by_index.setdefault(int(s.start_s // window_s), []).append(s)
    return [
        Window(
            i,
            len(group),
            Counter(s.status for s in group),
            percentile([s.latency_s for s in group if not s.hostile], 95.0),
        )
        for i, group in sorted(by_index.items())
    ]


def server_errors(samples: Sequence[Sample]) -> int:
    """5xx answers; a stream that reported an error event counts too (its status was 200)."""
    return sum(s.status.startswith("5") or s.status == "stream-error" for s in samples)


def rss_growth(start_mb: dict[str, float], end_mb: dict[str, float]) -> float | None:
    """Relative growth of the summed replica RSS; None when either side is unknown."""
    before, after = sum(start_mb.values()), sum(end_mb.values())
    if not start_mb or not end_mb or before <= 0:
        return None
    return after / before - 1


def transport_errors(samples: Sequence[Sample]) -> int:
    """Requests that got no HTTP answer at all (connection reset, timeout)."""
    return sum(not s.status.isdigit() and s.status != "stream-error" for s in samples)


def passed(samples: Sequence[Sample], growth: float | None) -> bool:
    clean = server_errors(samples) == 0 and transport_errors(samples) == 0
    return clean and growth is not None and growth < MAX_RSS_GROWTH


def verdict(samples: Sequence[Sample], growth: float | None) -> str:
    fivexx, transport = server_errors(samples), transport_errors(samples)
    ok = passed(samples, growth)
    growth_text = "unknown" if growth is None else f"{growth:+.1%}"
    return (
        f"VERDICT {'PASS' if ok else 'FAIL'}: requests={len(samples)} 5xx={fivexx} "
        f"transport_errors={transport} rss_growth={growth_text} "
        f"(target: 0 5xx, growth < {MAX_RSS_GROWTH:.0%})"
    )


def format_window(w: Window, window_s: float) -> str:
    statuses = " ".join(f"{k}={v}" for k, v in sorted(w.statuses.items()))
    p95 = "-" if w.p95_s is None else f"{w.p95_s:.2f}s"
    start, end = w.index * window_s / 60, (w.index + 1) * window_s / 60
    return f"[{start:5.1f}-{end:5.1f} min] requests={w.requests} p95={p95} {statuses}"


# ---- traffic --------------------------------------------------------------------------------
def normal_requests(model: str, max_tokens: int) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(path, body, stream) forever: chat, completion and streamed chat over the prompt set."""
    for i, prompt in enumerate(itertools.cycle(PROMPTS)):
        kind = i % 3
        common = {"model": model, "max_tokens": max_tokens, "temperature": 0}
        if kind == 1:
            yield "/v1/completions", {**common, "prompt": prompt}, False
        else:
            messages = [{"role": "user", "content": prompt}]
            yield "/v1/chat/completions", {**common, "messages": messages}, kind == 2


MAX_RETRY_WAIT_S = 10.0


def retry_wait(status_code: int, headers: httpx.Headers) -> float:
    """Seconds to wait before the next request, as a well-behaved client (the `openai` SDK)
    does: a 429 or 503's `Retry-After`, capped; 0 otherwise. Without it a refused worker would
    retry in a hot loop and the soak would measure the rate limiter, not the server."""
    if status_code not in (429, 503):
        return 0.0
    try:
        wait = float(headers.get("retry-after", "1"))
    except ValueError:
        wait = 1.0
    return min(max(wait, 0.0), MAX_RETRY_WAIT_S)


async def send_normal(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], stream: bool
) -> tuple[str, float]:
    """(status, seconds to wait before the next request)."""
    if not stream:
        r = await client.post(path, json=body)
        return str(r.status_code), retry_wait(r.status_code, r.headers)
    async with client.stream("POST", path, json=body) as r:
        errored = False
        async for line in r.aiter_lines():
            errored = errored or line.startswith('data: {"error"')
    status = "stream-error" if r.status_code == 200 and errored else str(r.status_code)
    return status, retry_wait(r.status_code, r.headers)


async def send_hostile(client: httpx.AsyncClient, case: HostileCase) -> tuple[str, float]:
    r = await client.request(
        case.method, case.path, content=case.body, headers=case.request_headers()
    )
    return str(r.status_code), retry_wait(r.status_code, r.headers)


async def replica_rss(client: httpx.AsyncClient) -> dict[str, float]:
    """`memory_mb` of each model's replica as `/health?detail=1` reports it (one per model)."""
    body = (await client.get("/health?detail=1")).json()
    models = body.get("models", {})
    return {name: m["memory_mb"] for name, m in models.items() if "memory_mb" in m}


async def soak(
    url: str,
    minutes: float,
    concurrency: int,
    hostile_every: int,
    max_tokens: int,
    api_key: str | None,
    window_s: float,
    warmup_s: float,
) -> int:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(300.0, connect=10.0)
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=timeout, limits=limits
    ) as client:
        models = (await client.get("/v1/models")).json()["data"]
        model = models[0]["id"]
        rss_launch = await replica_rss(client)
        print(f"soak {url} model={model} minutes={minutes} concurrency={concurrency} "
              f"hostile 1 in {hostile_every} ({len(CASES)} cases)")  # fmt: skip
        print(f"replica RSS at launch: {rss_launch} MB", flush=True)

        traffic = normal_requests(model, max_tokens)
        hostile = itertools.cycle(CASES)
        counter = itertools.count(1)
        samples: list[Sample] = []
        t0 = time.perf_counter()
        deadline = t0 + minutes * 60
        reported = 0

        async def worker() -> None:
            nonlocal reported
            while time.perf_counter() < deadline:
                n = next(counter)
                is_hostile = n % hostile_every == 0
                start = time.perf_counter()
                wait = 0.0
                try:
                    if is_hostile:
                        status, wait = await send_hostile(client, next(hostile))
                    else:
                        status, wait = await send_normal(client, *next(traffic))
                except httpx.HTTPError as e:
                    status = type(e).__name__
                samples.append(Sample(start - t0, status, time.perf_counter() - start, is_hostile))
                await asyncio.sleep(wait)
                # Print each window once it is over (a request still running may land late).
                done = int((time.perf_counter() - t0) // window_s)
                while reported < done:
                    for w in windows(samples, window_s):
                        if w.index == reported:
                            print(format_window(w, window_s), flush=True)
                    reported += 1

        async def baseline() -> dict[str, float]:
            await asyncio.sleep(warmup_s)
            rss = await replica_rss(client)
            print(f"replica RSS after {warmup_s:.0f}s of traffic (the baseline): {rss} MB",
                  flush=True)  # fmt: skip
            return rss

        baseline_rss = asyncio.create_task(baseline())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        rss_baseline = await baseline_rss
        rss_end = await replica_rss(client)

    print("---- per window ----")
    for w in windows(samples, window_s):
        print(format_window(w, window_s))
    total = Counter(s.status for s in samples)
    print(
        f"total: requests={len(samples)} " + " ".join(f"{k}={v}" for k, v in sorted(total.items()))
    )
    print(f"replica RSS at launch: {rss_launch} MB; after warm-up: {rss_baseline} MB; "
          f"at end: {rss_end} MB")  # fmt: skip
    growth = rss_growth(rss_baseline, rss_end)
    print(verdict(samples, growth))
    return 0 if passed(samples, growth) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="Server root (loopback only).")
    p.add_argument("--minutes", type=float, default=20.0, help="How long to send traffic.")
    p.add_argument("--concurrency", type=int, default=8, help="Parallel clients.")
    p.add_argument("--hostile-every", type=int, default=10, help="1 in N requests is hostile.")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of normal requests.")
    p.add_argument("--window-minutes", type=float, default=5.0, help="Reporting window.")
    p.add_argument(
        "--warmup-minutes", type=float, default=1.0, help="Traffic before the RSS baseline."
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="Bearer key: all workers share one client IP, so anonymous per-client caps "
        "(concurrency, tokens) would refuse some of the normal traffic with 429.",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ensure_loopback(args.url)
    if args.minutes <= 0 or args.concurrency < 1 or args.hostile_every < 1:
        raise SystemExit("--minutes must be > 0, --concurrency and --hostile-every >= 1")
    if not 0 <= args.warmup_minutes < args.minutes:
        raise SystemExit("--warmup-minutes must be >= 0 and shorter than --minutes")
    return asyncio.run(
        soak(
            args.url,
            args.minutes,
            args.concurrency,
            args.hostile_every,
            args.max_tokens,
            args.api_key,
            args.window_minutes * 60,
            args.warmup_minutes * 60,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
