"""The batching forward passes on the real demo AWQ model: every way of prefilling a prompt
(packed with others, in chunks, alone) must leave the same logits and the same KV cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from deployments.engine.fused_projections import fuse_projections
from deployments.engine.model_runner import (
    ModelRunner,
    lm_head_dtype,
    load_model,
    output_projection,
    zeroed,
)
from deployments.engine.prefix_cache import PrefixCache

TEXTS = [
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest where",
    "def add(a, b):",
    "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital "
    "of Spain. Rome is the capital of Italy. Lisbon is the capital of",
]


def assert_same_prediction(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-equal logits: every way of computing a token (packed, chunked, from cached blocks)
    runs the same fixed-shape calls, so a misplaced key or position and a batch-variant sum
    alike show up as a difference."""
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.fixture(scope="module")
def loaded(demo_awq_dir: Path) -> tuple[ModelRunner, list[list[int]]]:
    model, tokenizer = load_model(demo_awq_dir, torch.device("cpu"))
    prompts = [tokenizer.encode(t) for t in TEXTS]
    return ModelRunner(model, max_slots=4, max_len=256), prompts


def test_packed_prefill_matches_each_prompt_prefilled_alone(
    loaded: tuple[ModelRunner, list[list[int]]],
) -> None:
    runner, prompts = loaded
    alone = []
    for prompt in prompts:
        alone.append(runner.prefill(0, [prompt])[0])
        nxt = runner.decode([int(alone[-1].argmax())])[0]
        alone.append(nxt)
    packed = runner.prefill(0, prompts)
    assert runner.cache.lengths[:3] == [len(p) for p in prompts]
    after = runner.decode([int(row.argmax()) for row in packed])
    for i in range(len(prompts)):
        assert_same_prediction(packed[i], alone[2 * i])
        assert_same_prediction(after[i], alone[2 * i + 1])  # reads the packed KV cache


def test_chunked_prefill_of_a_long_prompt_matches_one_pass(
    loaded: tuple[ModelRunner, list[list[int]]],
) -> None:
    runner, prompts = loaded
    prompt = prompts[2]
    one_pass = runner.prefill(0, [prompt])[0]
    chunked = runner.prefill(1, [prompt], chunk=8)[0]  # several chunks over the cache
    assert_same_prediction(chunked, one_pass)
    assert runner.cache.lengths[:2] == [len(prompt), len(prompt)]
    after = runner.decode([int(one_pass.argmax())] * 2)  # slot 1 reads the chunk-written cache
    assert_same_prediction(after[1], after[0])


def test_fused_int4_projections_equal_the_separate_kernels(demo_awq_dir: Path) -> None:
    model, _ = load_model(demo_awq_dir, torch.device("cpu"))
    attn = model.model.layers[0].self_attn
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(5, 3, model.config.hidden_size)
    separate = [m(x) for m in parts]
    fused = fuse_projections(parts)
    assert type(fused).__name__ == "_Int4CpuFused"
    torch.testing.assert_close(fused(x), torch.cat(separate, -1), atol=0, rtol=0)
    flat = x.reshape(-1, x.shape[-1])  # decode steps pass 2-D activations
    torch.testing.assert_close(fused(flat), torch.cat(separate, -1).view(15, -1), atol=0, rtol=0)
    # The originals now read views of the fused weights and still give the same outputs.
    for m, want in zip(parts, separate, strict=True):
        torch.testing.assert_close(m(x), want, atol=0, rtol=0)


def test_fused_dense_projections_keep_biases_and_share_storage() -> None:
    torch.manual_seed(0)
    parts = [nn.Linear(8, 4, bias=True), nn.Linear(8, 6, bias=False), nn.Linear(8, 2, bias=True)]
    x = torch.randn(3, 8)
    separate = [m(x).detach() for m in parts]
    fused = fuse_projections(parts)
    with torch.no_grad():
        out = fused(x)
    torch.testing.assert_close(out, torch.cat(separate, -1))
    assert parts[1].weight.data_ptr() == fused.weight[4:].data_ptr()  # a view, not a copy


def test_lm_head_dtype_auto_keeps_the_models_dtype() -> None:
    assert lm_head_dtype("auto", torch.float32) == torch.float32
    assert lm_head_dtype("auto", torch.float16) == torch.float16
    assert lm_head_dtype("bfloat16", torch.float32) == torch.bfloat16


def test_prefix_cache_hit_gives_the_same_prediction_as_a_full_prefill(
    loaded: tuple[ModelRunner, list[list[int]]],
) -> None:
    runner, prompts = loaded
    shared = prompts[2]  # 40+ tokens: at least two full blocks of 16
    question = shared + prompts[0]
    full = runner.prefill(0, [question])[0]
    runner.prefix_cache = PrefixCache(block_tokens=16, max_blocks=64)
    runner.prefill(1, [shared])  # leaves its blocks behind
    hit = runner.prefill(2, [question])[0]
    assert runner.prefix_cache.stats.hits >= 32
    assert_same_prediction(hit, full)
    after = runner.decode([int(full.argmax())] * 3)  # slot 2 reads copied-in blocks
    assert_same_prediction(after[2], after[0])
    runner.prefix_cache = PrefixCache(block_tokens=16, max_blocks=0)


def test_prepacked_output_projection_computes_the_plain_linear() -> None:
    torch.manual_seed(0)
    head = nn.Linear(64, 1000, bias=False)
    h = torch.randn(5, 64)
    want = nn.functional.linear(h, head.weight).detach()
    exact, path = output_projection(head, torch.float32, torch.device("cpu"), batch_hint=16)
    assert path in {"onednn prepacked float32", "linear float32"}
    torch.testing.assert_close(exact(h), want, atol=1e-5, rtol=1e-5)
    half, _ = output_projection(head, torch.bfloat16, torch.device("cpu"), batch_hint=16)
    assert half(h).dtype == torch.bfloat16
    torch.testing.assert_close(half(h).float(), want, atol=0.05, rtol=0.02)


def test_zeroed_cpu_tensors_read_as_zeros_take_writes_and_share_nothing() -> None:
    cpu = torch.device("cpu")
    a, b = (zeroed((4, 3, 8, 2), torch.float32, cpu) for _ in range(2))
    assert a.shape == (4, 3, 8, 2) and a.dtype == torch.float32 and a.is_contiguous()
    assert torch.equal(a, torch.zeros_like(a))
    a[1, :, 2] = 5.0
    assert a.sum().item() == 5.0 * 3 * 2 and b.abs().sum().item() == 0.0
    assert zeroed((3,), torch.bfloat16, cpu).dtype == torch.bfloat16
