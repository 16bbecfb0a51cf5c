"""AWQ clip search: AutoAWQ 0.2.9's `_compute_best_clip` against awq-serve's replacement.

Times both on the demo model's layer shapes (SmolLM2-135M: hidden 576, MLP 1536; group 64) with
4096 calibration tokens, float32 on CPU as the pipeline runs there. AutoAWQ samples 512 of the
tokens; the replacement uses all of them through each group's Gram matrix. Each choice is then
scored out of sample: the output error on another 4096 tokens from the same distribution that
neither search saw (in-sample error is printed too, for comparison).
Run `python -m benchmarks.clip_speed --help`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from quantization.autoawq_patches import ORIGINALS, _compute_best_clip
from quantization.quant_math import pseudo_quantize

# (name, out_features, in_features) of the Linear layers AutoAWQ clips in one demo decoder layer.
DEMO_LAYERS = (
    ("o_proj", 576, 576),
    ("gate_proj", 1536, 576),
    ("down_proj", 576, 1536),
)


def _quantizer(w_bit: int, group_size: int, zero_point: bool):
    """An AutoAWQ quantizer with only the fields the clip search reads."""
    from awq.quantize.quantizer import AwqQuantizer

    q = AwqQuantizer.__new__(AwqQuantizer)
    q.w_bit, q.group_size, q.zero_point = w_bit, group_size, zero_point
    return q


def layer_inputs(out_f: int, in_f: int, tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Weights and activations with a few large input channels, as in real LLM activations."""
    g = torch.Generator().manual_seed(seed)
    channel_scale = torch.exp(torch.randn(in_f, generator=g))  # (in,) log-normal outliers
    x = torch.randn(tokens, in_f, generator=g) * channel_scale  # (tokens, in)
    w = torch.randn(out_f, in_f, generator=g) * 0.02  # (out, in)
    return w, x


def output_error(w: torch.Tensor, x: torch.Tensor, max_val: torch.Tensor, quantizer) -> float:
    """Mean squared output error over all tokens of the clipped, quantized weights."""
    rows, cols = w.shape
    wg = w.reshape(rows, -1, quantizer.group_size)  # (out, n_group, group)
    clipped = torch.clamp(wg, -max_val, max_val).reshape(rows, cols)
    q = pseudo_quantize(clipped, quantizer.w_bit, quantizer.group_size, quantizer.zero_point)[0]
    return ((x @ (q - w).T) ** 2).mean().item()


def timed(fn: Callable[..., torch.Tensor], *args: object) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.clip_speed", description=__doc__)
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens per layer")
    p.add_argument("--held-out", type=int, default=4096, help="unseen tokens errors are scored on")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--w-bit", type=int, default=4, choices=(3, 4))
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quantizer = _quantizer(args.w_bit, args.group_size, zero_point=True)
    original = ORIGINALS["_compute_best_clip"]
    print(f"{args.tokens} tokens, w{args.w_bit} g{args.group_size}, "
          f"{torch.get_num_threads()} torch threads")  # fmt: skip
    print("| layer | shape (out x in) | AutoAWQ s | awq-serve s | speed-up | held-out err AutoAWQ "
          "| held-out err awq-serve | in-sample err AutoAWQ | in-sample err awq-serve |\n"
          "|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    totals = [0.0, 0.0]
    for seed, (name, out_f, in_f) in enumerate(DEMO_LAYERS):
        w, x_all = layer_inputs(out_f, in_f, args.tokens + args.held_out, seed)
        x, unseen = x_all[: args.tokens], x_all[args.tokens :]  # same distribution, disjoint
        theirs, t_theirs = timed(original, quantizer, w, x)
        ours, t_ours = timed(_compute_best_clip, quantizer, w, x)
        totals[0] += t_theirs
        totals[1] += t_ours
        print(f"| {name} | {out_f}x{in_f} | {t_theirs:.2f} | {t_ours:.3f} | "
              f"{t_theirs / t_ours:.0f}x | {output_error(w, unseen, theirs, quantizer):.6g} | "
              f"{output_error(w, unseen, ours, quantizer):.6g} | "
              f"{output_error(w, x, theirs, quantizer):.6g} | "
              f"{output_error(w, x, ours, quantizer):.6g} |")  # fmt: skip
    print(f"| total | | {totals[0]:.2f} | {totals[1]:.3f} | {totals[0] / totals[1]:.0f}x "
          "| | | | |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
