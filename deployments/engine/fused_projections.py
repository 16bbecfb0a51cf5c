"""Projections that read the same input (q/k/v, gate/up) run as one matmul.

One wide matmul instead of three narrow ones halves the per-call cost that dominates small
decode batches (activation casts, kernel launches) — vLLM's QKVParallelLinear and
MergedColumnParallelLinear do the same. The fused weight is built from the loaded modules, and each
original keeps a *view* of its rows, so the model's own forward still works and no weight is
stored twice. Kernels whose packed layout is not known to concatenate row-wise fall back to
calling the projections one by one. A projection returns the parts side by side in one tensor
(..., sum of out_features): the caller slices what it needs, which in a decode step is fewer ops
than splitting into one tensor per part and reshaping each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

Projection = Callable[[torch.Tensor], torch.Tensor]


def _int4_cpu_ready(m: nn.Module) -> bool:
    """gptqmodel's CPU AWQ kernel, already repacked for `_weight_int4pack_mm_for_cpu`.

    The module repacks itself on its first CPU forward, so run one before checking.
    """
    if type(m).__name__ != "TorchAtenAwqLinear":
        return False
    if getattr(m, "linear_mode", None) is None:
        with torch.inference_mode():
            m(torch.zeros(1, m.in_features, dtype=torch.float32))
    ready = getattr(m, "linear_mode", None) == "inference" and not getattr(m, "adapter", None)
    return ready and m.qweight.numel() > 0  # empty: repacked for the native kernel already


def _concat_bias(modules: Sequence[nn.Module]) -> torch.Tensor | None:
    """The fused bias (zeros for parts without one), or None when no part has a bias."""
    biases = [getattr(m, "bias", None) for m in modules]
    present = [b for b in biases if b is not None]
    if not present:
        return None
    return torch.cat(
        [
            b.data if b is not None else present[0].new_zeros(m.out_features)
            for m, b in zip(modules, biases, strict=True)
        ]
    )


class _Int4CpuFused:
    """Concatenated `_weight_int4pack_mm_for_cpu` weights (packed rows = output features).

    `kernel` (activations rounded to bf16 in, the bf16-rounded result out, in the input's
    dtype) is ATen's until the runner swaps in a faster one over the same weights
    (`native_int4.use_native_int4`); every caller goes through it, so a model's prefill and
    decode steps multiply alike.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.group_size = modules[0].group_size
        self.sizes = [m.out_features for m in modules]
        self.qweight = torch.cat([m.qweight for m in modules], 0)
        self.scales_and_zeros = torch.cat([m.scales_and_zeros for m in modules], 1).contiguous()
        self.bias = _concat_bias(modules)
        self.kernel: Callable[[torch.Tensor], torch.Tensor] = self.aten
        self.native: tuple[torch.Tensor, ...] = ()  # the native kernel's weights, once repacked
        start = 0
        for m, n in zip(modules, self.sizes, strict=True):
            m.qweight = self.qweight[start : start + n]  # a view: no second copy of the weights
            m.awq_serve_fused = self  # a second runner on the model reuses this projection
            start += n

    def aten(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.qweight, self.group_size, self.scales_and_zeros
        ).to(x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # decode steps pass 2-D
        out = self.kernel(flat).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out if x.dim() == 2 else out.view(*x.shape[:-1], -1)


def tiled(
    matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_rows: int
) -> torch.Tensor:
    """`matmul` of x (rows, in) in calls of exactly `tile_rows` rows (the last one padded).

    A dense CPU GEMM's result for a row depends on how many rows the call has (MKL picks its
    blocking by shape: 1 vs 2 rows moved outputs by 2e-5, measured), but not on the row's place
    within a call of fixed shape, so fixed tiles make a row's result independent of batch-mates.
    """
    rows = x.shape[0]
    pad = -rows % tile_rows
    if rows < tile_rows:  # one tile (small decode batches): 3 ops instead of 6
        return matmul(F.pad(x, (0, 0, 0, pad)))[:rows]
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    return torch.cat([matmul(t) for t in x.split(tile_rows)])[:rows]


class _DenseFused:
    """Concatenated plain `nn.Linear` weights (FP16/FP32 models, any device)."""

    def __init__(self, modules: Sequence[nn.Linear], tile_rows: int | None = None) -> None:
        self.tile_rows = tile_rows
        self.sizes = [m.out_features for m in modules]
        self.weight = torch.cat([m.weight.data for m in modules], 0)
        self.bias = _concat_bias(modules)
        start = 0
        for m, n in zip(modules, self.sizes, strict=True):
            m.weight.data = self.weight[start : start + n]
            start += n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        linear = partial(nn.functional.linear, weight=self.weight, bias=self.bias)
        if self.tile_rows is None:
            return linear(x)
        out = tiled(linear, x.reshape(-1, x.shape[-1]), self.tile_rows)
        return out.reshape(*x.shape[:-1], -1)


def fuse_projections(modules: Sequence[nn.Module], tile_rows: int | None = None) -> Projection:
    """One callable returning the modules' outputs concatenated on the last dimension, computed
    as one matmul where the kernel allows it.

    `tile_rows` makes dense matmuls batch-invariant (see `tiled`). The CPU int4 kernel needs no
    tiles: it computes each row alone (bit-equal for 1..1024 rows, measured).
    """
    owners = {id(getattr(m, "awq_serve_fused", None)) for m in modules}
    owner = getattr(modules[0], "awq_serve_fused", None)
    if owner is not None and len(owners) == 1 and len(owner.sizes) == len(modules):
        return owner  # fused (and maybe repacked) by an earlier runner over the same model
    if all(_int4_cpu_ready(m) for m in modules) and len({m.group_size for m in modules}) == 1:
        return _Int4CpuFused(modules)
    if all(type(m) is nn.Linear for m in modules):
        return _DenseFused(modules, tile_rows)  # type: ignore[arg-type]
    if len(modules) == 1:
        return modules[0]
    return lambda x: torch.cat([m(x) for m in modules], dim=-1)
