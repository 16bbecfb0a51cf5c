"""The engine alone, in this process (no Ray, no HTTP): the ceiling the served numbers chase.

Same workload as `benchmarks.compare` (closed loop, same prompts, greedy, ignore_eos), so the gap
between this and the served figure is what the serving path costs. Prints tok/s, TTFT and the
decode step time by batch size.

    python -m benchmarks.engine_throughput [--concurrency 16] [--requests 48] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from benchmarks.prompts import pick_prompts
from benchmarks.stats import percentile
from deployments.engine.prompts import chat_prompt_ids
from deployments.engine.scheduler import Engine, EngineConfig, RequestStream
from deployments.model_source import resolve_model_dir
from deployments.protocol import SamplingParams


async def _one(engine: Engine, i: int, prompt: str, max_tokens: int) -> tuple[float, int]:
    stream = RequestStream(f"bench-{i}")
    ids = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": prompt}])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    engine.enqueue(f"bench-{i}", ids, params, stream)
    ttft, tokens = None, 0
    async for event in stream:
        ttft = ttft if ttft is not None else time.perf_counter() - started
        tokens = event.usage.completion_tokens if hasattr(event, "usage") else tokens
    return ttft or 0.0, tokens


async def _closed_loop(
    engine: Engine, prompts: list[str], concurrency: int, max_tokens: int
) -> list[tuple[float, int]]:
    queue = list(enumerate(prompts))
    results: list[tuple[float, int]] = []
    bar = tqdm(total=len(prompts), desc="requests", unit="req")

    async def client() -> None:
        while queue:
            i, prompt = queue.pop(0)
            results.append(await _one(engine, i, prompt, max_tokens))
            bar.update()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    bar.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registry ref or path")
    parser.add_argument("--registry", type=Path, default=Path("models"))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)

    model_dir, ref = resolve_model_dir(args.model, args.registry, verify=False)
    steps: dict[int, list[float]] = defaultdict(list)
    config = EngineConfig(
        model_dir=model_dir, max_running=args.concurrency, cpu_threads=args.threads
    )
    engine = Engine(config, on_step=lambda batch, seconds: steps[batch].append(seconds))
    engine.start()
    steps.clear()  # warm-up is not part of the run
    prompts = pick_prompts(args.requests, seed=0)
    started = time.perf_counter()
    results = asyncio.run(_closed_loop(engine, prompts, args.concurrency, args.max_tokens))
    wall = time.perf_counter() - started
    engine.shutdown(drain_timeout_s=1)

    tokens = sum(n for _, n in results)
    ttfts = sorted(t for t, _ in results)
    print(f"\n{ref}: {args.requests} requests, {args.concurrency} clients, ", end="")
    print(f"{args.max_tokens} tokens")
    print(f"output tokens  {tokens} in {wall:.2f} s = {tokens / wall:.1f} tok/s")
    print(f"TTFT           p50 {percentile(ttfts, 50):.2f} s, p95 {percentile(ttfts, 95):.2f} s")
    print("decode step    batch: median ms (steps)")
    for batch in sorted(steps, reverse=True)[:6]:
        ms = statistics.median(steps[batch]) * 1000
        print(f"               {batch:5d}: {ms:7.1f} ({len(steps[batch])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
