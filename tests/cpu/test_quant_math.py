"""The quantization primitives against AutoAWQ's own implementation."""

from __future__ import annotations

import types

import pytest
import torch

from quantization.autoawq_patches import ORIGINALS
from quantization.quant_math import (
    GroupSizeError,
    check_group_size,
    group_gram,
    pseudo_quantize,
    search_clip,
)


def _autoawq_quantizer(w_bit: int, group_size: int, zero_point: bool):
    from awq.quantize.quantizer import AwqQuantizer

    q = AwqQuantizer.__new__(AwqQuantizer)
    q.w_bit, q.group_size, q.zero_point = w_bit, group_size, zero_point
    return q


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("w_bit", [3, 4])
def test_pseudo_quantize_matches_autoawq_bit_for_bit(w_bit: int, zero_point: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    ours = pseudo_quantize(w, w_bit, 64, zero_point)
    theirs = _autoawq_quantizer(w_bit, 64, zero_point).pseudo_quantize_tensor(w)
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1])


def test_pseudo_quantize_uses_at_most_2_pow_bits_levels_per_group() -> None:
    torch.manual_seed(1)
    wq, _, _ = pseudo_quantize(torch.randn(8, 128), 4, 64, True)
    for group in wq.reshape(-1, 64):
        assert group.unique().numel() <= 16


def test_clip_search_matches_autoawq_objective_and_choice() -> None:
    """Same grid and objective as AutoAWQ: with all tokens sampled, the same clip values."""
    torch.manual_seed(2)
    w = torch.randn(64, 128) * torch.linspace(0.2, 3, 128)  # uneven columns give varied clips
    x = torch.randn(256, 128) * torch.linspace(3, 0.1, 128)
    q = _autoawq_quantizer(4, 64, True)
    theirs = ORIGINALS["_compute_best_clip"](q, w, x, n_sample_token=256)
    ours = search_clip(w, group_gram(x, 64), 4, 64, True)
    agree = torch.isclose(ours, theirs, rtol=1e-5).float().mean().item()
    # Float summation order differs (Gram vs direct); ties on the grid may flip in rare groups.
    assert agree > 0.97
    assert (ours < w.reshape(64, 2, 64).abs().amax(-1, keepdim=True)).any(), "some groups clip"


def test_clip_never_increases_output_error_over_no_clip() -> None:
    torch.manual_seed(3)
    w, x = torch.randn(32, 128), torch.randn(512, 128)
    gram = group_gram(x, 64)
    best = search_clip(w, gram, 4, 64, True)

    def err(weight: torch.Tensor) -> float:
        return ((x @ (pseudo_quantize(weight, 4, 64, True)[0] - w).T) ** 2).mean().item()

    clipped = torch.clamp(w.reshape(32, 2, 64), -best, best).reshape(32, 128)
    assert err(clipped) <= err(w) + 1e-9


def test_group_size_that_does_not_divide_names_layer_and_usable_sizes() -> None:
    with pytest.raises(GroupSizeError, match=r"576 of model demo; use 64 or 32"):
        check_group_size(128, {"layers.0.mlp.gate_proj": 576}, "demo")
    check_group_size(64, {"a": 576, "b": 1536}, "demo")


def test_patched_scale_search_restores_weights_between_grid_points() -> None:
    """AutoAWQ 0.2.9 on CPU leaves searched scales baked into the weights; ours restores them."""
    from quantization.autoawq_patches import _compute_best_scale

    torch.manual_seed(4)
    linear = torch.nn.Linear(128, 64, bias=False)
    before = linear.weight.detach().clone()
    x = torch.randn(4, 16, 128)
    quantizer = _autoawq_quantizer(4, 64, True)
    quantizer.duo_scaling = True
    quantizer.max_chunk_memory = 1 << 30
    quantizer.n_parallel_calib_samples = None
    args = (x, linear.weight.abs().mean(0), x.abs().reshape(-1, 128).mean(0), linear, [linear])
    with torch.no_grad():
        _compute_best_scale(quantizer, *args, linear(x))
    assert torch.equal(linear.weight, before)
    bound = types.MethodType(ORIGINALS["_compute_best_scale"], quantizer)
    with torch.no_grad():
        bound(*args, linear(x))
    assert not torch.equal(linear.weight, before), "AutoAWQ's original still has the bug"


def test_group_gram_in_chunks_equals_the_gram_of_all_tokens_at_once() -> None:
    torch.manual_seed(5)
    x = torch.randn(1000, 128, dtype=torch.float16)
    whole = group_gram(x, 64, chunk_tokens=10_000)
    chunked = group_gram(x, 64, chunk_tokens=96)  # 1000 is not a multiple: a short last chunk
    assert chunked.dtype == torch.float32 and chunked.shape == (2, 64, 64)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    xf = x.float().reshape(1000, 2, 64)
    torch.testing.assert_close(whole[1], xf[:, 1].T @ xf[:, 1] / 1000, rtol=1e-5, atol=1e-5)
