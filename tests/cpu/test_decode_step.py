"""The decode step is capture-ready: a function of preallocated buffers and a static signature
that computes exactly what the general forward path computes, traces as one graph with no
breaks, and compiles to the same tokens."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.step_overhead import hollow_llama
from deployments.engine.model_runner import ModelRunner, decode_plan, slot_order, step_mode

VOCAB = 256
# Sequence lengths across three key buckets (128, 256, 384), so one step has several groups.
LENGTHS = [5, 130, 127, 128, 3, 260, 40, 1, 9, 300, 126, 255, 256, 7, 8, 11]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return hollow_llama(layers=2, vocab=VOCAB)


def prefilled(model: nn.Module, n: int, **kw: object) -> ModelRunner:
    """A runner with the first n of LENGTHS prefilled; the Python step unless `decode_step` is
    given (this module tests that step; the native one is `test_native_step.py`'s)."""
    kw.setdefault("decode_step", "eager")
    runner = ModelRunner(model, max_slots=16, max_len=512, **kw)
    prompts = [[(3 * i + j) % VOCAB for j in range(length)] for i, length in enumerate(LENGTHS)]
    runner.prefill(0, prompts[:n])
    return runner


def tokens(n: int) -> list[int]:
    return [(11 * i + 5) % VOCAB for i in range(n)]


@pytest.mark.parametrize("invariant", [True, False])
@pytest.mark.parametrize("n", [1, 3, 16])
def test_decode_step_equals_the_general_forward_bit_for_bit(
    model: nn.Module, invariant: bool, n: int
) -> None:
    runner = prefilled(model, n, batch_invariant=invariant)
    positions = list(LENGTHS[:n])
    want = runner._forward_tokens(tokens(n), list(range(n)), positions, 1, list(range(n)))
    cache_want = [t.clone() for t in runner.cache.k + runner.cache.v]
    got = runner.decode(tokens(n))  # rewrites the same positions
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for a, b in zip(runner.cache.k + runner.cache.v, cache_want, strict=True):
        assert torch.equal(a, b)
    assert runner.cache.lengths[:n] == [p + 1 for p in positions]


def test_groups_follow_each_rows_key_bucket_and_padding_joins_the_widest(
    model: nn.Module,
) -> None:
    runner = prefilled(model, 1)
    groups, order = runner._decode_groups([5, 130, 127], rows=4)
    assert groups == ((128, 2), (256, 2))
    assert order == [0, 2, 1, 3]
    assert runner._decode_groups([5, 127, 130], rows=4)[1] == [0, 1, 2, 3]  # sorted: slices
    runner.batch_invariant = False  # one group: the furthest row's keys
    assert runner._decode_groups([5, 130, 127], rows=3)[0] == ((131, 3),)


def test_slot_order_sorts_by_bucket_moving_only_misplaced_slots() -> None:
    assert slot_order([128, 128, 256]) == [0, 1, 2]
    assert slot_order([128, 256, 128]) == [0, 2, 1]  # one swap, slot 0 stays
    assert slot_order([384, 128, 256, 128]) == [3, 1, 2, 0]  # slots 1 and 2 stay
    perm = slot_order([256, 384, 128, 128, 256, 128])
    assert sorted(perm) == list(range(6))
    assert [[256, 384, 128, 128, 256, 128][j] for j in perm] == [128, 128, 128, 256, 256, 384]


def test_ordered_slots_decode_the_same_logits_with_views_instead_of_copies(
    model: nn.Module,
) -> None:
    """Sequences sorted by bucket keep their KV and give bit-for-bit the logits they give
    unsorted (each row's attention call has the same shape), and the step's groups are slices."""
    n = 6
    plain, ordered = prefilled(model, n), prefilled(model, n)
    perm = ordered.order_slots(n)
    assert perm is not None and perm != list(range(n))
    assert ordered.order_slots(n) is None  # already sorted
    assert ordered.cache.lengths[:n] == [LENGTHS[j] for j in perm]
    groups, order = ordered._decode_groups(ordered.cache.lengths[:n], rows=n)
    assert len(groups) > 1 and order == list(range(n))
    want = plain.decode(tokens(n))
    got = ordered.decode([tokens(n)[j] for j in perm])
    torch.testing.assert_close(got, want[perm], atol=0, rtol=0)
    plan = decode_plan(
        torch.tensor(LENGTHS[:n]).view(n, 1),
        torch.arange(n),
        groups,
        torch.float32,
        contiguous=True,
    )
    assert all(isinstance(g.rows, slice) for g in plan)


def test_decode_step_traces_as_one_graph_without_breaks(model: nn.Module) -> None:
    runner = prefilled(model, 5)
    groups, order = runner._decode_groups(LENGTHS[:5], rows=5)
    assert len(groups) == 2  # the multi-group path is the one with gathers
    buf = torch.tensor([tokens(5), LENGTHS[:5], order])
    with torch.no_grad():
        explained = torch._dynamo.explain(runner._decode_hidden)(
            buf[0].view(5, 1), buf[1].view(5, 1), buf[2], groups
        )
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_mode_pads_to_power_of_two_buckets(model: nn.Module) -> None:
    runner = ModelRunner(model, max_slots=12, max_len=512, decode_step="eager")
    assert [runner._decode_bucket(n) for n in (1, 3, 12)] == [1, 3, 12]
    runner.step_mode = "compile"
    assert [runner._decode_bucket(n) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]


def test_step_mode_auto_is_native_on_cpu_and_graphs_need_cuda() -> None:
    cpu = torch.device("cpu")
    assert step_mode("auto", cpu) == "native"
    assert step_mode("auto", torch.device("cuda")) == "cuda_graph"
    assert step_mode("compile", cpu) == "compile"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        step_mode("cuda_graph", cpu)
    with pytest.raises(ValueError, match="a CPU step"):
        step_mode("native", torch.device("cuda"))
    with pytest.raises(ValueError, match="must be auto"):
        step_mode("graphs", cpu)


@pytest.mark.slow
def test_compiled_step_gives_the_eager_tokens_with_padding_rows(model: nn.Module) -> None:
    """Inductor fuses differently, so logits are close rather than equal; the padded rows
    (3 sequences in a bucket of 4) must not disturb the real ones or the other slots' KV."""
    eager = prefilled(model, 3)
    compiled = prefilled(model, 3, decode_step="compile")
    spare = [t[3:].clone() for t in compiled.cache.k]
    for step in range(3):
        want, got = eager.decode(tokens(3)), compiled.decode(tokens(3))
        assert got.shape == want.shape == (3, VOCAB)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1)), step
    assert compiled.cache.lengths == eager.cache.lengths
    for t, before in zip(compiled.cache.k, spare, strict=True):
        assert torch.equal(t[4:], before[1:])  # slots past the bucket untouched
