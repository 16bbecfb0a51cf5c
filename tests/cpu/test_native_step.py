"""The native CPU decode step (one C++ call for the decoder) computes what the Python step
computes, keeps a row's logits independent of its batch-mates, writes the same KV cache, and
steps aside (eager) for models it does not cover. Its dense kernel is checked on its own: exact
16-bit storage, float64-close sums, and rows independent of how many share a call."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from benchmarks.step_overhead import hollow_llama
from deployments.engine.model_runner import ModelRunner
from deployments.engine.native_step import (
    NativeUnavailable,
    clear_stale_lock,
    exact_16bit_head,
    load_extension,
    narrowest_exact,
)
from tests.cpu.test_decode_step import LENGTHS, VOCAB, prefilled
from tests.cpu.test_hf_parity import tiny_qwen3


def tiny_decoder(family: str, **shape: int) -> nn.Module:
    """A 2-layer random-weight decoder of a transformers model family, in fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        family, vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=512, **shape
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_qwen2() -> nn.Module:
    """Qwen2 wiring: q/k/v projections with biases, so the native step's bias path runs."""
    model = tiny_decoder(
        "qwen2", hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2
    )
    with torch.no_grad():  # nonzero biases, so a bias left out or added twice shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.uniform_(-0.5, 0.5)
    return model


