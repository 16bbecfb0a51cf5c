"""Limits for clients without an API key: concurrent requests per client, tokens per minute per IP.

Without them one anonymous client can hold every decode slot (16 requests with a large
max_tokens) for minutes. Keys carry their own caps from the keys file: the concurrency limiter
takes a per-call cap for them, and their token budgets are rate_limit.py's. Like rate_limit.py,
each router replica enforces its share locally: pass the app's `router_replicas` to
`from_config`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Self

from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import ApiError
from deployments.gateway.rate_limit import Clock, RateDecision, RateLimiter, TokenBucket


class ClientLimitsConfig(BaseModel):
    """Caps for anonymous clients (keys get theirs from the keys file).

    Per client: `max_concurrent_per_client` requests in flight. Per IP: prompt + completion
    `tokens_per_minute_per_ip`. Both are split over the router replicas.
    """

    model_config = ConfigDict(extra="forbid")

    # Retry-After of a concurrency refusal is a fixed hint: when a slot frees is unknown.
    max_concurrent_per_client: int = Field(4, ge=1, description="Requests in flight at once.")
    tokens_per_minute_per_ip: int | None = Field(20_000, gt=0, description="None = no cap.")
    max_tracked_clients: int = Field(10_000, ge=1, description="Token buckets kept (LRU).")
    concurrency_retry_after_s: float = Field(1.0, gt=0, description="Retry-After hint.")


class ConcurrencyLimitError(ApiError):
    """429 in the OpenAI shape with `Retry-After`: too many requests in flight from one client."""

    def __init__(self, limit: int, retry_after_s: float) -> None:
        retry = max(1, math.ceil(retry_after_s))
        super().__init__(
            429,
            f"Too many concurrent requests from this client: at most {limit} at once. "
            f"Retry after {retry} s.",
            type="requests",
            code="concurrency_limit_exceeded",
            headers={"Retry-After": str(retry)},
        )
        self.limit = limit
        self.retry_after_s = retry_after_s


class ConcurrencyLease:
    """One admitted request's slot; `release()` is idempotent, so every exit path may call it."""

    def __init__(self, limiter: ConcurrencyLimiter, client: str) -> None:
        self._limiter = limiter
        self.client = client
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self.client)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ConcurrencyLimiter:
    """In-flight requests per client, at most `max_per_client` each.

    Only clients with a request in flight are kept (an entry goes when its count reaches 0),
    so memory is bounded by the requests in flight, not by how many clients ever came.
    `acquire` never awaits, so it is atomic on the event loop; the lock covers threads.
    """

    def __init__(self, max_per_client: int, retry_after_s: float = 1.0) -> None:
        if max_per_client < 1:
            raise ValueError(f"max_per_client must be at least 1; got {max_per_client}")
        self.max_per_client = max_per_client
        self.retry_after_s = retry_after_s
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(
        cls, config: ClientLimitsConfig, router_replicas: int = 1
    ) -> ConcurrencyLimiter:
        """This router replica's share of the cap (rounded up: never below 1)."""
        share = math.ceil(config.max_concurrent_per_client / router_replicas)
        return cls(share, config.concurrency_retry_after_s)

    def __len__(self) -> int:
        return len(self._in_flight)

    def in_flight(self, client: str) -> int:
        return self._in_flight.get(client, 0)

    def acquire(self, client: str, limit: int | None = None) -> ConcurrencyLease:
        """A slot for `client`, or ConcurrencyLimitError; `limit` overrides the cap (a key's)."""
        cap = limit or self.max_per_client
        with self._lock:
            current = self._in_flight.get(client, 0)
            if current >= cap:
                raise ConcurrencyLimitError(cap, self.retry_after_s)
            self._in_flight[client] = current + 1
        return ConcurrencyLease(self, client)

    def _release(self, client: str) -> None:
        with self._lock:
            left = self._in_flight.get(client, 0) - 1
            if left > 0:
                self._in_flight[client] = left
            else:
                self._in_flight.pop(client, None)


class TokenBudget:
    """Tokens per minute per client IP: reserve prompt + max_tokens up front, settle on usage.

    Reserving the worst case at admission stops a burst of large requests before it runs;
    settling afterwards refunds what was not generated, or charges an overrun (the router only
    estimates prompt tokens) as debt, so the long-run rate holds either way.
    """

    def __init__(
        self,
        tokens_per_minute: int,
        router_replicas: int = 1,
        max_tracked: int = 10_000,
        clock: Clock = time.monotonic,
    ) -> None:
        if tokens_per_minute < router_replicas:
            raise ValueError(
                f"tokens_per_minute={tokens_per_minute} is below router_replicas="
                f"{router_replicas}: each replica's share would be under 1 token per minute"
            )
        self.tokens_per_minute = tokens_per_minute
        self.router_replicas = router_replicas
        self.max_tracked = max_tracked
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_config(
        cls, config: ClientLimitsConfig, router_replicas: int = 1, clock: Clock = time.monotonic
    ) -> TokenBudget | None:
        """The budget the config asks for, or None when it sets no token cap."""
        if config.tokens_per_minute_per_ip is None:
            return None
        return cls(
            config.tokens_per_minute_per_ip, router_replicas, config.max_tracked_clients, clock
        )

    def __len__(self) -> int:
        return len(self._buckets)

    def _bucket_for(self, ip: str) -> TokenBucket:
        per_replica = self.tokens_per_minute / self.router_replicas
        bucket = self._buckets.pop(ip, None)
        if bucket is None:
            bucket = TokenBucket(per_replica, per_replica / 60, self._clock)
        self._buckets[ip] = bucket  # re-inserted last: most recently used
        if len(self._buckets) > self.max_tracked:
            self._buckets.popitem(last=False)
        return bucket

    def reserve(self, ip: str, n_tokens: int) -> RateDecision:
        """Take `n_tokens` now, or take none and say when to retry (`raise_if_denied` -> 429)."""
        with self._lock:
            bucket = self._bucket_for(ip)
            wait = bucket.try_acquire(float(n_tokens))
            # rate_limit.py's own bucket-to-decision helper, so the x-ratelimit-* headers are
            # computed one way (TODO lead: make it a public RateDecision.from_bucket).
            return RateLimiter._decision(bucket, "ip", "tokens", wait)

    def settle(self, ip: str, reserved: int, used: int) -> None:
        """After the request: refund `reserved - used`, or charge the overrun as debt."""
        if reserved == used:
            return
        with self._lock:
            # A negative refund lowers the bucket, possibly below zero: TokenBucket treats that
            # as debt the next reservation waits out. An evicted IP's refund is simply lost.
            bucket = self._buckets.get(ip)
            if bucket is not None:
                bucket.refund(float(reserved - used))
