"""Sampling filters, seeded sampling, and stop-string handling for streamed text."""

from __future__ import annotations

import pytest
import torch

from deployments.engine.sampling import filter_logits, make_generator, sample_next
from deployments.engine.text_stream import StopChecker
from deployments.protocol import SamplingParams


def _kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


@pytest.mark.parametrize(("k", "expected"), [(1, {1}), (2, {1, 3}), (3, {1, 3, 2})])
def test_top_k_keeps_exactly_the_k_largest_logits(k: int, expected: set[int]) -> None:
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    filtered = filter_logits(logits, temperature=1.0, top_k=k, top_p=1.0)
    assert _kept(filtered) == expected
    assert torch.equal(filtered[list(expected)], logits[list(expected)])


def test_top_k_zero_or_vocab_size_keeps_everything() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0])
    assert _kept(filter_logits(logits, 1.0, top_k=0, top_p=1.0)) == {0, 1, 2}
    assert _kept(filter_logits(logits, 1.0, top_k=3, top_p=1.0)) == {0, 1, 2}


# Probabilities 0.5, 0.25, 0.125, 0.125 at positions 1, 3, 0, 2: cumulative 0.5, 0.75, 0.875, 1.
NUCLEUS_LOGITS = torch.tensor([0.125, 0.5, 0.125, 0.25]).log()


@pytest.mark.parametrize(
    ("top_p", "n_kept", "must_keep"),
    [(0.01, 1, {1}), (0.4, 1, {1}), (0.7, 2, {1, 3}), (0.8, 3, {1, 3}), (0.95, 4, {0, 1, 2, 3})],
)
def test_top_p_keeps_smallest_prefix_whose_mass_reaches_p(
    top_p: float, n_kept: int, must_keep: set[int]
) -> None:
    kept = _kept(filter_logits(NUCLEUS_LOGITS, temperature=1.0, top_k=0, top_p=top_p))
    assert len(kept) == n_kept
    assert kept >= must_keep


def test_temperature_divides_logits() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5])
    assert torch.allclose(filter_logits(logits, 0.5, 0, 1.0), logits * 2)
    hot = filter_logits(logits, 2.0, 0, 1.0).softmax(-1)
    assert hot.max() < logits.softmax(-1).max()


def test_temperature_zero_samples_greedily_per_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=1),
        SamplingParams(temperature=0.0, top_p=0.5),
    ]
    generators = [make_generator(1), None, make_generator(2)]
    assert sample_next(logits, params, generators) == logits.argmax(-1).tolist()


def _sample_sequence(seed: int, steps: int = 20) -> list[int]:
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 0.1
    generator = make_generator(seed)
    params = [SamplingParams(temperature=1.0)]
    return [sample_next(logits, params, [generator])[0] for _ in range(steps)]


def test_same_seed_gives_the_same_samples() -> None:
    assert _sample_sequence(123) == _sample_sequence(123)
    assert _sample_sequence(123) != _sample_sequence(456)


def test_batched_draws_follow_each_rows_filtered_distribution() -> None:
    # Row 0: plain softmax of log(0.5, 0.3, 0.2, 0); row 1: top_k=1 of the same is greedy-like
    # through the sampled path (temperature 1, top_p 0.6 keeps tokens 0 and 1 only).
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log().repeat(2, 1)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.6)]
    generators = [make_generator(1), make_generator(2)]
    counts = torch.zeros(2, 4)
    for _ in range(4000):
        for row, token in enumerate(sample_next(logits, params, generators)):
            counts[row, token] += 1
    freq = counts / 4000
    torch.testing.assert_close(freq[0], torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.03, rtol=0)
    torch.testing.assert_close(freq[1], torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03, rtol=0)


def test_a_seeded_row_samples_the_same_whatever_its_batch_mates() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 0.1
    seeded = SamplingParams(temperature=1.0, seed=5)
    mates = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.0)]
    g = make_generator(5)
    alone = [sample_next(logits[:1], [seeded], [g])[0] for _ in range(10)]
    g = make_generator(5)
    together = [sample_next(logits, [seeded, *mates], [g, None, None])[0] for _ in range(10)]
    assert together == alone
    assert len(set(alone)) > 1  # near-uniform logits: the draws really vary


def test_make_generator_without_seed_gives_none() -> None:
    assert make_generator(None) is None


def _stream(checker: StopChecker, text: str) -> tuple[str, bool]:
    """Feed `text` one character at a time, as a growing decode; return joined deltas."""
    out = []
    for end in range(1, len(text) + 1):
        delta, stopped = checker.feed(text[:end])
        out.append(delta)
        if stopped:
            return "".join(out), True
    return "".join(out) + checker.flush(), False


@pytest.mark.parametrize(
    ("stop", "text", "expected"),
    [
        (("\nUser:",), "The answer is 42.\nUse it.\nUser: more", "The answer is 42.\nUse it."),
        (("END", "STOP"), "we STO ST EN END STOP", "we STO ST EN "),
        (("aab",), "xaaaab tail", "xaa"),
        (("</s>", "###"), "a </b> # ## ### b", "a </b> # ## "),
    ],
)
def test_stop_checker_never_emits_any_part_of_the_stop_string(
    stop: tuple[str, ...], text: str, expected: str
) -> None:
    emitted, stopped = _stream(StopChecker(stop), text)
    assert stopped
    assert emitted == expected


def test_stop_checker_without_a_stop_emits_everything() -> None:
    assert _stream(StopChecker(("END",)), "the E and EN end") == ("the E and EN end", False)


def test_stop_checker_cuts_at_the_earliest_of_several_stop_strings() -> None:
    assert StopChecker(("b", "a")).feed("xab") == ("x", True)


def test_stop_checker_holds_back_a_possible_stop_prefix_until_disambiguated() -> None:
    checker = StopChecker(("END",))
    assert checker.feed("hello E") == ("hello ", False)
    assert checker.feed("hello EN") == ("", False)
    assert checker.feed("hello ENd") == ("ENd", False)
    assert checker.feed("hello ENd EN") == (" ", False)
    assert checker.feed("hello ENd END") == ("", True)


def test_stop_checker_withholds_incomplete_multibyte_character_until_complete() -> None:
    checker = StopChecker(())
    assert checker.feed("caf\ufffd") == ("caf", False)
    assert checker.feed("caf\ufffd\ufffd") == ("", False)
    assert checker.feed("café") == ("é", False)
    assert checker.feed("café \ufffd") == (" ", False)
    assert checker.flush() == ""