def tiny_llama_hd64() -> nn.Module:
    """Head size 64, one of the sizes the native attention has a register-resident path for."""
    return tiny_decoder(
        "llama",
        hidden_size=128,
        intermediate_size=160,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


MODELS = {
    "llama-hd4": lambda: hollow_llama(layers=2, vocab=VOCAB),  # the generic attention path
    "llama-hd64": tiny_llama_hd64,
    "qwen3-qk-norm": lambda: tiny_qwen3(vocab=VOCAB),  # head_dim 16
    "qwen2-bias": tiny_qwen2,  # head_dim 16
}


def tokens(n: int, step: int) -> list[int]:
    return [(11 * i + 5 + 7 * step) % VOCAB for i in range(n)]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("n", [1, 5, 16])
def test_native_step_follows_the_python_step(name: str, n: int) -> None:
    """Same logits up to summation order (fp32 throughout), step after step, so the keys and
    values the native step writes are the ones the Python step would have written."""
    model = MODELS[name]()
    native = prefilled(model, n, decode_step="native")
    eager = prefilled(model, n, decode_step="eager")
    assert native.step_mode == "native"
    for step in range(4):
        want, got = eager.decode(tokens(n, step)), native.decode(tokens(n, step))
        assert got.shape == want.shape == (n, VOCAB)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert native.cache.lengths == eager.cache.lengths
    caches = zip(native.cache.k + native.cache.v, eager.cache.k + eager.cache.v, strict=True)
    for i, (kn, ke) in enumerate(caches):
        torch.testing.assert_close(kn, ke, atol=2e-5, rtol=1e-5, msg=f"cache tensor {i}")


def test_a_slot_or_position_outside_the_cache_is_refused_not_written() -> None:
    runner = prefilled(MODELS["llama-hd4"](), 2, decode_step="native")
    h = torch.zeros(1, runner.model.config.hidden_size)
    rope = torch.zeros(1, runner.head_dim)
    step = runner._native.step
    with pytest.raises(RuntimeError, match="slot 16 out of the cache"):
        step(h, rope, rope, torch.tensor([16]), torch.tensor([3]))
    with pytest.raises(RuntimeError, match="position 512 out of the cache"):
        step(h, rope, rope, torch.tensor([0]), torch.tensor([512]))
    with pytest.raises(RuntimeError, match="slot -1 out of the cache"):
        step(h, rope, rope, torch.tensor([-1]), torch.tensor([3]))


def test_native_row_is_bit_equal_alone_and_among_batch_mates() -> None:
    """A row's logits do not depend on which rows share its step or how long they are."""
    model = MODELS["qwen3-qk-norm"]()
    alone = ModelRunner(model, max_slots=16, max_len=512, decode_step="native")
    prompt = [(5 * j + 1) % VOCAB for j in range(40)]
    alone.prefill(0, [prompt])
    want = [alone.decode([t]) for t in (3, 9, 27)]
    for size, row in ((2, 1), (7, 3), (16, 15)):
        batch = ModelRunner(model, max_slots=16, max_len=512, decode_step="native")
        others = [[(i + j) % VOCAB for j in range(LENGTHS[i] + 1)] for i in range(size)]
        others[row] = prompt
        batch.prefill(0, others)
        for step, t in enumerate((3, 9, 27)):
            feed = tokens(size, step)
            feed[row] = t
            got = batch.decode(feed)[row : row + 1]
            assert torch.equal(got, want[step]), f"batch of {size}, step {step}"


def test_a_lock_left_by_a_killed_build_is_removed_once_stale(tmp_path) -> None:  # type: ignore[no-untyped-def]
    lock = tmp_path / "lock"
    assert not clear_stale_lock(lock)  # none there
    lock.touch()
    assert not clear_stale_lock(lock, max_age_s=60)  # a build may be running
    assert lock.exists()
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert clear_stale_lock(lock, max_age_s=60)
    assert not lock.exists()


def test_without_the_built_extension_the_runner_steps_eagerly_with_an_fp32_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A machine with no C++ compiler: the runner says why and decodes with the Python step,
    and an fp16-exact head stays fp32 (oneDNN) instead of failing."""
    import deployments.engine.native_step as native_step

    def no_compiler() -> None:
        raise NativeUnavailable("native decode step not built: no C++ compiler")

    monkeypatch.setattr(native_step, "load_extension", no_compiler)
    model = hollow_llama(layers=2, vocab=VOCAB)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.lm_head.weight.half().float())
    runner = ModelRunner(model, max_slots=2, max_len=64)
    assert runner.step_mode == "eager" and "no C++ compiler" in runner.native_unavailable
    assert "native" not in runner.lm_head_path
    runner.prefill(0, [[1, 2, 3]])
    assert runner.decode([4]).shape == (1, VOCAB)


def test_auto_falls_back_to_eager_for_a_model_the_native_step_does_not_cover() -> None:
    model = hollow_llama(layers=2, vocab=VOCAB)
    model.config.hidden_act = "gelu"  # the native MLP is SiLU only
    for layer in model.model.layers:
        layer.mlp.act_fn = nn.GELU()
    runner = ModelRunner(model, max_slots=2, max_len=64)
    assert runner.step_mode == "eager"
    assert "SiLU" in runner.native_unavailable
    with pytest.raises(NativeUnavailable, match="SiLU"):
        ModelRunner(model, max_slots=2, max_len=64, decode_step="native")


@pytest.mark.parametrize("fmt", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_kernel_is_close_to_float64_and_rows_do_not_depend_on_batch_mates(fmt) -> None:  # type: ignore[no-untyped-def]
    ext = load_extension()
    torch.manual_seed(0)
    weight = (torch.randn(70, 131) * 0.1).to(fmt)  # neither size a multiple of 16
    bias = torch.randn(70)
    x = torch.randn(19, 131)
    packed = ext.pack_dense(weight)
    got = ext.dense(x, packed, 70, bias)
    want = x.double() @ weight.double().T + bias.double()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    for rows in (1, 2, 8, 9, 17):
        part = ext.dense(x[:rows].clone(), packed, 70, bias)
        assert torch.equal(part, got[:rows]), rows


def test_weights_are_stored_in_the_narrowest_format_that_holds_them_exactly() -> None:
    torch.manual_seed(0)
    w32 = torch.randn(64, 32)
    assert narrowest_exact(w32).dtype == torch.float32
    assert narrowest_exact(w32.half().float()).dtype == torch.float16
    assert narrowest_exact(w32.bfloat16().float()).dtype == torch.bfloat16
    with pytest.raises(NativeUnavailable, match="need fp32"):
        exact_16bit_head(w32)
    head, name = exact_16bit_head(w32.half().float())
    assert name == "native float16-stored, fp32 math"
    h = torch.randn(3, 32)
    torch.testing.assert_close(head(h), h @ w32.half().float().T, atol=1e-5, rtol=1e-5)
