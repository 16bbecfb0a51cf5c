"""Rollout policy: next weights, guardrails judged from the router's real /metrics text."""

from __future__ import annotations

import math
from typing import Any

import pytest

from deployments.config import AppArgs
from deployments.gateway.traffic import TrafficSplit
from deployments.metrics import RouterMetrics
from deployments.ops.rollout import (
    MetricsUnavailable,
    VariantCounts,
    histogram_quantile,
    judge,
    parse_variant_counts,
    rollback,
    rollout,
    stable_variant,
)
from deployments.protocol import Finished, Usage

STABLE, CANARY, OTHER = "awq", "fp16", "other"
INF = math.inf


def app_args(**guardrails: float) -> AppArgs:
    models = [{"name": n, "source": n} for n in (STABLE, CANARY, OTHER)]
    aliases = [
        {"name": "chat", "split": {"variants": {STABLE: 90, CANARY: 10}}, "rollout": guardrails},
        {"name": "code", "split": {"variants": {OTHER: 100}}},
    ]
    return AppArgs.model_validate({"models": models, "aliases": aliases})


class FakeApp:
    """A deployed app in memory: records every split applied; traffic comes from `wait`."""

    def __init__(self, args: AppArgs, live: dict[str, TrafficSplit] | None = None) -> None:
        self._args = args
        self.live = dict(live or {})
        self.applied: list[dict[str, float]] = []
        self.metrics = RouterMetrics({STABLE: 0.0, CANARY: 0.0, OTHER: 0.0}, aliases=["chat"])

    def args(self) -> AppArgs:
        return self._args

    def live_splits(self) -> dict[str, TrafficSplit]:
        return dict(self.live)

    def apply(self, splits: dict[str, TrafficSplit]) -> None:
        self.live = dict(splits)
        self.applied.append(splits["chat"].variants)

    def scrape(self) -> str:
        return self.metrics.render().decode()

    def serve(self, variant: str, n: int, status: int = 200, latency_s: float = 0.2) -> None:
        final = Finished("stop", Usage(5, 1)) if status < 400 else None
        for _ in range(n):
            self.metrics.observe("chat", variant, status, latency_s, final)

    def percents(self) -> list[float]:
        return [split.get(CANARY, 0.0) for split in self.applied]


def run(app: FakeApp, traffic: Any, steps=(10, 25, 50, 100), scrape=None):
    """Roll out CANARY; `traffic(percent)` plays the requests of each interval."""

    def wait(_: float) -> None:
        traffic(app.live["chat"].variants.get(CANARY, 0.0))

    return rollout(
        app, "chat", CANARY, steps, 60, scrape or app.scrape, wait, report=lambda _: None
    )


def test_histogram_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    # rank 0.95 * 20 = 19 lies in (0.1, 0.5], 9 of its 10 observations in: 0.1 + 0.4 * 0.9
    assert histogram_quantile(0.95, [(0.1, 10), (0.5, 20), (INF, 20)]) == pytest.approx(0.46)


def test_histogram_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    assert histogram_quantile(0.95, [(0.1, 1), (0.5, 2), (INF, 40)]) == 0.5
    assert histogram_quantile(0.95, [(0.1, 0), (INF, 0)]) is None


def test_counts_are_read_per_variant_of_the_alias_from_router_metrics() -> None:
    app = FakeApp(app_args())
    app.serve(CANARY, 3)
    app.serve(CANARY, 1, status=503)
    app.serve(CANARY, 2, status=429)
    app.serve(STABLE, 5)
    app.metrics.observe(CANARY, CANARY, 500, 0.1, None)  # called by model name, not the alias
    counts = parse_variant_counts(app.scrape(), "chat")
    assert counts[CANARY].requests == 6
    assert counts[CANARY].server_errors == 1
    assert counts[CANARY].latency_buckets[-1] == (INF, 3)  # latency of the successes only
    assert counts[STABLE].requests == 5


def test_interval_counts_are_the_difference_and_survive_a_router_restart() -> None:
    earlier = VariantCounts(10, 1, ((0.5, 8), (INF, 9)))
    later = VariantCounts(30, 2, ((0.5, 20), (INF, 28)))
    assert later.since(earlier) == VariantCounts(20, 1, ((0.5, 12), (INF, 19)))
    restarted = VariantCounts(4, 0, ((0.5, 4), (INF, 4)))
    assert restarted.since(earlier) == restarted


