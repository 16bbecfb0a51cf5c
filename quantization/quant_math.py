"""Quantization primitives as plain functions on tensors (no model, no Ray).

`pseudo_quantize` reproduces AutoAWQ's `pseudo_quantize_tensor` exactly, so RTN baselines and the
clip search below score weights the same way AutoAWQ's packer will store them.
"""

from __future__ import annotations

import torch


class GroupSizeError(ValueError):
    """A group size that does not divide a layer's input features."""


def valid_group_sizes(features: int, candidates: tuple[int, ...] = (128, 64, 32)) -> list[int]:
    """Group sizes from `candidates` that divide `features`."""
    return [g for g in candidates if features % g == 0]


def check_group_size(group_size: int, in_features: dict[str, int], model_name: str) -> None:
    """Raise a message the user can act on when `group_size` does not divide every input width."""
    bad = {name: n for name, n in in_features.items() if n % group_size}
    if not bad:
        return
    sizes = sorted(set(in_features.values()))
    usable = [g for g in (128, 64, 32, 16) if all(n % g == 0 for n in sizes)]
    name, n = next(iter(bad.items()))
    raise GroupSizeError(
        f"group size {group_size} does not divide {name} = {n} of model {model_name}; "
        f"use {' or '.join(map(str, usable)) or 'a divisor of ' + str(n)}"
    )


def pseudo_quantize(
    w: torch.Tensor, w_bit: int, group_size: int, zero_point: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest quantize then dequantize `w` per group of its last dimension.

    Returns (dequantized weight, scales (rows, n_group), zeros (rows, n_group) or None).
    """
    shape = w.shape
    rows = shape[0]
    g = w.reshape(-1, group_size)  # (rows * n_group, group_size)
    if zero_point:
        max_val = g.amax(dim=1, keepdim=True)
        min_val = g.amin(dim=1, keepdim=True)
        max_int = 2**w_bit - 1
        scales = (max_val - min_val).clamp(min=1e-5) / max_int
        zeros = (-torch.round(min_val / scales)).clamp_(0, max_int)
        g = (torch.clamp(torch.round(g / scales) + zeros, 0, max_int) - zeros) * scales
        zeros = zeros.view(rows, -1)
    else:
        max_val = g.abs().amax(dim=1, keepdim=True).clamp(min=1e-5)
        max_int = 2 ** (w_bit - 1) - 1
        scales = max_val / max_int
        zeros = None
        g = torch.clamp(torch.round(g / scales), -max_int - 1, max_int) * scales
    return g.reshape(shape), scales.view(rows, -1), zeros


def group_gram(x: torch.Tensor, group_size: int, chunk_tokens: int = 4096) -> torch.Tensor:
    """Per-group second moment of the inputs: (n_group, group_size, group_size), float32.

    The output error of a group's weight change `d` over these inputs is `d @ H_g @ d`, so the clip
    search needs only this small matrix, not the (tokens, out, groups) products AutoAWQ builds.
    Accumulated `chunk_tokens` at a time: only one chunk is ever converted to float32, so an 8B
    model's `down_proj` input (65k tokens x 14336 in fp16) does not become 3.8 GB at once.
    """
    x = x.reshape(-1, x.shape[-1])  # (tokens, in), any dtype
    n_group = x.shape[1] // group_size
    gram = torch.zeros(n_group, group_size, group_size, dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], chunk_tokens):
        part = x[start : start + chunk_tokens].float()
        xg = part.reshape(part.shape[0], n_group, group_size).transpose(0, 1)  # (n_group, t, gs)
        gram.baddbmm_(xg.transpose(1, 2), xg)
    return gram / max(1, x.shape[0])


def search_clip(
    w: torch.Tensor,
    gram: torch.Tensor,
    w_bit: int,
    group_size: int,
    zero_point: bool,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """AWQ's clip search: per (row, group), the max |w| that minimises the output error.

    Same grid and objective as AutoAWQ's `_compute_best_clip` (mean squared output error per group
    over the calibration tokens), evaluated through the Gram matrix. Returns (rows, n_group, 1).
    """
    rows, cols = w.shape
    n_group = cols // group_size
    w = w.float()
    wg = w.reshape(rows, n_group, group_size)
    org_max = wg.abs().amax(dim=-1, keepdim=True)  # (rows, n_group, 1)
    best_max = org_max.clone()
    min_err = torch.full_like(org_max, float("inf"))
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i / n_grid)
        clipped = torch.clamp(wg, -max_val, max_val)
        q = pseudo_quantize(clipped.reshape(rows, cols), w_bit, group_size, zero_point)[0]
        d = (q.reshape(rows, n_group, group_size) - wg).transpose(0, 1)  # (n_group, rows, gs)
        err = (torch.bmm(d, gram) * d).sum(-1).transpose(0, 1).unsqueeze(-1)  # (rows, n_group, 1)
        better = err < min_err
        min_err[better] = err[better]
        best_max[better] = max_val[better]
    return best_max
