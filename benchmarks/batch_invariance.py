"""Per operation, how much a row's result moves when it is computed inside a batch.

One chat prompt is run alone, then inside batches of 2, 5 and 16 mixed prompts at random places
in the packed prefill; for each operation of the decode step the script prints the largest
difference of that prompt's row between alone and batched, with the runner in batch-variant mode
(one attention call per layer over the batch's longest span, dense matmuls as one call: how the
engine ran before) and in batch-invariant mode (the default). It ends with the whole model:
logits and greedy tokens over several decode steps.

    python -m benchmarks.batch_invariance [--model smollm2-135m-instruct] [--repetitions 5]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path

import torch

from deployments.engine.hardware import cpu_features
from deployments.engine.model_runner import ModelRunner, load_model, plan_attention, rms_norm
from deployments.engine.prompts import chat_prompt_ids
from deployments.model_source import resolve_model_dir

QUESTIONS = [
    "What is the capital of France?",
    "Name a fruit.",
    "Say hello in French.",
    "What color is grass?",
    "Write a haiku about the sea.",
    "What is 3 times 3?",
    "Explain gravity to a child in one sentence.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "Translate 'cat' to Spanish.",
    "Describe a sunset in five words.",
    "What is Python?",
    "Give me a synonym for happy.",
    "How many legs has a spider?",
    "What is the boiling point of water?",
    "Suggest a name for a dog.",
]

Batch = tuple[list[list[int]], int]  # prompts, the row of the probed prompt


def batches(prompts: list[list[int]], repetitions: int, seed: int = 0) -> list[Batch]:
    rng = random.Random(seed)
    out = []
    for _ in range(repetitions):
        for size in (2, 5, 16):
            mates = [prompts[i] for i in rng.sample(range(1, len(prompts)), size - 1)]
            row = rng.randrange(size)
            out.append(([*mates[:row], prompts[0], *mates[row:]], row))
    return out


def decode_inputs(runner: ModelRunner, batch: list[list[int]]) -> torch.Tensor:
    """Prefill the batch into slots 0.., return the hidden states its first decode step reads."""
    runner.reset(forget_prefixes=True)
    first = runner.prefill(0, batch).argmax(-1)
    return runner.model.model.embed_tokens(first.unsqueeze(1))  # (batch, 1, hidden)


def op_table(runner: ModelRunner, h: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """Operations of layer 0's decode step on the current cache, each returning (batch, ...)."""
    layer, n = runner.model.model.layers[0], h.shape[0]
    x = rms_norm(layer.input_layernorm, h)
    positions = [length - 1 for length in runner.cache.lengths[:n]]  # attend over the prompt

    def attention() -> torch.Tensor:
        q = runner.qkv[0](x)[..., : runner.n_heads * runner.head_dim]
        q = q.reshape(n, runner.n_heads, runner.head_dim)
        at = plan_attention(
            list(range(n)), positions, 1, runner.max_len, runner.device, runner.batch_invariant
        )
        layout = type("At", (), {"groups": at, "tile_rows": 1})
        kc, vc = runner.cache.k[0], runner.cache.v[0]
        return runner._cached_attention(q, kc, vc, layout)  # type: ignore[arg-type]

    return {
        "rms_norm": lambda: x,
        "q/k/v matmul": lambda: runner.qkv[0](x),
        "attention (SDPA over the KV cache)": attention,
        "o_proj matmul": lambda: runner.o_proj[0](attention().view(n, 1, -1)),
        "gate/up matmul": lambda: runner.gate_up[0](x),
        "output projection (lm_head)": lambda: runner._logits(x[:, -1]),
    }


@torch.inference_mode()
def per_op(runner: ModelRunner, prompts: list[list[int]], cases: list[Batch]) -> dict[str, float]:
    alone = {k: f()[0] for k, f in op_table(runner, decode_inputs(runner, [prompts[0]])).items()}
    worst = dict.fromkeys(alone, 0.0)
    for batch, row in cases:
        ops = op_table(runner, decode_inputs(runner, batch))
        for name, f in ops.items():
            diff = (f()[row].float() - alone[name].float()).abs().max().item()
            worst[name] = max(worst[name], diff)
    return worst


@torch.inference_mode()
def whole_model(
    runner: ModelRunner, prompts: list[list[int]], cases: list[Batch], steps: int
) -> tuple[float, int]:
    """(max |logit diff|, greedy runs that differ) over `steps` decode steps."""

    def run(batch: list[list[int]], row: int) -> torch.Tensor:
        runner.reset(forget_prefixes=True)
        logits = runner.prefill(0, batch)
        rows = [logits[row]]
        for _ in range(steps):
            logits = runner.decode(logits.argmax(-1).tolist())
            rows.append(logits[row])
        return torch.stack(rows)

    alone = run([prompts[0]], 0)
    worst, flips = 0.0, 0
    for batch, row in cases:
        got = run(batch, row)
        worst = max(worst, (got - alone).abs().max().item())
        flips += int(not torch.equal(got.argmax(-1), alone.argmax(-1)))
    return worst, flips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry ref or folder")
    ap.add_argument("--registry", type=Path, default=Path("models"))
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16, help="decode steps for the whole model")
    args = ap.parse_args()
    model_dir, ref = resolve_model_dir(args.model, args.registry, verify=False)
    cpu = cpu_features()
    print(f"{ref} on {cpu['model']} ({cpu['torch_capability']}; {' '.join(cpu['flags'])})")
    results = {}
    for invariant in (False, True):
        model, tokenizer = load_model(model_dir, torch.device("cpu"))
        runner = ModelRunner(model, max_slots=16, max_len=1024, batch_invariant=invariant)
        prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
        cases = batches(prompts, args.repetitions)
        ops = per_op(runner, prompts, cases)
        ops["whole model: logits"], flips = whole_model(runner, prompts, cases, args.steps)
        results[invariant] = (ops, f"{flips} of {len(cases)}")
    print(f"\nmax |alone - batched| over {len(cases)} batches of 2, 5 and 16 prompts")
    print("| operation | batch-variant (before) | batch-invariant (now) |\n|---|---|---|")
    for name in results[True][0]:
        print(f"| {name} | {results[False][0][name]:.3g} | {results[True][0][name]:.3g} |")
    print(f"| whole model: greedy runs that differ | {results[False][1]} | {results[True][1]} |")


if __name__ == "__main__":
    main()