@pytest.mark.parametrize(
    ("window", "roll_back"),
    [
        (VariantCounts(100, 6, ((0.5, 94), (INF, 94))), True),  # 6% 5xx > 5%
        (VariantCounts(100, 4, ((0.5, 96), (INF, 96))), False),
        (VariantCounts(100, 0, ((1, 90), (4, 100), (INF, 100))), True),  # p95 2.5 s > 2 s
        (VariantCounts(100, 0, ((1, 96), (4, 100), (INF, 100))), False),
        (VariantCounts(0, 0, ()), False),  # no traffic: no evidence against the canary
    ],
)
def test_judge_rolls_back_only_past_the_error_or_p95_bound(window, roll_back) -> None:
    bounds = app_args(max_error_rate=0.05, max_p95_latency_s=2).aliases[0].rollout
    assert judge(window, bounds).roll_back is roll_back


def test_stable_is_the_heaviest_configured_variant_other_than_the_canary() -> None:
    split = TrafficSplit(variants={"a": 10, "b": 60, "c": 30})
    assert stable_variant(split, "b") == "c"
    assert stable_variant(split) == "b"
    with pytest.raises(ValueError, match="no variant besides"):
        stable_variant(TrafficSplit(variants={"a": 1}), "a")


def test_healthy_canary_is_rolled_out_through_every_step() -> None:
    app = FakeApp(app_args(), live={"chat": TrafficSplit(variants={STABLE: 100, CANARY: 0})})
    result = run(app, lambda percent: app.serve(CANARY, int(percent)))
    assert result.completed
    assert app.percents() == [10, 25, 50, 100]
    assert app.applied[-1] == {STABLE: 0.0, CANARY: 100.0}


def test_rollout_resumes_after_the_current_percentage() -> None:
    app = FakeApp(app_args())  # configured at 10% canary, no live weights yet
    assert run(app, lambda percent: app.serve(CANARY, 5)).completed
    assert app.percents() == [25, 50, 100]


def test_canary_errors_roll_back_to_stable_at_once() -> None:
    app = FakeApp(app_args(max_error_rate=0.05))

    def traffic(percent: float) -> None:
        app.serve(CANARY, 20)
        if percent == 50:
            app.serve(CANARY, 5, status=500)

    result = run(app, traffic)
    assert not result.completed
    assert app.percents() == [25, 50, 0]
    assert app.live["chat"].variants == {STABLE: 100.0, CANARY: 0.0}
    assert "rolled back to awq from 50%" in result.reason and "20.0%" in result.reason


def test_slow_canary_rolls_back_on_p95() -> None:
    app = FakeApp(app_args(max_p95_latency_s=1.0))
    result = run(app, lambda percent: app.serve(CANARY, 10, latency_s=3.0))
    assert not result.completed
    assert app.percents() == [25, 0]


def test_errors_before_the_step_do_not_count_against_it() -> None:
    app = FakeApp(app_args(max_error_rate=0.05))
    app.serve(CANARY, 50, status=500)  # earlier history: outside every interval
    assert run(app, lambda percent: app.serve(CANARY, 10)).completed


def test_unreadable_metrics_roll_back() -> None:
    app = FakeApp(app_args())

    def down() -> str:
        raise MetricsUnavailable("cannot read http://127.0.0.1:1/metrics: refused")

    result = run(app, lambda percent: None, scrape=down)
    assert not result.completed and "cannot read" in result.reason
    assert app.live["chat"].variants[CANARY] == 0


def test_rollback_sends_everything_to_stable_and_keeps_other_aliases() -> None:
    code = TrafficSplit(variants={OTHER: 100})
    app = FakeApp(app_args(), live={"chat": TrafficSplit(variants={STABLE: 50, CANARY: 50})})
    app.live["code"] = code
    assert rollback(app, "chat").variants == {STABLE: 100.0, CANARY: 0.0}
    assert app.live["code"] == code
    assert rollback(app, "chat", to=CANARY).variants == {STABLE: 0.0, CANARY: 100.0}


def test_weights_naming_an_unknown_alias_or_model_are_refused_before_applying() -> None:
    app = FakeApp(app_args())
    with pytest.raises(ValueError, match="no alias 'nope'"):
        rollback(app, "nope")
    with pytest.raises(ValueError, match=r"unknown variants \['gpt-9'\]"):
        rollback(app, "chat", to="gpt-9")
    with pytest.raises(ValueError, match=r"unknown variants \['gpt-9'\]"):
        rollout(app, "chat", "gpt-9", [50], 0, app.scrape, lambda _: None, lambda _: None)
    assert app.applied == []
