"""The CPU int4 matmul, ATen's kernel against the native AVX512-BF16 one, on the demo model's
four projection shapes: median microseconds a call (weights warm in cache) and how far each is
from the float64 product.

    python -m benchmarks.int4_kernel [--rows 1 3 16 64] [--calls 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from benchmarks.step_overhead import demo_model
from deployments.engine.fused_projections import fuse_projections
from deployments.engine.native_int4 import read_nibbles
from deployments.engine.native_step import load_extension


def median_us(call: Callable[[], object], calls: int) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def float64_reference(
    x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int
) -> torch.Tensor:
    s = sz.double().repeat_interleave(group, 0)  # (in, out, 2)
    return x.double() @ ((q.double() - 8) * s[..., 0].T + s[..., 1].T).T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 3, 16, 64])
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    ext = load_extension()
    if not ext.int4_bf16_available:
        raise SystemExit("this CPU has no AVX512-BF16: the native int4 kernel is not built here")
    layer = demo_model().model.layers[0]
    shapes = {
        "qkv": [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
        "o": [layer.self_attn.o_proj],
        "gate_up": [layer.mlp.gate_proj, layer.mlp.up_proj],
        "down": [layer.mlp.down_proj],
    }
    print(f"threads={torch.get_num_threads()}")
    print(
        f"{'projection':<10} {'out x in':>11} {'rows':>5} {'ATen us':>9} {'native us':>10} "
        f"{'speed-up':>9} {'max err ATen':>13} {'max err native':>15} {'outputs differ':>15}"
    )
    for name, modules in shapes.items():
        p = fuse_projections(modules)
        q, sz, group = read_nibbles(p), p.scales_and_zeros, p.group_size
        n, k = q.shape
        packed = ext.int4_pack(q, sz, group)
        for rows in args.rows:
            x = torch.randn(rows, k).to(torch.bfloat16)
            exact = float64_reference(x, q, sz, group)
            run_aten = partial(p.aten, x)
            run_native = partial(ext.int4_mm, x, *packed, n, group)
            aten, native = run_aten(), run_native()
            t_aten, t_native = median_us(run_aten, args.calls), median_us(run_native, args.calls)
            print(
                f"{name:<10} {f'{n}x{k}':>11} {rows:>5} {t_aten:>9.1f} {t_native:>10.1f} "
                f"{t_aten / t_native:>8.2f}x {(aten.double() - exact).abs().max():>13.2e} "
                f"{(native.double() - exact).abs().max():>15.2e} "
                f"{(aten != native).float().mean():>14.3%}"
            )


if __name__ == "__main__":
    main()
