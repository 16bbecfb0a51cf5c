"""The native int4 kernel (AVX512-BF16): ATen's packed weights read back exactly, products within
a bf16 rounding of the float64 result, rows independent of their batch-mates, and a runner over
the demo AWQ model that repacks once, keeps the model's own forward on the same kernel, and stays
on ATen's kernel where the CPU or the extension cannot run the native one."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deployments.engine import native_int4
from deployments.engine.fused_projections import _Int4CpuFused
from deployments.engine.model_runner import ModelRunner, load_model
from deployments.engine.native_int4 import int4pack_nibbles, read_nibbles
from deployments.engine.native_step import load_extension

HAS_BF16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="the native int4 kernel needs AVX512-BF16")


def aten_packed(n: int, k: int, group: int, seed: int = 0) -> SimpleNamespace:
    """Random nibbles, scales and zeros packed as gptqmodel packs them for ATen's CPU kernel."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    sz = (torch.randn(k // group, n, 2, generator=gen) * 0.05).to(torch.bfloat16)
    qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
    return SimpleNamespace(q=q, qweight=qweight, scales_and_zeros=sz, group_size=group)


def float64_product(x: torch.Tensor, w: SimpleNamespace) -> torch.Tensor:
    """x @ dequantized(w).T in float64: w = (q - 8) * scale + zero per group."""
    sz = w.scales_and_zeros.double().repeat_interleave(w.group_size, 0)  # (k, n, 2)
    weight = (w.q.double() - 8) * sz[..., 0].T + sz[..., 1].T
    return x.double() @ weight.T


@pytest.mark.parametrize("n", [16, 48, 80, 960])
def test_aten_packed_nibbles_are_read_back_exactly(n: int) -> None:
    """Full 64-row blocks and the shorter last block (16, 32 or 48 rows) have different layouts."""
    w = aten_packed(n, 128, 64)
    assert torch.equal(read_nibbles(w).int(), w.q)
    # The wrong block size is caught by packing the result again, not returned.
    if n > 64:
        assert not torch.equal(int4pack_nibbles(w.qweight, n, 128, 32).int(), w.q)


@needs_bf16
@pytest.mark.parametrize(("n", "k", "group"), [(960, 576, 64), (576, 1536, 64), (80, 256, 128)])
def test_native_product_is_within_a_bf16_rounding_of_float64(n: int, k: int, group: int) -> None:
    ext = load_extension()
    w = aten_packed(n, k, group)
    packed = ext.int4_pack(read_nibbles(w), w.scales_and_zeros, group)
    x = torch.randn(19, k, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    got = ext.int4_mm(x, *packed, n, group)
    exact = float64_product(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (19, n)
    # Rounding to bf16 is half an ulp; the fp32 sums add little (ATen's kernel: 0.54 ulp).
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    assert (got.double() - exact).abs().div(ulp).max() <= 0.6
    aten = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.qweight, group, w.scales_and_zeros)
    assert (got != aten).float().mean() < 0.005  # ATen's own result but for a rare ulp


@needs_bf16
def test_fp32_activations_give_the_bf16_result_widened() -> None:
    """fp32 in: rounded to bf16 inside (as .to(bf16) rounds), the bf16 result returned as fp32,
    so the runner's fp32 prefill skips two casts and computes the same numbers."""
    ext = load_extension()
    w = aten_packed(96, 192, 64, seed=2)
    packed = ext.int4_pack(read_nibbles(w), w.scales_and_zeros, 64)
    x = torch.randn(37, 192) * 3
    got = ext.int4_mm(x, *packed, 96, 64)
    assert got.dtype == torch.float32
    assert torch.equal(got, ext.int4_mm(x.to(torch.bfloat16), *packed, 96, 64).float())


@needs_bf16
def test_native_rows_do_not_depend_on_batch_mates() -> None:
    """Calls of 1..40 rows go through different row tiles (16, 8, 4, 2, 1 rows at a time)."""
    ext = load_extension()
    w = aten_packed(576, 576, 64, seed=1)
    packed = ext.int4_pack(read_nibbles(w), w.scales_and_zeros, 64)
    x = torch.randn(40, 576).to(torch.bfloat16)
    alone = torch.cat([ext.int4_mm(x[i : i + 1], *packed, 576, 64) for i in range(40)])
    for rows in (2, 3, 5, 8, 15, 16, 17, 31, 40):
        assert torch.equal(ext.int4_mm(x[:rows], *packed, 576, 64), alone[:rows]), rows


def test_runner_repacks_the_demo_model_once_and_the_model_forward_follows(
    demo_awq_dir: Path,
) -> None:
    model, _ = load_model(demo_awq_dir, torch.device("cpu"))
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, model.config.hidden_size)
    before = attn.k_proj(x)  # ATen's kernel
    runner = ModelRunner(model, max_slots=2, max_len=64)
    fused = runner.qkv[0]
    assert isinstance(fused, _Int4CpuFused)
    if not HAS_BF16:
        assert runner.int4_kernel.startswith("aten (this CPU has no AVX512-BF16")
        return
    assert runner.int4_kernel == "native avx512-bf16"
    assert fused.qweight.numel() == 0 and attn.k_proj.qweight.numel() == 0  # ATen's released
    # The module's forward runs the engine's kernel over its own rows of the fused weights.
    q_rows = attn.q_proj.out_features
    want = fused(x)[:, q_rows : q_rows + attn.k_proj.out_features]
    assert torch.equal(attn.k_proj(x), want)
    torch.testing.assert_close(attn.k_proj(x), before, atol=0.05, rtol=0.02)
    again = ModelRunner(model, max_slots=2, max_len=64)  # e.g. the served-path check's
    assert again.qkv[0] is fused and again.int4_kernel == "native avx512-bf16"
    logits = runner.prefill(0, [[1, 2, 3]])
    assert torch.equal(again.prefill(0, [[1, 2, 3]]), logits)


def test_without_avx512_bf16_the_projections_stay_on_aten(
    demo_awq_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = load_model(demo_awq_dir, torch.device("cpu"))
    x = torch.randn(2, model.config.hidden_size)
    want = model.model.layers[0].mlp.gate_proj(x)
    no_bf16 = SimpleNamespace(int4_bf16_available=False)
    monkeypatch.setattr(native_int4, "load_extension", lambda: no_bf16)
    runner = ModelRunner(model, max_slots=2, max_len=64, decode_step="eager")
    assert runner.int4_kernel == "aten (this CPU has no AVX512-BF16)"
    gate_up = runner.gate_up[0]
    assert gate_up.qweight.numel() > 0 and not gate_up.native
    assert torch.equal(gate_up(x)[:, : want.shape[1]], want)
