"""Token-bucket rate limits per client IP and per API key (requests and tokens per minute).

Each router replica keeps its own buckets and enforces `limit / router_replicas`: Serve spreads
requests evenly over replicas, so the sum is about the configured limit, and the hot path needs
no hop to shared state (Redis, an actor) on every request.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Self

from pydantic import BaseModel, Field, model_validator

from deployments.errors import ApiError

Clock = Callable[[], float]
Scope = Literal["ip", "key", "off"]
Unit = Literal["requests", "tokens"]

# Float refill arithmetic can leave a bucket a hair short after waiting exactly the wait time.
_EPSILON = 1e-9


class TokenBucket:
    """`capacity` tokens, refilled continuously at `refill_per_s`; starts full."""

    def __init__(self, capacity: float, refill_per_s: float, clock: Clock = time.monotonic):
        if capacity <= 0 or refill_per_s <= 0:
            raise ValueError(
                f"bucket capacity and refill rate must be positive; got {capacity}, {refill_per_s}"
            )
        self.capacity = capacity
        self.refill_per_s = refill_per_s
        self._clock = clock
        self._tokens = capacity
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.refill_per_s)
        self._updated = now

    def wait_s(self, n: float = 1.0) -> float:
        """Seconds until `n` tokens could be taken (0.0 if now), without taking them.

        A request larger than the whole bucket needs only a full bucket, then leaves it in
        debt, so it is neither refused forever nor lets the long-run rate exceed the limit.
        """
        self._refill()
        missing = min(n, self.capacity) - self._tokens
        return 0.0 if missing <= _EPSILON else missing / self.refill_per_s

    def try_acquire(self, n: float = 1.0) -> float:
        """Take `n` tokens and return 0.0, or take none and return the seconds to wait."""
        wait = self.wait_s(n)
        if wait == 0.0:
            self._tokens -= n
        return wait

    def refund(self, n: float) -> None:
        """Give back tokens taken for work that did not happen (capped at capacity)."""
        self._refill()
        self._tokens = min(self.capacity, self._tokens + n)

    @property
    def remaining(self) -> float:
        """Tokens available now (0 while in debt)."""
        self._refill()
        return max(0.0, self._tokens)

    @property
    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        self._refill()
        return (self.capacity - self._tokens) / self.refill_per_s


def format_reset(seconds: float) -> str:
    """A duration as OpenAI's `x-ratelimit-reset-*` headers write it: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    secs = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{secs}" if minutes else secs


@dataclass(frozen=True)
class RateDecision:
    """The outcome of one check, with what the router needs for 429s and rate headers."""

    allowed: bool
    retry_after_s: float
    limit: int
    remaining: int
    reset_s: float
    scope: Scope
    unit: Unit = "requests"

    @classmethod
    def unlimited(cls, unit: Unit = "requests") -> RateDecision:
        """The decision when limiting is off: allowed, no headers."""
        return cls(True, 0.0, 0, 0, 0.0, "off", unit)

    @property
    def retry_after_header(self) -> int:
        """`Retry-After` in whole seconds, at least 1 (rounded up, so a retry then succeeds)."""
        return max(1, math.ceil(self.retry_after_s))

    def headers(self) -> dict[str, str]:
        """`x-ratelimit-{limit,remaining,reset}-<unit>`, plus `Retry-After` when denied."""
        if self.scope == "off":
            return {}
        headers = {
            f"x-ratelimit-limit-{self.unit}": str(self.limit),
            f"x-ratelimit-remaining-{self.unit}": str(self.remaining),
            f"x-ratelimit-reset-{self.unit}": format_reset(self.reset_s),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_header)
        return headers

    @staticmethod
    def tightest(*decisions: RateDecision) -> RateDecision:
        """The decision whose headers a response carries: a denial, else the least left."""
        limited = [d for d in decisions if d.scope != "off"] or list(decisions)
        return min(limited, key=lambda d: (d.allowed, d.remaining / max(d.limit, 1)))

    def raise_if_denied(self) -> None:
        """Raise `RateLimitError` (429 with headers) when this decision denies the request."""
        if not self.allowed:
            raise RateLimitError(self)


class RateLimitError(ApiError):
    """429 in the OpenAI shape; `headers` carry `Retry-After` and the rate-limit headers."""

    def __init__(self, decision: RateDecision) -> None:
        who = "this API key" if decision.scope == "key" else "this client IP"
        super().__init__(
            429,
            f"Rate limit reached for {who}: {decision.limit} {decision.unit} per minute. "
            f"Retry after {decision.retry_after_header} s.",
            type=decision.unit,
            code="rate_limit_exceeded",
            headers=decision.headers(),
        )
        self.decision = decision


