"""Greedy output must not depend on batch-mates: one prompt decoded alone and inside batches of
2, 5 and 16 mixed prompts, at random places in the packed prefill, gives bit-equal logits."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from benchmarks.batch_invariance import QUESTIONS
from deployments.engine.fused_projections import tiled
from deployments.engine.model_runner import KEY_BUCKET, ModelRunner, load_model, plan_attention
from deployments.engine.prompts import chat_prompt_ids

STEPS = 6


def load_runner(model_dir: Path) -> tuple[ModelRunner, list[list[int]]]:
    model, tokenizer = load_model(model_dir, torch.device("cpu"))
    runner = ModelRunner(model, max_slots=16, max_len=512, prefix_cache_mb=16)
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    return runner, prompts


def greedy(runner: ModelRunner, batch: list[list[int]], row: int) -> torch.Tensor:
    """Prefill `batch` packed, decode STEPS greedy tokens; the logits of `row` at each step."""
    runner.reset()
    logits = runner.prefill(0, batch)
    rows = [logits[row]]
    for _ in range(STEPS):
        logits = runner.decode(logits.argmax(-1).tolist())
        rows.append(logits[row])
    return torch.stack(rows)


def assert_invariant(runner: ModelRunner, prompts: list[list[int]], repetitions: int) -> None:
    rng = random.Random(0)
    alone = greedy(runner, [prompts[0]], 0)
    for rep in range(repetitions):
        for size in (2, 5, 16):
            batch = [prompts[i] for i in rng.sample(range(1, len(prompts)), size - 1)]
            row = rng.randrange(size)
            batch.insert(row, prompts[0])
            got = greedy(runner, batch, row)
            assert torch.equal(got.argmax(-1), alone.argmax(-1)), f"rep {rep}, batch of {size}"
            torch.testing.assert_close(got, alone, atol=0, rtol=0)


@pytest.mark.slow
def test_awq_greedy_logits_alone_equal_batched_20_repetitions(demo_awq_dir: Path) -> None:
    runner, prompts = load_runner(demo_awq_dir)
    assert_invariant(runner, prompts, repetitions=20)
    assert runner.prefix_cache.stats.hits > 0  # later runs read cached blocks: exact too


@pytest.mark.slow
def test_fp32_greedy_logits_alone_equal_batched(demo_fp16_dir: Path) -> None:
    runner, prompts = load_runner(demo_fp16_dir)
    assert_invariant(runner, prompts, repetitions=3)


def test_attention_plan_tiles_by_own_position_and_buckets_keys() -> None:
    # Two slots: slot 0 has tokens at 0..19 (two tiles), slot 3 a token at position 200.
    slots, positions = [0] * 20 + [3], [*range(20), 200]
    groups = plan_attention(slots, positions, 16, 2048, torch.device("cpu"))
    assert sorted(g.keys for g in groups) == [KEY_BUCKET, 2 * KEY_BUCKET]
    short = next(g for g in groups if g.keys == KEY_BUCKET)
    assert short.slots.tolist() == [0, 0]  # both tiles of slot 0 (not a contiguous range)
    assert short.rows.tolist() == [*range(16), *range(16, 20), *[21] * 12]  # 21: padding
    # A query at position p sees keys 0..p and nothing after.
    assert short.mask[1, 0, 3].tolist() == [k <= 19 for k in range(KEY_BUCKET)]
    (far,) = (g for g in groups if g.keys == 2 * KEY_BUCKET)
    assert far.rows.tolist() == [21] * 8 + [20] + [21] * 7  # position 200 = row 8 of tile 12
    assert far.mask[0, 0, 8, 200] and not far.mask[0, 0, 8, 201]


def test_attention_plan_variant_mode_uses_one_call_over_the_longest_span() -> None:
    groups = plan_attention([0, 1], [5, 300], 1, 2048, torch.device("cpu"), invariant=False)
    assert [g.keys for g in groups] == [301]


def test_tiled_matmul_gives_each_row_the_result_of_a_fixed_shape_call() -> None:
    torch.manual_seed(0)
    weight = torch.randn(300, 64)
    x = torch.randn(21, 64)
    out = tiled(lambda t: torch.nn.functional.linear(t, weight), x, 16)
    assert out.shape == (21, 300)
    alone = tiled(lambda t: torch.nn.functional.linear(t, weight), x[17:18], 16)
    torch.testing.assert_close(out[17:18], alone, atol=0, rtol=0)
