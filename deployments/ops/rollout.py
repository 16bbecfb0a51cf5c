"""Gradual rollout and instant rollback of a canary variant behind an alias.

The policy is pure: which split comes next, and whether the canary stayed inside its guardrails
(`aliases[].rollout` in the config) over an interval, judged from two scrapes of the router's
`/metrics`. The mechanics are thin: new weights go to the Router deployment as `user_config` by
redeploying the app's own config (what `serve deploy` does), so Serve reconfigures the router in
place and no model replica restarts. `awq-serve rollout` / `awq-serve rollback` call
`cli_rollout` / `cli_rollback`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from deployments.config import AliasConfig, AppArgs, RolloutGuardrails, RouterUserConfig
from deployments.gateway.traffic import TrafficSplit, rolled_back, rollout_steps, should_roll_back

# The router's series (deployments/metrics.py:RouterMetrics), labelled model=<alias>, variant.
REQUESTS_SAMPLE = "inference_requests_total"  # + status="2xx" / "4xx" / "5xx"
LATENCY_BUCKET_SAMPLE = "inference_latency_seconds_bucket"  # successful requests only, + le
QUANTILE = 0.95
DEPLOY_TIMEOUT_S = 120


# ---- policy (pure) ---------------------------------------------------------------------------
def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' `histogram_quantile`: linear inside the bucket that holds rank q * total.

    `buckets` are (upper bound, cumulative count) in ascending order, ending with +Inf. A rank in
    the +Inf bucket gets the highest finite bound, as in Prometheus. None when there is no count.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class VariantCounts:
    """One variant's counters behind an alias: cumulative as scraped, or over an interval."""

    requests: float = 0.0
    server_errors: float = 0.0
    latency_buckets: tuple[tuple[float, float], ...] = ()  # (le, cumulative count), ascending

    def since(self, earlier: VariantCounts) -> VariantCounts:
        """The counts between an earlier scrape and this one."""
        if self.requests < earlier.requests:  # the router restarted: its counters began at 0
            return self
        before = dict(earlier.latency_buckets)
        return VariantCounts(
            self.requests - earlier.requests,
            self.server_errors - earlier.server_errors,
            tuple((le, n - before.get(le, 0.0)) for le, n in self.latency_buckets),
        )

    @property
    def error_rate(self) -> float:
        """5xx / all requests: a 4xx is the client's doing (bad input, key, rate limit)."""
        return self.server_errors / self.requests if self.requests else 0.0

    @property
    def p95_s(self) -> float | None:
        return histogram_quantile(QUANTILE, self.latency_buckets)


def parse_variant_counts(metrics_text: str, alias: str) -> dict[str, VariantCounts]:
    """Per-variant counts of the requests sent to `alias`, from Prometheus text."""
    requests: dict[str, float] = defaultdict(float)
    errors: dict[str, float] = defaultdict(float)
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != alias or "variant" not in labels:
                continue
            variant = labels["variant"]
            if sample.name == REQUESTS_SAMPLE:
                requests[variant] += sample.value
                if labels.get("status") == "5xx":
                    errors[variant] += sample.value
            elif sample.name == LATENCY_BUCKET_SAMPLE:
                buckets[variant][float(labels["le"])] += sample.value
    return {
        v: VariantCounts(requests[v], errors[v], tuple(sorted(buckets[v].items())))
        for v in requests.keys() | buckets.keys()
    }


@dataclass(frozen=True)
class Verdict:
    roll_back: bool
    reason: str


def judge(window: VariantCounts, bounds: RolloutGuardrails) -> Verdict:
    """Whether the canary crossed a guardrail over one interval; no traffic is no evidence."""
    if window.requests <= 0:
        return Verdict(False, "no canary requests in the interval")
    p95 = window.p95_s
    reason = (
        f"{window.requests:g} canary requests, error rate {window.error_rate:.1%} "
        f"(max {bounds.max_error_rate:.1%}), p95 "
        + ("n/a" if p95 is None else f"{p95:.3f}s")
        + f" (max {bounds.max_p95_latency_s:g}s)"
    )
    broken = should_roll_back(
        window.error_rate, p95 or 0.0, bounds.max_error_rate, bounds.max_p95_latency_s
    )
    return Verdict(broken, reason)


