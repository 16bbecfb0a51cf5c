"""Token buckets and the router's per-IP / per-key limits, on a fake clock."""

import pytest
from pydantic import ValidationError

from deployments.errors import ApiError
from deployments.gateway.rate_limit import (
    RateDecision,
    RateLimitConfig,
    RateLimiter,
    RateLimitError,
    TokenBucket,
    format_reset,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock):
    def make(**config) -> RateLimiter:
        return RateLimiter(RateLimitConfig(**config), clock=clock)

    return make


def exhaust(limiter: RateLimiter, n: int, ip: str = "1.2.3.4", key_id: str | None = None):
    return [limiter.check_request(ip, key_id) for _ in range(n)]


def test_bucket_allows_up_to_capacity_then_returns_the_wait(clock):
    bucket = TokenBucket(capacity=3, refill_per_s=1.0, clock=clock)
    assert [bucket.try_acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_acquire() == pytest.approx(1.0)
    assert bucket.remaining == 0


def test_bucket_refills_after_retry_after_seconds(clock):
    bucket = TokenBucket(capacity=100, refill_per_s=100 / 60, clock=clock)
    for _ in range(100):
        bucket.try_acquire()
    wait = bucket.try_acquire()
    assert wait == pytest.approx(0.6)
    clock.advance(wait / 2)
    assert bucket.try_acquire() > 0
    clock.advance(wait / 2)
    assert bucket.try_acquire() == 0.0


def test_bucket_never_holds_more_than_its_capacity(clock):
    bucket = TokenBucket(capacity=5, refill_per_s=1.0, clock=clock)
    clock.advance(3600)
    assert bucket.remaining == 5
    assert bucket.reset_s == 0


def test_request_larger_than_the_bucket_waits_for_a_full_bucket_then_leaves_debt(clock):
    bucket = TokenBucket(capacity=10, refill_per_s=1.0, clock=clock)
    bucket.try_acquire(4)
    assert bucket.try_acquire(25) == pytest.approx(4.0)
    clock.advance(4)
    assert bucket.try_acquire(25) == 0.0
    assert bucket.try_acquire(1) == pytest.approx(16.0)


def test_ip_limit_of_100_per_minute_rejects_the_101st(limiter):
    rl = limiter()
    decisions = exhaust(rl, 101)
    assert all(d.allowed for d in decisions[:100])
    last = decisions[100]
    assert not last.allowed and last.scope == "ip" and last.limit == 100
    assert rl.check_request("5.6.7.8", None).allowed


def test_rejection_carries_retry_after_of_at_least_one_whole_second(limiter):
    last = exhaust(limiter(), 101)[-1]
    assert last.retry_after_s == pytest.approx(0.6)
    assert last.headers()["Retry-After"] == "1"
    slow = exhaust(limiter(requests_per_minute_per_ip=2), 3)[-1]
    assert slow.headers()["Retry-After"] == "30"


def test_rejected_client_is_served_again_after_retry_after(limiter, clock):
    rl = limiter()
    last = exhaust(rl, 101)[-1]
    clock.advance(last.retry_after_header)
    assert rl.check_request("1.2.3.4", None).allowed


def test_headers_report_limit_remaining_and_reset(limiter):
    decision = exhaust(limiter(), 10)[-1]
    assert decision.headers() == {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "90",
        "x-ratelimit-reset-requests": "6s",
    }


def test_key_limit_applies_across_client_ips(limiter):
    rl = limiter(requests_per_minute_per_key=5)
    decisions = [rl.check_request(f"10.0.0.{i}", "team-a") for i in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[-1].scope == "key"
    assert rl.check_request("10.0.0.9", "team-b").allowed


def test_key_own_rpm_overrides_the_default(limiter):
    rl = limiter(requests_per_minute_per_key=600)
    decisions = [rl.check_request(f"10.0.0.{i}", "small", key_rpm=2) for i in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[-1].limit == 2


def test_denied_request_costs_no_budget(limiter):
    rl = limiter(requests_per_minute_per_key=1)
    rl.check_request("1.1.1.1", "team-a")
    for _ in range(10):
        assert not rl.check_request("1.1.1.1", "team-a").allowed
    # The IP bucket was not charged for the ten refusals.
    assert rl.check_request("1.1.1.1", None).remaining == 98


def test_limit_is_split_evenly_across_router_replicas(limiter):
    decisions = exhaust(limiter(router_replicas=4), 26)
    assert [d.allowed for d in decisions] == [True] * 25 + [False]
    assert decisions[0].limit == 25


def test_config_rejects_a_limit_below_the_replica_count():
    with pytest.raises(ValidationError, match="router_replicas"):
        RateLimitConfig(requests_per_minute_per_ip=3, router_replicas=4)


def test_least_recently_used_clients_are_evicted(limiter):
    rl = limiter(max_tracked_clients=3)
    for i in range(10):
        rl.check_request(f"10.0.0.{i}", None)
    assert len(rl) == 3


def test_disabled_limiter_allows_everything_without_headers(limiter):
    rl = limiter(enabled=False, requests_per_minute_per_ip=1)
    decisions = exhaust(rl, 5, key_id="k")
    assert all(d.allowed and d.headers() == {} for d in decisions)
    assert rl.check_tokens("k", 10**9, key_tpm=1).allowed


def test_token_limit_rejects_when_spent_and_refund_gives_budget_back(limiter):
    rl = limiter(tokens_per_minute_per_key=1000)
    assert rl.check_tokens("team-a", 800).allowed
    denied = rl.check_tokens("team-a", 800)
    assert not denied.allowed and denied.unit == "tokens"
    assert "x-ratelimit-remaining-tokens" in denied.headers()
    rl.refund_tokens("team-a", 700)
    assert rl.check_tokens("team-a", 800).allowed


def test_no_token_limit_unless_configured_or_set_on_the_key(limiter):
    rl = limiter()
    assert rl.check_tokens("team-a", 10**9).allowed
    assert not [rl.check_tokens("team-a", 60, key_tpm=100) for _ in range(2)][-1].allowed


def test_rate_limit_error_is_429_in_openai_shape_with_headers(limiter):
    last = exhaust(limiter(), 101)[-1]
    with pytest.raises(RateLimitError) as info:
        last.raise_if_denied()
    err = info.value
    assert isinstance(err, ApiError) and err.status == 429
    assert err.body()["error"]["code"] == "rate_limit_exceeded"
    assert err.headers["Retry-After"] == "1"
    RateDecision.unlimited().raise_if_denied()


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.02, "20ms"), (1.5, "1.5s"), (6.0, "6s"), (360.0, "6m0s")]
)
def test_reset_is_formatted_like_openai(seconds, text):
    assert format_reset(seconds) == text
