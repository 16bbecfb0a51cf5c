"""The quality gate fails closed: a table of measured figures and the verdict each must get."""

from __future__ import annotations

import math

import pytest

from quantization.gate import gate
from quantization.recipes import GateSpec
from quantization.served import ChatAnswer, ServedCheckResult

SPEC = GateSpec(
    max_ppl_increase_pct=25.0,
    max_increase_vs_rtn=1.0,
    min_top1_agreement=0.7,
    max_kl=0.25,
    max_served_kl=1e-3,
    min_served_top1=0.98,
)
GOOD = {
    "fp16": {"perplexity": 15.3, "kl_vs_reference": 0.0, "top1_agreement": 1.0},
    "rtn": {"perplexity": 20.3, "kl_vs_reference": 0.33, "top1_agreement": 0.72},
    "awq": {"perplexity": 17.3, "kl_vs_reference": 0.12, "top1_agreement": 0.82},
}


def _served(
    kl: float = 2e-5, top1: float = 1.0, answer: str = "The capital is Paris."
) -> ServedCheckResult:
    chat = [ChatAnswer("What is the capital of France?", "Paris", "Paris.", answer)]
    return ServedCheckResult(kl, top1, 96, {"decode": kl}, chat, "test")


def _with(model: str, **figures: float) -> dict[str, dict]:
    return {k: {**v, **figures} if k == model else dict(v) for k, v in GOOD.items()}


def test_good_figures_pass_and_every_check_is_listed_with_its_value_and_limit() -> None:
    verdict = gate(SPEC, GOOD, _served())
    assert verdict.passed, verdict.reasons
    names = [c.name for c in verdict.checks]
    assert names == [
        "FP16 perplexity (must be finite)",
        "perplexity rise vs FP16 (%)",
        "KL vs FP16 (nats/token)",
        "top-1 agreement with FP16",
        "perplexity rise vs RTN's",
        "served path KL vs transformers (nats/token)",
        "served path top-1 agreement with transformers",
        "chat answers that lost FP16's key fact",
    ]
    rise = verdict.checks[1]
    assert rise.measured == pytest.approx((17.3 / 15.3 - 1) * 100)
    assert rise.limit == 25.0
    assert rise.line().startswith("pass: perplexity rise vs FP16 (%) = 13.07 (limit <= 25)")


NON_FINITE = [
    pytest.param(_with("awq", perplexity=math.nan), "perplexity rise vs FP16", id="awq-ppl-nan"),
    pytest.param(_with("awq", perplexity=math.inf), "perplexity rise vs FP16", id="awq-ppl-inf"),
    pytest.param(_with("fp16", perplexity=math.nan), "FP16 perplexity", id="fp16-ppl-nan"),
    pytest.param(_with("awq", kl_vs_reference=math.nan), "KL vs FP16", id="kl-nan"),
    pytest.param(_with("awq", top1_agreement=math.nan), "top-1 agreement", id="top1-nan"),
    pytest.param(_with("rtn", perplexity=math.nan), "rise vs RTN", id="rtn-ppl-nan"),
]


@pytest.mark.parametrize(("qualities", "failing"), NON_FINITE)
def test_a_non_finite_figure_fails_every_check_that_reads_it(qualities: dict, failing: str) -> None:
    verdict = gate(SPEC, qualities, _served())
    assert not verdict.passed
    assert any(failing in c.name for c in verdict.checks if not c.passed)
    assert len(verdict.reasons) == sum(not c.passed for c in verdict.checks)


ALONE = [
    # The issue's case: RTN better than FP16, AWQ +24%: under the absolute limit, over RTN's.
    pytest.param(
        {
            "fp16": GOOD["fp16"],
            "rtn": {**GOOD["rtn"], "perplexity": 15.0},
            "awq": {**GOOD["awq"], "perplexity": 19.0},
        },
        "rise vs RTN",
        id="rtn-better-than-fp16",
    ),
    pytest.param(_with("awq", kl_vs_reference=0.3), "KL vs FP16", id="kl-over-limit"),
    pytest.param(_with("awq", perplexity=19.2), "perplexity rise vs FP16", id="ppl-rise-alone"),
    pytest.param(_with("awq", top1_agreement=0.69), "top-1 agreement", id="top1-alone"),
    pytest.param(
        {**GOOD, "rtn": {**GOOD["rtn"], "perplexity": 16.0}}, "rise vs RTN", id="rtn-ratio-alone"
    ),
]


@pytest.mark.parametrize(("qualities", "failing"), ALONE)
def test_each_threshold_alone_fails_the_gate_on_its_own_line(qualities: dict, failing: str) -> None:
    verdict = gate(SPEC, qualities, _served())
    assert not verdict.passed
    failed = [c for c in verdict.checks if not c.passed]
    assert len(failed) == 1, [c.line() for c in failed]
    assert failing in failed[0].name
    assert verdict.reasons == [failed[0].line()]


def test_the_issue_nan_case_top1_075_does_not_pass() -> None:
    qualities = _with("awq", perplexity=math.nan, top1_agreement=0.75)
    verdict = gate(SPEC, qualities, _served())
    assert not verdict.passed
    assert "not measured" not in verdict.reasons[0] and "nan" in verdict.reasons[0]


def test_missing_figure_fails_closed() -> None:
    qualities = {k: dict(v) for k, v in GOOD.items()}
    del qualities["awq"]["kl_vs_reference"]
    verdict = gate(SPEC, qualities, _served())
    assert not verdict.passed
    assert "KL vs FP16 (nats/token) = not measured" in verdict.reasons[0]


def test_without_rtn_the_absolute_limits_still_apply() -> None:
    qualities = {"fp16": GOOD["fp16"], "awq": {**GOOD["awq"], "perplexity": 20.0}}
    verdict = gate(SPEC, qualities, _served())
    assert not verdict.passed
    assert "rise vs RTN" not in " ".join(c.name for c in verdict.checks)


@pytest.mark.parametrize(
    ("served", "failing"),
    [
        (_served(kl=2e-3), "served path KL"),
        (_served(kl=math.nan), "served path KL"),
        (_served(top1=0.9), "served path top-1"),
        (_served(answer="The capital of France is Lyon."), "lost FP16's key fact"),
    ],
    ids=["served-kl-over-limit", "served-kl-nan", "served-top1", "chat-lost-paris"],
)
def test_served_path_figures_each_fail_the_gate(served: ServedCheckResult, failing: str) -> None:
    verdict = gate(SPEC, GOOD, served)
    failed = [c.name for c in verdict.checks if not c.passed]
    assert len(failed) == 1 and failing in failed[0]


def test_served_check_that_did_not_run_fails_closed_unless_not_required() -> None:
    verdict = gate(SPEC, GOOD, None)
    assert not verdict.passed
    assert "served-path check" in verdict.reasons[0] and "did not run" in verdict.reasons[0]
    opted_out = gate(SPEC, GOOD, None, served_required=False, why_served_not_run="opted out")
    assert opted_out.passed
    assert "did not run: opted out" in opted_out.checks[-1].line()


def test_chat_probe_the_fp16_model_cannot_answer_is_not_held_against_the_candidate() -> None:
    chat = [ChatAnswer("q", "Paris", "I do not know.", "Rome")]
    served = ServedCheckResult(1e-5, 1.0, 10, {}, chat, "test")
    verdict = gate(SPEC, GOOD, served)
    assert verdict.passed
    assert "FP16 states it in 0 of 1 probes" in verdict.checks[-1].line()
