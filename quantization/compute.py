"""Where model math runs: the one device/dtype decision shared by quantization and serving."""

from __future__ import annotations

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is an error, not a fallback."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is visible")
    return torch.device(requested)


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on GPU (the AWQ kernels' dtype); fp32 on CPU, where fp16 matmuls are slow."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32