def stable_variant(configured: TrafficSplit, canary: str | None = None) -> str:
    """Where rollback sends traffic: the configured split's heaviest variant (not the canary)."""
    others = {name: w for name, w in configured.variants.items() if name != canary}
    if not others:
        raise ValueError(
            f"the configured split {configured.variants} has no variant besides {canary!r} "
            "to roll back to"
        )
    return max(sorted(others), key=others.__getitem__)


def canary_percent(split: TrafficSplit, canary: str) -> int:
    return round(split.shares.get(canary, 0.0) * 100)


def all_to(split: TrafficSplit, stable: str) -> TrafficSplit:
    """Every request to `stable`, the split's other variants kept at weight 0."""
    return rolled_back(TrafficSplit(variants={stable: 0.0, **split.variants}), stable)


# ---- the app the weights go to ---------------------------------------------------------------
class SplitTarget(Protocol):
    """A deployed app whose alias weights can be read and replaced (Serve, or a test fake)."""

    def args(self) -> AppArgs: ...

    def live_splits(self) -> dict[str, TrafficSplit]: ...

    def apply(self, splits: dict[str, TrafficSplit]) -> None: ...


def alias_config(args: AppArgs, alias: str) -> AliasConfig:
    for a in args.aliases:
        if a.name == alias:
            return a
    raise ValueError(f"no alias {alias!r} in the app; aliases: {[a.name for a in args.aliases]}")


def current_split(target: SplitTarget, alias: str) -> TrafficSplit:
    return target.live_splits().get(alias) or alias_config(target.args(), alias).split


def set_split(target: SplitTarget, alias: str, split: TrafficSplit) -> None:
    """Replace one alias' live weights, keeping the others; checked before anything changes."""
    live = RouterUserConfig(splits={**target.live_splits(), alias: split})
    live.check(target.args())
    target.apply(live.splits)


@dataclass(frozen=True)
class RolloutResult:
    completed: bool
    split: TrafficSplit
    reason: str


def rollout(
    target: SplitTarget,
    alias: str,
    canary: str,
    steps: Sequence[int],
    interval_s: float,
    scrape: Callable[[], str],
    wait: Callable[[float], None] = time.sleep,
    report: Callable[[str], None] = print,
) -> RolloutResult:
    """Move `alias` to `canary` step by step, watching each step for `interval_s`.

    A step whose interval crosses a guardrail, or whose metrics cannot be read, sends all
    traffic back to the stable variant and ends the rollout.
    """
    config = alias_config(target.args(), alias)
    stable = stable_variant(config.split, canary)
    split = current_split(target, alias)
    start = canary_percent(split, canary)
    for split in rollout_steps(stable, canary, start, steps):
        set_split(target, alias, split)
        try:
            before = parse_variant_counts(scrape(), alias).get(canary, VariantCounts())
            wait(interval_s)
            after = parse_variant_counts(scrape(), alias).get(canary, VariantCounts())
        except MetricsUnavailable as e:
            verdict = Verdict(True, str(e))
        else:
            verdict = judge(after.since(before), config.rollout)
        percent = canary_percent(split, canary)
        report(f"{alias}: {canary} at {percent}%: {verdict.reason}")
        if verdict.roll_back:
            back = all_to(split, stable)
            set_split(target, alias, back)
            reason = f"rolled back to {stable} from {percent}%: {verdict.reason}"
            return RolloutResult(False, back, reason)
    return RolloutResult(True, split, f"{canary} takes {canary_percent(split, canary)}%")


def rollback(target: SplitTarget, alias: str, to: str | None = None) -> TrafficSplit:
    """All of `alias`' traffic to `to` (default: its configured stable variant), at once."""
    config = alias_config(target.args(), alias)
    stable = to or stable_variant(config.split)
    back = all_to(current_split(target, alias), stable)
    set_split(target, alias, back)
    return back


# ---- mechanics: Serve and HTTP ---------------------------------------------------------------
class MetricsUnavailable(RuntimeError):
    """The router's /metrics could not be read, so the canary cannot be judged."""


