"""Weighted model variants (canary), sticky per user, with gradual rollout and rollback."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

from pydantic import BaseModel, Field, field_validator

DEFAULT_ROLLOUT_PERCENTS: tuple[int, ...] = (10, 25, 50, 100)


class TrafficSplit(BaseModel):
    """Variant name -> weight; weights need not sum to 100, they are normalised."""

    variants: dict[str, float] = Field(
        description="Variant name to non-negative weight, e.g. {stable: 90, canary: 10}; "
        "at least one weight must be positive.",
    )

    @field_validator("variants")
    @classmethod
    def _weights_are_usable(cls, variants: dict[str, float]) -> dict[str, float]:
        if not variants:
            raise ValueError("traffic split needs at least one variant, e.g. {stable: 100}")
        bad = {name: w for name, w in variants.items() if not math.isfinite(w) or w < 0}
        if bad:
            raise ValueError(f"variant weights must be finite and non-negative; got {bad}")
        if sum(variants.values()) <= 0:
            raise ValueError(
                f"at least one variant weight must be positive; got {variants} "
                "(give the variant that should take the traffic a weight above 0)"
            )
        return variants

    @property
    def order(self) -> list[str]:
        """Fixed variant order (by name) so a reordered config does not reshuffle users."""
        return sorted(self.variants)

    @property
    def shares(self) -> dict[str, float]:
        """Weights normalised to fractions that sum to 1."""
        total = sum(self.variants.values())
        return {name: self.variants[name] / total for name in self.order}


def hash_point(sticky_key: str) -> float:
    """Map a key to a stable point in [0, 1) (sha256, so it holds across processes)."""
    digest = hashlib.sha256(sticky_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def choose_variant(
    split: TrafficSplit, sticky_key: str | None, rng: random.Random | None = None
) -> str:
    """Pick a variant: sticky by `sticky_key` (key id or OpenAI `user`), else at random.

    The point is checked against cumulative shares in a fixed order, so moving weight
    only moves the users whose point lies between the old and the new boundary.
    Prefix the key with the model name to decorrelate assignments across models.
    """
    point = hash_point(sticky_key) if sticky_key is not None else (rng or random).random()
    cumulative = 0.0
    chosen = ""
    for name, share in split.shares.items():
        if share <= 0:
            continue
        chosen = name
        cumulative += share
        if point < cumulative:
            return name
    # Rounding can leave the cumulative sum a hair below 1; the last live variant owns the rest.
    return chosen


def rollout_steps(
    stable: str,
    canary: str,
    start: int = 0,
    steps: Sequence[int] = DEFAULT_ROLLOUT_PERCENTS,
) -> list[TrafficSplit]:
    """The splits still ahead in a gradual rollout of `canary`, after `start` percent.

    `rollout_steps("v1", "v2", start=10)` -> splits at 25, 50 and 100 percent canary.
    """
    if stable == canary:
        raise ValueError(f"stable and canary must be different variants; both are {stable!r}")
    if not steps:
        raise ValueError("rollout needs at least one step, e.g. [10, 25, 50, 100]")
    if any(not 0 < p <= 100 for p in steps) or list(steps) != sorted(set(steps)):
        raise ValueError(
            f"rollout steps must be strictly increasing percentages in (0, 100]; got {list(steps)}"
        )
    if not 0 <= start <= 100:
        raise ValueError(f"start must be a percentage in [0, 100]; got {start}")
    return [
        TrafficSplit(variants={stable: float(100 - p), canary: float(p)})
        for p in steps
        if p > start
    ]


def rolled_back(split: TrafficSplit, stable: str) -> TrafficSplit:
    """Instant rollback: all traffic to `stable`, other variants kept at weight 0."""
    if stable not in split.variants:
        raise ValueError(
            f"cannot roll back to {stable!r}: the split's variants are {sorted(split.variants)}"
        )
    return TrafficSplit(
        variants={name: (100.0 if name == stable else 0.0) for name in split.variants}
    )


def should_roll_back(
    canary_error_rate: float,
    canary_p95_s: float,
    max_error_rate: float,
    max_p95_s: float,
) -> bool:
    """True when the canary breaks either guardrail: error rate or p95 latency."""
    return canary_error_rate > max_error_rate or canary_p95_s > max_p95_s
