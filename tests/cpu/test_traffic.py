"""Weighted variants: sticky assignment, consistent weight moves, rollout and rollback."""

import random

import pytest
from pydantic import ValidationError

from deployments.gateway.traffic import (
    TrafficSplit,
    choose_variant,
    rolled_back,
    rollout_steps,
    should_roll_back,
)

USERS = [f"user-{i}" for i in range(400)]


def assign(split: TrafficSplit) -> dict[str, str]:
    return {user: choose_variant(split, user) for user in USERS}


def test_split_of_90_10_over_400_users_is_within_5_percent():
    split = TrafficSplit(variants={"stable": 90, "canary": 10})
    canary = sum(v == "canary" for v in assign(split).values()) / len(USERS)
    assert abs(canary - 0.10) <= 0.05


def test_assignment_is_sticky_per_user():
    split = TrafficSplit(variants={"stable": 50, "canary": 50})
    for user in USERS[:50]:
        picks = {choose_variant(split, user, random.Random(seed)) for seed in range(5)}
        assert len(picks) == 1


def test_moving_weights_only_moves_users_at_the_boundary():
    before = assign(TrafficSplit(variants={"stable": 90, "canary": 10}))
    after = assign(TrafficSplit(variants={"stable": 75, "canary": 25}))
    moved = [u for u in USERS if before[u] != after[u]]
    assert all(before[u] == "stable" and after[u] == "canary" for u in moved)
    assert abs(len(moved) / len(USERS) - 0.15) <= 0.05


def test_config_order_of_variants_does_not_change_assignment():
    a = assign(TrafficSplit(variants={"stable": 70, "canary": 30}))
    b = assign(TrafficSplit(variants={"canary": 30, "stable": 70}))
    assert a == b


def test_zero_weight_variant_is_never_chosen():
    split = TrafficSplit(variants={"stable": 100, "canary": 0})
    assert set(assign(split).values()) == {"stable"}
    rng = random.Random(0)
    assert {choose_variant(split, None, rng) for _ in range(200)} == {"stable"}


def test_without_sticky_key_choice_is_random_by_weight():
    split = TrafficSplit(variants={"a": 1, "b": 3})
    rng = random.Random(1)
    picks = [choose_variant(split, None, rng) for _ in range(2000)]
    assert abs(picks.count("b") / len(picks) - 0.75) <= 0.05


def test_shares_are_normalised_weights():
    assert TrafficSplit(variants={"stable": 9, "canary": 1}).shares == {
        "canary": pytest.approx(0.1),
        "stable": pytest.approx(0.9),
    }


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ({}, "at least one variant"),
        ({"stable": -1, "canary": 2}, "non-negative"),
        ({"stable": 0, "canary": 0}, "at least one variant weight must be positive"),
        ({"stable": float("nan")}, "finite"),
    ],
)
def test_split_rejects_unusable_weights_with_a_clear_message(variants, message):
    with pytest.raises(ValidationError, match=message):
        TrafficSplit(variants=variants)


def test_rollout_steps_go_10_25_50_100():
    plan = rollout_steps("v1", "v2")
    assert [s.variants for s in plan] == [
        {"v1": 90, "v2": 10},
        {"v1": 75, "v2": 25},
        {"v1": 50, "v2": 50},
        {"v1": 0, "v2": 100},
    ]


def test_rollout_steps_resume_after_the_current_percentage():
    assert [s.variants["v2"] for s in rollout_steps("v1", "v2", start=25)] == [50, 100]
    assert rollout_steps("v1", "v2", start=100) == []


@pytest.mark.parametrize("steps", [[25, 10], [10, 10], [0, 50], [50, 120], []])
def test_rollout_steps_must_be_increasing_percentages(steps):
    with pytest.raises(ValueError):
        rollout_steps("v1", "v2", steps=steps)


def test_rolled_back_sends_every_user_to_stable():
    split = rolled_back(TrafficSplit(variants={"stable": 50, "canary": 50}), "stable")
    assert split.variants == {"stable": 100, "canary": 0}
    assert set(assign(split).values()) == {"stable"}


def test_rolled_back_to_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variants are"):
        rolled_back(TrafficSplit(variants={"stable": 1}), "old")


@pytest.mark.parametrize(
    ("error_rate", "p95_s", "expected"),
    [(0.01, 0.5, False), (0.06, 0.5, True), (0.01, 2.5, True), (0.05, 2.0, False)],
)
def test_should_roll_back_when_canary_breaks_error_or_latency_guardrail(
    error_rate, p95_s, expected
):
    assert should_roll_back(error_rate, p95_s, max_error_rate=0.05, max_p95_s=2.0) is expected
