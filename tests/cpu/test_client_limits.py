"""Anonymous limits: concurrent requests per client and tokens per minute per IP."""

import asyncio

import pytest
from pydantic import ValidationError

from deployments.errors import ApiError
from deployments.gateway.client_limits import (
    ClientLimitsConfig,
    ConcurrencyLimiter,
    ConcurrencyLimitError,
    TokenBudget,
)
from deployments.gateway.rate_limit import RateLimitError
from tests.cpu.test_rate_limit import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ---- concurrency -----------------------------------------------------------------------------
def test_a_client_gets_its_cap_of_slots_then_429_with_retry_after() -> None:
    limiter = ConcurrencyLimiter(max_per_client=2, retry_after_s=1.5)
    leases = [limiter.acquire("1.2.3.4") for _ in range(2)]
    with pytest.raises(ConcurrencyLimitError) as refused:
        limiter.acquire("1.2.3.4")
    err = refused.value
    assert isinstance(err, ApiError) and err.status == 429
    assert err.headers["Retry-After"] == "2"  # whole seconds, rounded up
    assert err.retry_after_s == 1.5
    assert err.body()["error"]["code"] == "concurrency_limit_exceeded"
    assert "at most 2" in err.message
    assert len(leases) == 2


def test_other_clients_are_not_affected_by_one_clients_cap() -> None:
    limiter = ConcurrencyLimiter(max_per_client=1)
    limiter.acquire("a")
    limiter.acquire("b")
    with pytest.raises(ConcurrencyLimitError):
        limiter.acquire("a")


def test_a_released_slot_can_be_taken_again() -> None:
    limiter = ConcurrencyLimiter(max_per_client=1)
    lease = limiter.acquire("a")
    lease.release()
    limiter.acquire("a")
    assert limiter.in_flight("a") == 1


def test_release_is_idempotent_so_every_exit_path_may_call_it() -> None:
    limiter = ConcurrencyLimiter(max_per_client=2)
    first, second = limiter.acquire("a"), limiter.acquire("a")
    first.release()
    first.release()
    assert limiter.in_flight("a") == 1
    second.release()
    assert limiter.in_flight("a") == 0


def test_lease_as_context_manager_releases_on_error() -> None:
    limiter = ConcurrencyLimiter(max_per_client=1)
    with pytest.raises(RuntimeError), limiter.acquire("a"):
        raise RuntimeError("request failed")
    assert limiter.in_flight("a") == 0


def test_idle_clients_are_not_kept_so_memory_is_bounded_by_requests_in_flight() -> None:
    limiter = ConcurrencyLimiter(max_per_client=1)
    for i in range(10_000):
        limiter.acquire(f"10.0.{i // 256}.{i % 256}").release()
    assert len(limiter) == 0


def test_a_per_call_limit_overrides_the_cap_for_keys() -> None:
    limiter = ConcurrencyLimiter(max_per_client=1)
    limiter.acquire("key:team-a", limit=3)
    limiter.acquire("key:team-a", limit=3)
    limiter.acquire("key:team-a", limit=3)
    with pytest.raises(ConcurrencyLimitError, match="at most 3"):
        limiter.acquire("key:team-a", limit=3)


def test_concurrent_tasks_never_exceed_the_cap() -> None:
    limiter = ConcurrencyLimiter(max_per_client=3)
    peak = 0
    refused = 0

    async def request() -> None:
        nonlocal peak, refused
        try:
            lease = limiter.acquire("a")
        except ConcurrencyLimitError:
            refused += 1
            return
        try:
            peak = max(peak, limiter.in_flight("a"))
            await asyncio.sleep(0.01)
        finally:
            lease.release()

    async def main() -> None:
        await asyncio.gather(*(request() for _ in range(20)))

    asyncio.run(main())
    assert peak == 3 and refused == 17
    assert len(limiter) == 0


def test_concurrency_cap_is_shared_over_router_replicas_rounding_up() -> None:
    config = ClientLimitsConfig(max_concurrent_per_client=5)
    assert ConcurrencyLimiter.from_config(config, router_replicas=2).max_per_client == 3


def test_limiter_refuses_a_cap_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConcurrencyLimiter(max_per_client=0)


