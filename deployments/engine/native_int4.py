"""The CPU int4 projections on the extension's AVX512-BF16 kernel (`native/int4_bf16.h`).

ATen's int4 kernel dequantizes every weight to fp32 before multiplying; the native one feeds
the nibbles to `vdpbf16ps` as exact bf16 integers and applies a group's scale and zero once to
the group's sums. Same bf16 activations in, same bf16 rounding out: a projection's outputs
differ from ATen's only in the fp32 summation order (one bf16 ulp on 0-0.2% of outputs, both
within 0.55 ulp of float64). Per call it is 1.5-2.7x faster at one row and 1.4-2.4x at 16
(demo shapes, `python -m benchmarks.int4_kernel`).

The weights are repacked once at start-up from ATen's packed layout, which is read back
exactly (and checked by packing the result again with ATen). The model's own modules are
rewired to the repacked weights and ATen's copy is released, so memory does not grow and the
model's forward (the served-path check's reference) multiplies as the engine does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from types import ModuleType

import torch
from torch import nn

from deployments.engine.fused_projections import Projection, _Int4CpuFused
from deployments.engine.native_step import NativeUnavailable, load_extension

log = logging.getLogger(__name__)
ATEN = "aten"
NATIVE = "native avx512-bf16"


def int4pack_nibbles(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """(n, k) uint8 nibbles from `_convert_weight_to_int4pack_for_cpu`'s layout, as ATen writes
    it with `block`-row blocks (64 on AVX-512, 32 otherwise): in a full block, byte (k, j) holds
    rows j (low nibble) and j + block / 2 (high); the last, shorter block holds row pairs
    (2j, 2j + 1) per byte."""
    flat = packed.reshape(-1)
    full = n // block * block
    parts = []
    if full:
        b = flat[: full * k // 2].view(full // block, k, block // 2)
        parts.append(torch.cat([b & 15, b >> 4], -1).permute(0, 2, 1).reshape(full, k))
    if n > full:
        b = flat[full * k // 2 :].view(k, (n - full) // 2)
        parts.append(torch.stack([b & 15, b >> 4], -1).reshape(k, n - full).t())
    return torch.cat(parts).contiguous()


def read_nibbles(p: _Int4CpuFused) -> torch.Tensor:
    """The projection's (out, in) nibbles, exactly: the layout that packs back to ATen's bytes."""
    n, k = p.qweight.shape[0], p.qweight.shape[1] * 2
    for block in (64, 32):
        q = int4pack_nibbles(p.qweight, n, k, block)
        inner_k_tiles = 8  # ignored by the CPU packer; the op still takes it
        again = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), inner_k_tiles)
        if torch.equal(again.reshape(-1), p.qweight.reshape(-1)):
            return q
    raise NativeUnavailable("ATen's int4 packed layout was not recognised")


def _native_matmul(
    ext: ModuleType, packed: tuple, n: int, group_size: int, x: torch.Tensor
) -> torch.Tensor:
    """x in any float dtype, out in x's dtype: both `_Int4CpuFused.kernel`'s contract and
    gptqmodel's `_fused_op_forward`'s."""
    return ext.int4_mm(x.contiguous(), *packed, n, group_size).to(x.dtype)


def _rows(packed: tuple, start: int, n: int) -> tuple:
    """The packed tensors of output rows [start, start + n) (multiples of 16), as views."""
    weights, scale, zero = packed
    blocks = scale.shape[0]
    w = weights.view(blocks, -1)
    return tuple(t.narrow(0, start // 16, n // 16) for t in (w, scale, zero))


def repack(p: _Int4CpuFused, ext: ModuleType) -> tuple:
    """`p`'s weights in the native kernel's layout: (packed nibbles, scales, zeros)."""
    return tuple(ext.int4_pack(read_nibbles(p), p.scales_and_zeros, p.group_size))


def switch(p: _Int4CpuFused, modules: Sequence[nn.Module], packed: tuple, ext: ModuleType) -> None:
    """Point `p` and the modules it fused at the repacked weights; release ATen's."""
    p.native = packed
    p.kernel = partial(_native_matmul, ext, packed, p.scales_and_zeros.shape[1], p.group_size)
    start = 0
    for m, size in zip(modules, p.sizes, strict=True):
        m._fused_op_forward = partial(
            _native_matmul, ext, _rows(packed, start, size), size, p.group_size
        )
        m.qweight = torch.empty(0, dtype=torch.uint8)
        start += size
    p.qweight = torch.empty(0, dtype=torch.uint8)


def use_native_int4(fused: Sequence[tuple[Projection, Sequence[nn.Module]]]) -> str:
    """Repack every int4 projection for the native kernel where this CPU and the extension
    allow it. Returns the int4 kernel the projections now run: 'native avx512-bf16', or
    'aten' with the reason it stayed."""
    int4 = [(p, ms) for p, ms in fused if isinstance(p, _Int4CpuFused) and not p.native]
    if not int4 and any(isinstance(p, _Int4CpuFused) for p, _ in fused):
        return NATIVE  # repacked for an earlier runner over the same model
    if not int4:
        return ""
    try:
        ext = load_extension()
        if not ext.int4_bf16_available:
            raise NativeUnavailable("this CPU has no AVX512-BF16")
        if any(size % 16 for p, _ in int4 for size in p.sizes):
            raise NativeUnavailable("output features not a multiple of 16")
        packs = [repack(p, ext) for p, _ in int4]  # all or none: a failure leaves ATen's
    except (NativeUnavailable, RuntimeError) as e:  # RuntimeError: a shape the packer refuses
        log.info("int4 projections stay on ATen's kernel: %s", e)
        return f"{ATEN} ({e})"
    for (p, modules), packed in zip(int4, packs, strict=True):
        switch(p, modules, packed, ext)
    return NATIVE