class RateLimitConfig(BaseModel):
    """Per-IP and per-key limits; each router replica enforces its share (limit / replicas)."""

    enabled: bool = Field(default=True, description="Apply rate limits (429 with Retry-After).")
    requests_per_minute_per_ip: int = Field(
        default=100, gt=0, description="Requests per minute from one client IP, keyed or not."
    )
    requests_per_minute_per_key: int = Field(
        default=600,
        gt=0,
        description="Requests per minute per API key, unless the key sets its own limit.",
    )
    tokens_per_minute_per_key: int | None = Field(
        default=None,
        gt=0,
        description="Prompt + completion tokens per minute per API key, unless the key sets "
        "its own; None = no token limit.",
    )
    router_replicas: int = Field(
        default=1,
        ge=1,
        description="Router replicas sharing the budget. Each enforces limit / replicas locally, "
        "so the hot path needs no shared-state hop; set it to the router's num_replicas.",
    )
    max_tracked_clients: int = Field(
        default=10_000,
        ge=1,
        description="Buckets kept in memory; the least recently used are evicted past this.",
    )

    @model_validator(mode="after")
    def _every_replica_gets_a_share(self) -> Self:
        limits = {
            "requests_per_minute_per_ip": self.requests_per_minute_per_ip,
            "requests_per_minute_per_key": self.requests_per_minute_per_key,
            "tokens_per_minute_per_key": self.tokens_per_minute_per_key,
        }
        for name, value in limits.items():
            if value is not None and value < self.router_replicas:
                raise ValueError(
                    f"{name}={value} is below router_replicas={self.router_replicas}: each "
                    "replica enforces limit / replicas, which would be under 1 per minute; "
                    "raise the limit or lower router_replicas"
                )
        return self


class RateLimiter:
    """Buckets per client IP and per key, bounded by LRU eviction; safe across threads."""

    def __init__(self, config: RateLimitConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket(self, kind: str, ident: str, per_minute: int) -> TokenBucket:
        share = per_minute / self.config.router_replicas
        key = (kind, ident)
        bucket = self._buckets.get(key)
        # A changed limit (keys file or config reloaded) starts a fresh bucket at the new size.
        if bucket is None or bucket.refill_per_s != share / 60:
            bucket = TokenBucket(max(1.0, share), share / 60, self._clock)
            self._buckets[key] = bucket
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.config.max_tracked_clients:
            self._buckets.popitem(last=False)
        return bucket

    @staticmethod
    def _decision(
        bucket: TokenBucket, scope: Scope, unit: Unit, wait_s: float = 0.0
    ) -> RateDecision:
        return RateDecision(
            allowed=wait_s == 0.0,
            retry_after_s=wait_s,
            limit=int(bucket.capacity),
            remaining=math.floor(bucket.remaining),
            reset_s=bucket.reset_s,
            scope=scope,
            unit=unit,
        )

    def check_request(
        self, client_ip: str, key_id: str | None, key_rpm: int | None = None
    ) -> RateDecision:
        """Count one request against its IP and (if keyed) its key; both must allow it.

        Nothing is taken unless every bucket allows, so a denied request costs no budget.
        """
        if not self.config.enabled:
            return RateDecision.unlimited()
        with self._lock:
            buckets: list[tuple[Scope, TokenBucket]] = [
                ("ip", self._bucket("ip", client_ip, self.config.requests_per_minute_per_ip))
            ]
            if key_id is not None:
                rpm = key_rpm or self.config.requests_per_minute_per_key
                buckets.append(("key", self._bucket("key", key_id, rpm)))
            return self._take_one(buckets)

    def check_ip(self, client_ip: str) -> RateDecision:
        """Count one request against its IP alone: before the key is even looked at, so a
        client guessing keys spends its IP's budget and meets 429s, not endless 401s."""
        return self.check_request(client_ip, None)

    def check_key(self, key_id: str, key_rpm: int | None = None) -> RateDecision:
        """Count one request against an authenticated key (its IP was charged already)."""
        if not self.config.enabled:
            return RateDecision.unlimited()
        with self._lock:
            rpm = key_rpm or self.config.requests_per_minute_per_key
            return self._take_one([("key", self._bucket("key", key_id, rpm))])

    def _take_one(self, buckets: list[tuple[Scope, TokenBucket]]) -> RateDecision:
        """One token from every bucket, or none from any; call with the lock held."""
        waits = [(bucket.wait_s(1.0), scope, bucket) for scope, bucket in buckets]
        wait, scope, bucket = max(waits, key=lambda w: w[0])
        if wait > 0:
            return self._decision(bucket, scope, "requests", wait)
        for _, b in buckets:
            b.try_acquire(1.0)
        scope, bucket = min(buckets, key=lambda sb: sb[1].remaining / sb[1].capacity)
        return self._decision(bucket, scope, "requests")

    def _token_limit(self, key_tpm: int | None) -> int | None:
        return key_tpm or self.config.tokens_per_minute_per_key

    def check_tokens(self, key_id: str, n_tokens: int, key_tpm: int | None = None) -> RateDecision:
        """Take `n_tokens` (e.g. prompt + max_tokens) from the key's per-minute token budget."""
        tpm = self._token_limit(key_tpm)
        if not self.config.enabled or tpm is None:
            return RateDecision.unlimited("tokens")
        with self._lock:
            bucket = self._bucket("tokens", key_id, tpm)
            wait = bucket.try_acquire(float(n_tokens))
            return self._decision(bucket, "key", "tokens", wait)

    def refund_tokens(self, key_id: str, n_tokens: int, key_tpm: int | None = None) -> None:
        """Return tokens reserved but not generated (max_tokens minus completion tokens)."""
        tpm = self._token_limit(key_tpm)
        if not self.config.enabled or tpm is None or n_tokens <= 0:
            return
        with self._lock:
            self._bucket("tokens", key_id, tpm).refund(float(n_tokens))
