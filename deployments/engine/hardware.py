"""What the host offers and which kernel paths the loaded model takes, as data.

A throughput figure or a numerical difference only means something next to the CPU that produced
it (AVX2-only and AVX-512/AMX hosts take different kernel paths), so a replica reports this at
start-up and in its `/health` detail.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The instruction-set extensions that change which CPU kernels torch and oneDNN run.
_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def cpu_features(cpuinfo: str | None = None) -> dict[str, Any]:
    """CPU model, the relevant ISA flags, and torch's dispatch level (e.g. AVX512)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name", "unknown"),
        "flags": [f for f in _FLAGS if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def kernel_paths(
    model: nn.Module, lm_head: str, batch_invariant: bool, decode_step: str, int4: str = ""
) -> dict[str, Any]:
    """Linear kernel classes by count, the int4 matmul the engine runs (if any), the output
    projection's path, attention, invariance."""
    linears = Counter(
        type(m).__name__
        for name, m in model.named_modules()
        if ".layers." in name and hasattr(m, "in_features")
    )
    return {
        "linear": dict(linears),
        **({"int4": int4} if int4 else {}),
        "lm_head": lm_head,
        "attention": attention_path(model.device.type, decode_step),
        "batch_invariant": batch_invariant,
    }


def attention_path(device_type: str, decode_step: str) -> str:
    if device_type != "cpu":
        return "sdpa"
    decode = "fused native kernel" if decode_step == "native" else "batched matmuls"
    return f"sdpa; decode: {decode}"