def metrics_scraper(base_url: str, timeout_s: float = 10.0) -> Callable[[], str]:
    """GET <base_url>/metrics. For HTTPS with a private CA, point SSL_CERT_FILE at its cert.

    Each router replica counts its own requests, so with several replicas a scrape sees one
    replica's share: a sample of the canary's traffic, not all of it.
    """
    url = base_url.rstrip("/") + "/metrics"

    def scrape() -> str:
        try:
            response = httpx.get(url, timeout=timeout_s)
            response.raise_for_status()
        except httpx.HTTPError as e:
            raise MetricsUnavailable(f"cannot read {url}: {e}") from e
        return response.text

    return scrape


class ServeApp:
    """A Serve app deployed from a config (`serve run serve_config.yaml`, `serve deploy`).

    Weights are applied by redeploying every config-deployed app unchanged except this app's
    Router `user_config`: the app's code version (import path, args) stays the same, so Serve
    only calls `Router.reconfigure`.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def _details(self) -> Any:
        from deployments.serve_controller import serve_details

        return serve_details()

    def _config(self) -> dict[str, Any]:
        apps = self._details().applications
        if self.name not in apps:
            raise ValueError(f"no Serve app {self.name!r}; running apps: {sorted(apps)}")
        config = apps[self.name].deployed_app_config
        if config is None:
            raise ValueError(
                f"app {self.name!r} was deployed from Python (serve.run), so it has no config to "
                "update; deploy it from serve_config.yaml (`serve run` / `serve deploy`)"
            )
        return config.model_dump(exclude_unset=True)

    def args(self) -> AppArgs:
        return AppArgs.model_validate(self._config().get("args", {}))

    def _router(self, config: dict[str, Any]) -> dict[str, Any]:
        from deployments.app import ROUTER_DEPLOYMENT

        deployments = config.setdefault("deployments", [])
        for d in deployments:
            if d["name"] == ROUTER_DEPLOYMENT:
                return d
        deployments.append({"name": ROUTER_DEPLOYMENT})
        return deployments[-1]

    def live_splits(self) -> dict[str, TrafficSplit]:
        user_config = self._router(self._config()).get("user_config") or {}
        return RouterUserConfig.model_validate(user_config).splits

    def apply(self, splits: dict[str, TrafficSplit]) -> None:
        from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

        from deployments.serve_controller import deploy_apps

        details = self._details()
        config = self._config()
        self._router(config)["user_config"] = RouterUserConfig(splits=splits).model_dump(
            mode="json"
        )
        apps = [
            ServeApplicationSchema.model_validate(config)
            if name == self.name
            else app.deployed_app_config
            for name, app in details.applications.items()
            if app.deployed_app_config is not None
        ]
        # Serve marks the app DEPLOYING when it takes the config and RUNNING once every Router
        # replica has been reconfigured.
        deploy_apps(
            ServeDeploySchema(applications=apps, target_capacity=details.target_capacity),
            wait_for=[self.name],
            timeout_s=DEPLOY_TIMEOUT_S,
        )

    def url(self) -> str:
        """Where the proxy listens, from Serve's own http_options."""
        http = self._details().http_options
        host = "127.0.0.1" if http.host in (None, "", "0.0.0.0", "::") else http.host
        scheme = "https" if http.ssl_certfile else "http"
        return f"{scheme}://{host}:{http.port}"


@contextmanager
def _on_cluster() -> Iterator[None]:
    """Join the running Ray cluster (RAY_ADDRESS, else the local one) unless already joined."""
    import ray

    joined = not ray.is_initialized()
    if joined:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level=logging.WARNING)
    try:
        yield
    finally:
        if joined:
            ray.shutdown()


def cli_rollout(
    app: str, alias: str, canary: str, steps: Sequence[int], interval_s: float, url: str | None
) -> int:
    """`awq-serve rollout`: 0 when the canary reached the last step, 1 when rolled back."""
    with _on_cluster():
        target = ServeApp(app)
        scrape = metrics_scraper(url or target.url())
        result = rollout(target, alias, canary, steps, interval_s, scrape)
    print(("done: " if result.completed else "ROLLED BACK: ") + result.reason)
    print(f"{alias} split: {result.split.variants}")
    return 0 if result.completed else 1


def cli_rollback(app: str, alias: str, to: str | None) -> int:
    """`awq-serve rollback`: all of the alias' traffic to its stable variant now."""
    with _on_cluster():
        split = rollback(ServeApp(app), alias, to)
    print(f"{alias} split: {split.variants}")
    return 0
