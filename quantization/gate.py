"""The quality gate: a recipe's thresholds applied to measured figures, failing closed.

Every check is a line with its measured value, its limit and its verdict, so the report shows why a
model passed, not only that it did. A check passes only when its value is finite and within the
limit: NaN compares false both ways, so `not (x > limit)` would let a NaN perplexity through.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from quantization.recipes import GateSpec
from quantization.served import ServedCheckResult

Comparison = Literal["<=", ">="]


@dataclass(frozen=True)
class GateCheck:
    name: str
    measured: float | None  # None: the figure was not measured
    limit: float
    comparison: Comparison
    passed: bool
    note: str = ""

    def line(self) -> str:
        value = "not measured" if self.measured is None else f"{self.measured:.4g}"
        verdict = "pass" if self.passed else "FAIL"
        note = f" ({self.note})" if self.note else ""
        return f"{verdict}: {self.name} = {value} (limit {self.comparison} {self.limit:.4g}){note}"


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: list[GateCheck] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(name: str, measured: float | None, comparison: Comparison, limit: float,
           note: str = "") -> GateCheck:  # fmt: skip
    ok = measured is not None and math.isfinite(measured) and not math.isnan(limit)
    if ok:
        ok = measured <= limit if comparison == "<=" else measured >= limit
    return GateCheck(name, measured, limit, comparison, ok, note)


def _finite(q: dict[str, Any], key: str) -> float | None:
    value = q.get(key)
    return None if value is None else float(value)


def quality_checks(spec: GateSpec, qualities: dict[str, dict]) -> list[GateCheck]:
    """Absolute limits always; the RTN comparison whenever RTN was measured."""
    fp, awq, rtn = qualities["fp16"], qualities["awq"], qualities.get("rtn")
    fp_ppl, awq_ppl = _finite(fp, "perplexity"), _finite(awq, "perplexity")
    checks = [_check("FP16 perplexity (must be finite)", fp_ppl, "<=", math.inf)]
    rise_pct = None if fp_ppl is None or awq_ppl is None else (awq_ppl / fp_ppl - 1) * 100
    checks.append(_check("perplexity rise vs FP16 (%)", rise_pct, "<=", spec.max_ppl_increase_pct))
    checks.append(_check("KL vs FP16 (nats/token)", _finite(awq, "kl_vs_reference"), "<=",
                         spec.max_kl))  # fmt: skip
    checks.append(_check("top-1 agreement with FP16", _finite(awq, "top1_agreement"), ">=",
                         spec.min_top1_agreement))  # fmt: skip
    if rtn is not None:
        rtn_ppl = _finite(rtn, "perplexity")
        rtn_rise = None if rtn_ppl is None or fp_ppl is None else rtn_ppl - fp_ppl
        awq_rise = None if awq_ppl is None or fp_ppl is None else awq_ppl - fp_ppl
        # When RTN lost nothing (rise <= 0) only the noise allowance is left: AWQ may not lose.
        noise = None if fp_ppl is None else spec.rtn_noise_pct / 100 * fp_ppl
        allowed = math.nan
        if rtn_rise is not None and noise is not None:
            allowed = spec.max_increase_vs_rtn * max(rtn_rise, 0.0) + noise
        note = ""
        if rtn_rise is not None:
            note = f"{spec.max_increase_vs_rtn} x RTN's rise {rtn_rise:+.4g}"
            note += f" + {spec.rtn_noise_pct}% of FP16 for noise"
        checks.append(_check("perplexity rise vs RTN's", awq_rise, "<=", allowed, note))
    return checks


def served_checks(
    spec: GateSpec, served: ServedCheckResult | None, required: bool, why_not_run: str
) -> list[GateCheck]:
    """Engine vs transformers on the same artifact; a check that did not run fails if required."""
    if served is None:
        return [
            GateCheck(
                "served-path check", None, 1.0, ">=", not required, f"did not run: {why_not_run}"
            )
        ]
    lost = served.facts_lost
    stated = sum(a.reference_has_fact for a in served.chat)
    return [
        _check(
            "served path KL vs transformers (nats/token)",
            served.kl_per_token,
            "<=",
            spec.max_served_kl,
            f"{served.tokens_compared} positions",
        ),
        _check(
            "served path top-1 agreement with transformers",
            served.top1_agreement,
            ">=",
            spec.min_served_top1,
        ),
        _check(
            "chat answers that lost FP16's key fact",
            float(len(lost)),
            "<=",
            0.0,
            f"FP16 states it in {stated} of {len(served.chat)} probes",
        ),
    ]


def gate(
    spec: GateSpec,
    qualities: dict[str, dict],
    served: ServedCheckResult | None = None,
    served_required: bool = True,
    why_served_not_run: str = "no served-path check was given",
) -> GateResult:
    checks = quality_checks(spec, qualities) + served_checks(
        spec, served, served_required, why_served_not_run
    )
    reasons = [c.line() for c in checks if not c.passed]
    return GateResult(not reasons, reasons, checks)