# ---- token budget ------------------------------------------------------------------------------
def test_token_budget_admits_up_to_the_budget_then_429_with_retry_after(clock) -> None:
    budget = TokenBudget(tokens_per_minute=600, clock=clock)  # 10 tokens/s
    assert budget.reserve("1.2.3.4", 500).allowed
    decision = budget.reserve("1.2.3.4", 200)
    assert not decision.allowed
    assert decision.retry_after_s == pytest.approx(10.0)  # 100 missing at 10/s
    assert decision.headers()["Retry-After"] == "10"
    assert decision.scope == "ip" and decision.unit == "tokens"
    with pytest.raises(RateLimitError, match="this client IP: 600 tokens per minute"):
        decision.raise_if_denied()


def test_a_refused_reservation_takes_nothing(clock) -> None:
    budget = TokenBudget(tokens_per_minute=600, clock=clock)
    budget.reserve("a", 500)
    assert not budget.reserve("a", 200).allowed
    assert budget.reserve("a", 100).allowed


def test_settling_refunds_what_was_not_generated(clock) -> None:
    budget = TokenBudget(tokens_per_minute=600, clock=clock)
    assert budget.reserve("a", 600).allowed  # prompt + max_tokens
    budget.settle("a", reserved=600, used=100)
    assert budget.reserve("a", 500).allowed
    assert not budget.reserve("a", 1).allowed


def test_settling_charges_an_overrun_as_debt(clock) -> None:
    budget = TokenBudget(tokens_per_minute=600, clock=clock)
    budget.reserve("a", 100)
    budget.settle("a", reserved=100, used=700)  # prompt was longer than estimated
    decision = budget.reserve("a", 1)
    assert not decision.allowed
    assert decision.retry_after_s == pytest.approx(10.1)  # 500 - 600 = 100 of debt, + 1, at 10/s


def test_budget_refills_over_time(clock) -> None:
    budget = TokenBudget(tokens_per_minute=600, clock=clock)
    budget.reserve("a", 600)
    clock.advance(30)
    assert budget.reserve("a", 300).allowed


def test_budgets_are_per_ip(clock) -> None:
    budget = TokenBudget(tokens_per_minute=600, clock=clock)
    budget.reserve("a", 600)
    assert budget.reserve("b", 600).allowed


def test_one_request_larger_than_the_budget_waits_for_a_full_bucket_not_forever(clock) -> None:
    budget = TokenBudget(tokens_per_minute=600, clock=clock)
    budget.reserve("a", 300)
    assert budget.reserve("a", 5000).retry_after_s == pytest.approx(30.0)
    clock.advance(30)
    assert budget.reserve("a", 5000).allowed


def test_token_buckets_are_bounded_by_evicting_the_least_recently_used(clock) -> None:
    budget = TokenBudget(tokens_per_minute=600, max_tracked=3, clock=clock)
    budget.reserve("a", 600)
    for ip in ("b", "c", "d"):
        budget.reserve(ip, 1)
    assert len(budget) == 3
    assert budget.reserve("a", 600).allowed  # "a" was evicted: a fresh, full bucket


def test_settling_an_evicted_ip_is_harmless(clock) -> None:
    budget = TokenBudget(tokens_per_minute=600, max_tracked=1, clock=clock)
    budget.reserve("a", 100)
    budget.reserve("b", 100)
    budget.settle("a", reserved=100, used=0)
    assert len(budget) == 1


def test_token_budget_is_shared_over_router_replicas(clock) -> None:
    config = ClientLimitsConfig(tokens_per_minute_per_ip=1200)
    budget = TokenBudget.from_config(config, router_replicas=2, clock=clock)
    assert budget is not None
    assert budget.reserve("a", 600).allowed
    assert not budget.reserve("a", 1).allowed


def test_a_budget_below_one_token_per_replica_is_refused() -> None:
    with pytest.raises(ValueError, match="below router_replicas=2"):
        TokenBudget.from_config(ClientLimitsConfig(tokens_per_minute_per_ip=1), router_replicas=2)


def test_no_token_cap_in_config_gives_no_budget() -> None:
    assert TokenBudget.from_config(ClientLimitsConfig(tokens_per_minute_per_ip=None)) is None


@pytest.mark.parametrize(
    "bad",
    [
        {"max_concurrent_per_client": 0},
        {"tokens_per_minute_per_ip": 0},
        {"concurrency_retry_after_s": 0},
        {"unknown_field": 1},
    ],
)
def test_config_rejects_bad_settings(bad) -> None:
    with pytest.raises(ValidationError):
        ClientLimitsConfig(**bad)
