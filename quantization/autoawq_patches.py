"""The one place where awq-serve changes AutoAWQ 0.2.9's behaviour; applied on import.

1. Scale-search restore bug. `AwqQuantizer._compute_best_scale` snapshots the block's weights with
   `{k: v.cpu() ...}` and restores them after each grid point. On CPU `.cpu()` returns the same
   tensor, so the snapshot aliases the live weights and nothing is restored: every searched scale
   is applied on top of the previous ones. On the demo model that took held-out perplexity from
   13.19 (FP16) to 211,588. The replacement snapshots with `clone()`; on GPU it is identical.
2. Clip-search speed. `_compute_best_clip` builds (tokens, out, groups, group_size) products for
   every grid point. The replacement evaluates the same objective through each group's input Gram
   matrix (`quant_math.search_clip`), on all calibration tokens instead of a 512-token sample:
   on the demo model's shapes and 2 CPU cores, 0.2-0.8 s per Linear instead of 14-19 s, with a
   slightly lower output error (`python -m benchmarks.clip_speed`).
3. Scale-search cost. Each of the 20 grid points re-runs the block on every calibration token, which
   is ~78% of the job on CPU and grows with the calibration set. `scale_search_sequences` caps the
   sequences the loss is measured on (evenly spaced); the activation statistics that define the
   candidate scales still use every token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from awq.quantize.quantizer import AwqQuantizer
from torch import nn

from quantization.quant_math import group_gram, search_clip

_PATCHED_MARK = "_awq_serve_patched"
_scale_search_sequences: int | None = None


@contextmanager
def scale_search_sequences(limit: int | None) -> Iterator[None]:
    """Measure the scale-search loss on at most `limit` calibration sequences (None: all)."""
    global _scale_search_sequences
    previous, _scale_search_sequences = _scale_search_sequences, limit
    try:
        yield
    finally:
        _scale_search_sequences = previous


def _loss_subset(x: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _scale_search_sequences is None or x.shape[0] <= _scale_search_sequences:
        return x, reference
    idx = torch.linspace(0, x.shape[0] - 1, _scale_search_sequences).round().long()
    return x[idx], reference[idx]


@torch.no_grad()
def _compute_best_scale(
    self: AwqQuantizer,
    x: torch.Tensor,
    w_mean: torch.Tensor,
    x_mean: torch.Tensor,
    module2inspect: nn.Module,
    linears2scale: list[nn.Linear],
    fp16_output: torch.Tensor,
    kwargs: dict | None = None,
) -> torch.Tensor:
    """AutoAWQ's grid search over s = x_mean^r / w_mean^(1-r), with a real weight snapshot."""
    kwargs = kwargs or {}
    x, fp16_output = _loss_subset(x, fp16_output)
    n_grid = 20
    snapshot = {k: v.detach().clone() for k, v in module2inspect.state_dict().items()}
    x_mean = x_mean.view(-1).to(x.device)
    w_mean = w_mean.view(-1).to(x.device)
    best_error, best_scales = float("inf"), None
    for step in range(n_grid):
        ratio = step / n_grid
        if self.duo_scaling:
            scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        else:
            scales = x_mean.pow(ratio).clamp(min=1e-4).view(-1)
        scales = scales / (scales.max() * scales.min()).sqrt()
        scales[torch.isinf(scales) | torch.isnan(scales)] = 1
        scales_view = scales.view(1, -1)
        for fc in linears2scale:
            fc.weight.mul_(scales_view)
            fc.weight.data = self.pseudo_quantize_tensor(fc.weight.data)[0] / scales_view
        out = self._module_forward(x, module2inspect, kwargs)
        out = out.clip(torch.finfo(out.dtype).min, torch.finfo(out.dtype).max)
        loss = self._compute_loss(fp16_output, out, x.device)
        if loss < best_error:
            best_error, best_scales = loss, scales.clone()
        module2inspect.load_state_dict(snapshot)
    if best_scales is None:
        raise RuntimeError(f"AWQ scale search found no finite loss for {type(module2inspect)}")
    return best_scales.detach().cpu()


@torch.no_grad()
def _compute_best_clip(
    self: AwqQuantizer,
    w: torch.Tensor,
    input_feat: torch.Tensor,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    n_sample_token: int = 512,
) -> torch.Tensor:
    """Same contract as AutoAWQ's: (out, n_group, 1) max |w| per group.

    `n_sample_token` is deliberately unused: the Gram matrix costs the same memory for any number
    of tokens, so every calibration token is used, not AutoAWQ's 512-token sample. Whether that
    generalises is measured on tokens neither search saw (`python -m benchmarks.clip_speed`).
    """
    group_size = self.group_size if self.group_size > 0 else w.shape[1]
    gram = group_gram(input_feat.to(w.device), group_size)  # chunked: bounded fp32 memory
    best = search_clip(w, gram, self.w_bit, group_size, self.zero_point, n_grid, max_shrink)
    return best.to(w.dtype)


@contextmanager
def record_search(root: nn.Module) -> Iterator[dict[str, list]]:
    """Capture the scales and clips AutoAWQ's `quantize` searches, named from `root`.

    AutoAWQ applies each decoder layer's search result and drops it; llm-awq returns it as data
    (`run_awq` -> {"scale": ..., "clip": ...}) so one search can be applied and packed later, more
    than once. This wraps the two apply functions AutoAWQ's quantizer calls to keep a copy, in
    llm-awq's format with names relative to `root` (AutoAWQ's own `append_str_prefix` naming).
    """
    import awq.quantize.quantizer as quantizer_module
    from awq.utils.module import get_op_name

    found: dict[str, list] = {"scale": [], "clip": []}
    apply_scale, apply_clip = quantizer_module.apply_scale, quantizer_module.apply_clip

    def recording_scale(module: nn.Module, scales_list: list, input_feat_dict=None) -> None:
        prefix = get_op_name(root, module) + "."
        for prev, names, scales in scales_list:
            found["scale"].append(
                (prefix + prev, [prefix + n for n in names], scales.cpu().clone())
            )
        apply_scale(module, scales_list, input_feat_dict=input_feat_dict)

    def recording_clip(module: nn.Module, clip_list: list) -> None:
        prefix = get_op_name(root, module) + "."
        found["clip"] += [(prefix + name, max_val.cpu().clone()) for name, max_val in clip_list]
        apply_clip(module, clip_list)

    quantizer_module.apply_scale, quantizer_module.apply_clip = recording_scale, recording_clip
    try:
        yield found
    finally:
        quantizer_module.apply_scale, quantizer_module.apply_clip = apply_scale, apply_clip


# AutoAWQ's own methods, kept for parity tests against the replacements.
ORIGINALS = {
    "_compute_best_scale": AwqQuantizer._compute_best_scale,
    "_compute_best_clip": AwqQuantizer._compute_best_clip,
}


def apply_patches() -> None:
    """Install the replacements once (idempotent)."""
    if getattr(AwqQuantizer, _PATCHED_MARK, False):
        return
    AwqQuantizer._compute_best_scale = _compute_best_scale
    AwqQuantizer._compute_best_clip = _compute_best_clip
    setattr(AwqQuantizer, _PATCHED_MARK, True)


apply_patches()
