"""Host time of one decode step: a hollow 7B-shaped model, where kernels cost ~nothing, and the
real demo model, at batch 1 and 16.

A 7B AWQ model on a GPU has a ~4 ms bandwidth-bound step, so whatever the host spends issuing a
step's ~30 layers of small ops is the ceiling on decode speed there. The hollow model has
Llama-2-7B's depth and head layout (32 layers, 32 query heads, 8 KV heads) but a hidden size of
128, so its step time on CPU is almost all Python and op dispatch: the CPU stand-in for the GPU
question. The step timed is the one the scheduler calls (`ModelRunner.decode`), over sequences
prefilled to `--context` tokens.

    python -m benchmarks.step_overhead                 # table of ms/step
    python -m benchmarks.step_overhead --profile 10    # plus top ops by self CPU time
    python -m benchmarks.step_overhead --context 60 --context-step 9   # staggered lengths
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deployments.engine.model_runner import ModelRunner, load_model

DEMO = "smollm2-135m-instruct"
REGISTRY_ROOT = Path(__file__).resolve().parent.parent / "models"


def hollow_llama(layers: int = 32, vocab: int = 512) -> nn.Module:
    """Llama-2-7B's depth and heads (32 x 32 query heads, 8 KV heads) with head_dim 4, random
    fp32 weights built in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=4,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(cfg).eval()


def demo_model() -> nn.Module:
    from deployments.model_source import resolve_model_dir

    path, _ = resolve_model_dir(DEMO, REGISTRY_ROOT, verify=False)
    return load_model(path, torch.device("cpu"))[0]


@dataclass
class StepTiming:
    model: str
    batch: int
    median_ms: float
    p90_ms: float


def prepared_runner(
    model: nn.Module, batch: int, context: int, context_step: int = 0, **runner_kw
) -> ModelRunner:
    """A runner whose slot i (< batch) holds `context + i * context_step` prefilled tokens: one
    length, or lengths staggered over several key buckets as under a stream of requests."""
    runner = ModelRunner(model, max_slots=max(batch, 16), max_len=2048, **runner_kw)
    vocab = model.config.vocab_size
    lengths = [context + i * context_step for i in range(batch)]
    prompts = [[(7 * i + 13 * j) % vocab for j in range(n)] for i, n in enumerate(lengths)]
    runner.prefill(0, prompts)
    return runner


def time_decode(runner: ModelRunner, batch: int, steps: int, warmup: int) -> list[float]:
    """Wall time of each of `steps` decode steps (after `warmup`), in ms; each step keeps the
    slots sorted by key bucket first, as the scheduler does."""
    tokens = [1] * batch
    out = []
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        runner.order_slots(batch)
        runner.decode(tokens)
        if k >= warmup:
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def profile_decode(runner: ModelRunner, batch: int, steps: int, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    tokens = [1] * batch
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.decode(tokens)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=64, help="prefilled tokens per sequence")
    ap.add_argument(
        "--context-step", type=int, default=0, help="sequence i gets context + i * this"
    )
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-demo", action="store_true", help="hollow model only")
    ap.add_argument("--profile", type=int, default=0, help="profiled steps per row (0: none)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--decode-step", default="auto", help="auto, eager, compile or cuda_graph")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [("hollow-7B-shape", hollow_llama())]
    if not args.no_demo:
        models.append((DEMO, demo_model()))
    runner_kw = {"decode_step": args.decode_step} if args.decode_step != "auto" else {}
    rows, profiles = [], []
    for name, model in models:
        for batch in args.batches:
            runner = prepared_runner(model, batch, args.context, args.context_step, **runner_kw)
            ms = time_decode(runner, batch, args.steps, args.warmup)
            rows.append(
                StepTiming(name, batch, statistics.median(ms), statistics.quantiles(ms, n=10)[-1])
            )
            if args.profile:
                profiles.append((name, batch, profile_decode(runner, batch, args.profile, 15)))
    print(
        f"threads={torch.get_num_threads()} context={args.context}+i*{args.context_step} "
        f"steps={args.steps} "
        f"decode_step={args.decode_step}"
    )
    print(f"{'model':<24} {'batch':>5} {'median ms/step':>15} {'p90 ms/step':>12}")
    for r in rows:
        print(f"{r.model:<24} {r.batch:>5} {r.median_ms:>15.2f} {r.p90_ms:>12.2f}")
    for name, batch, table in profiles:
        print(f"\n== {name} batch {batch}: top ops by self CPU time ({args.profile} steps)")
        print(table)


if __name__ == "__main__":
    main()
