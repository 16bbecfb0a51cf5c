"""Projections that read the same input (q/k/v, gate/up) run as one matmul, split after.

One wide matmul instead of three narrow ones halves the per-call cost that dominates small
decode batches (activation casts, kernel launches) — vLLM's QKVParallelLinear and
MergedColumnParallelLinear do the same. The fused weight is built from the loaded modules, and each
original keeps a *view* of its rows, so the model's own forward still works and no weight is
stored twice. Kernels whose packed layout is not known to concatenate row-wise fall back to
calling the projections one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

Projection = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def _int4_cpu_ready(m: nn.Module) -> bool:
    """gptqmodel's CPU AWQ kernel, already repacked for `_weight_int4pack_mm_for_cpu`.

    The module repacks itself on its first CPU forward, so run one before checking.
    """
    if type(m).__name__ != "TorchAtenAwqLinear":
        return False
    if getattr(m, "linear_mode", None) is None:
        with torch.inference_mode():
            m(torch.zeros(1, m.in_features, dtype=torch.float32))
    return getattr(m, "linear_mode", None) == "inference" and not getattr(m, "adapter", None)


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
    """Concatenated `_weight_int4pack_mm_for_cpu` weights (packed rows = output features)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.group_size = modules[0].group_size
        self.sizes = [m.out_features for m in modules]
        self.qweight = torch.cat([m.qweight for m in modules], 0)
        self.scales_and_zeros = torch.cat([m.scales_and_zeros for m in modules], 1).contiguous()
        self.bias = _concat_bias(modules)
        start = 0
        for m, n in zip(modules, self.sizes, strict=True):
            m.qweight = self.qweight[start : start + n]  # a view: no second copy of the weights
            start += n

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shape = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.qweight, self.group_size, self.scales_and_zeros
        ).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return tuple(part.reshape(*shape, -1) for part in out.split(self.sizes, dim=-1))


class _DenseFused:
    """Concatenated plain `nn.Linear` weights (FP16/FP32 models, any device)."""

    def __init__(self, modules: Sequence[nn.Linear]) -> None:
        self.sizes = [m.out_features for m in modules]
        self.weight = torch.cat([m.weight.data for m in modules], 0)
        self.bias = _concat_bias(modules)
        start = 0
        for m, n in zip(modules, self.sizes, strict=True):
            m.weight.data = self.weight[start : start + n]
            start += n

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = nn.functional.linear(x, self.weight, self.bias)
        return tuple(out.split(self.sizes, dim=-1))


def fuse_projections(modules: Sequence[nn.Module]) -> Projection:
    """One callable returning each module's output, fused where the kernel allows it."""
    if all(_int4_cpu_ready(m) for m in modules) and len({m.group_size for m in modules}) == 1:
        return _Int4CpuFused(modules)
    if all(type(m) is nn.Linear for m in modules):
        return _DenseFused(modules)  # type: ignore[arg-type]
    return lambda x: tuple(m(x) for m in modules)
