"""The decode step captured as CUDA graphs: replaying a bucket's graph computes what the eager
step computes, padded buckets leave real rows alone, and `auto` picks graphs on CUDA."""

from __future__ import annotations

import torch

from benchmarks.step_overhead import hollow_llama
from deployments.engine.model_runner import CapturedStep, ModelRunner
from tests.cpu import test_decode_step as cpu


def prefilled(n: int, **kw: object) -> ModelRunner:
    return cpu.prefilled(hollow_llama(layers=2, vocab=cpu.VOCAB).to("cuda"), n, **kw)


def tokens(n: int) -> list[int]:
    return cpu.tokens(n)


def test_auto_captures_graphs_that_replay_the_eager_step_exactly() -> None:
    graphs = prefilled(4)  # 4 rows: a full bucket, so the same kernels as eager
    eager = prefilled(4, decode_step="eager")
    assert graphs.step_mode == "cuda_graph"
    for _ in range(4):  # the first call captures, the others replay with new inputs
        got, want = graphs.decode(tokens(4)), eager.decode(tokens(4))
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert all(isinstance(g, CapturedStep) for g in graphs._graphs.values())
    assert len(graphs._graphs) >= 1
    assert graphs.cache.lengths == eager.cache.lengths


def test_a_padded_bucket_gives_the_real_rows_eager_tokens() -> None:
    graphs = prefilled(3)  # 3 sequences replay the bucket-4 graph
    eager = prefilled(3, decode_step="eager")
    for _ in range(3):
        got, want = graphs.decode(tokens(3)), eager.decode(tokens(3))
        assert got.shape == want.shape == (3, cpu.VOCAB)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert {rows for rows, _ in graphs._graphs} == {4}
