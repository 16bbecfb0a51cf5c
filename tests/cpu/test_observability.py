"""Observability end to end: real traffic through the app, then metrics, health and logs.

The app runs on a Ray node with a known metrics export port, so the replica metrics are read back
exactly as Prometheus would scrape them (`ray_` names). Ray exports on a report interval, so
scrapes are polled until they agree with the traffic or a deadline passes.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.gateway.health import (
    HealthMonitor,
    ModelState,
    controller_states,
    health_report,
    status_period,
)
from deployments.logging_setup import configure_logging
from deployments.metrics import EXPORTED_REPLICA_METRICS, UNKNOWN_MODEL, RouterMetrics
from deployments.protocol import Finished, Usage
from tests.serving import CHAT, REPO, free_port, health_detail, serve_app

DASHBOARD = REPO / "configs" / "grafana" / "awq-serve.json"
PRICE = 2.0  # $/GPU-hour configured for the served model
EXPORT_DEADLINE_S = 60
METRIC_NAME = re.compile(r"\b((?:inference|awq_serve|ray_awq_serve)_[a-z0-9_]+)\b")


# ---- the app and its traffic ---------------------------------------------------------------
@dataclass
class App:
    url: str
    ray_metrics_url: str
    logs_dir: Path


@dataclass
class Traffic:
    """What was sent and what the API said it used."""

    ok_ids: list[str]
    prompt_tokens: int
    completion_tokens: list[int]
    client_errors: int  # 4xx for the served model
    unknown_model_errors: int


@pytest.fixture(scope="module")
def app(registry_root: Path, tmp_path_factory: pytest.TempPathFactory):
    import ray

    port = free_port()
    ray_options = {
        "_metrics_export_port": port,
        "_node_ip_address": "127.0.0.1",  # the exporter then listens on loopback only
        "_system_config": {"metrics_report_interval_ms": 1000},  # export lag ~1 s, not ~10 s
    }
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOG_LEVEL", "DEBUG")  # read by build_app here and by replicas (inherited)
        with serve_app(
            registry_root,
            audit_path=audit,
            model_overrides={"gpu_dollars_per_hour": PRICE},
            ray_options=ray_options,
        ) as url:
            logs = Path(ray._private.worker._global_node.get_logs_dir_path())
            yield App(url, f"http://127.0.0.1:{port}/metrics", logs)


def chat(question: str, request_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "json": {
            "model": CHAT,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 12,
            "temperature": 0,
            **extra,
        },
        "headers": {"X-Request-Id": request_id},
    }


async def _send(url: str) -> Traffic:
    questions = ["What is 2 plus 2?", "Name a colour.", "Say hi.", "What is the capital of Italy?"]
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        responses = await asyncio.gather(
            *(
                client.post("/v1/chat/completions", **chat(q, f"obs-chat-{i}"))
                for i, q in enumerate(questions)
            )
        )
        # After the batch above is cached: the chat template's shared opening is a prefix hit.
        repeat = await client.post("/v1/chat/completions", **chat(questions[0], "obs-chat-again"))
        completion = await client.post(
            "/v1/completions",
            json={"model": CHAT, "prompt": "The sky is", "max_tokens": 6, "temperature": 0},
            headers={"X-Request-Id": "obs-completion"},
        )
        too_long = await client.post(
            "/v1/completions", json={"model": CHAT, "prompt": "word " * 3000, "max_tokens": 8}
        )
        unknown = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
        )
    ok = [*responses, repeat, completion]
    assert [r.status_code for r in ok] == [200] * len(ok), [r.text for r in ok]
    assert (too_long.status_code, unknown.status_code) == (400, 404)
    usages = [r.json()["usage"] for r in ok]
    return Traffic(
        ok_ids=[r.headers["x-request-id"] for r in ok],
        prompt_tokens=sum(u["prompt_tokens"] for u in usages),
        completion_tokens=[u["completion_tokens"] for u in usages],
        client_errors=1,
        unknown_model_errors=1,
    )


@pytest.fixture(scope="module")
def traffic(app: App) -> Traffic:
    return asyncio.run(_send(app.url))


# ---- scraping ------------------------------------------------------------------------------
Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> tuple[str, Samples]:
    text = httpx.get(url, timeout=10).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """Sum of the series of `name` whose labels include `labels`; None if there is none."""
    hits = [v for lab, v in samples.get(name, []) if labels.items() <= lab.items()]
    return sum(hits) if hits else None


def poll(url: str, done: Callable[[Samples], bool]) -> Samples:
    """Scrape until `done(samples)` or the deadline; returns the last scrape either way."""
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while True:
        try:
            _, samples = scrape(url)
        except httpx.HTTPError:
            samples = {}
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return {m for e in exprs for m in METRIC_NAME.findall(e)}


def base_name(sample_name: str) -> str:
    return re.sub(r"_(bucket|sum|count|total|created)$", "", sample_name)


@pytest.fixture(scope="module")
def replica_samples(app: App, traffic: Traffic) -> Samples:
    """Ray's export once it has caught up with the traffic (and the engine has gone idle)."""
    names = EXPORTED_REPLICA_METRICS

    def caught_up(s: Samples) -> bool:
        return (
            value(s, names["generated_tokens"] + "_total", model=CHAT)
            == sum(traffic.completion_tokens)
            and value(s, names["running"], model=CHAT) == 0
            and value(s, names["kv_bytes"], model=CHAT) == 0
            and value(s, names["model_load_seconds"], model=CHAT) is not None
        )

    return poll(app.ray_metrics_url, caught_up)


@pytest.fixture(scope="module")
def router_samples(app: App, traffic: Traffic) -> tuple[str, Samples]:
    return scrape(app.url + "/metrics")


# ---- end-to-end tests ----------------------------------------------------------------------
def test_request_counts_equal_requests_sent_by_status_class(router_samples, traffic) -> None:
    text, s = router_samples
    ok = len(traffic.ok_ids)
    assert value(s, "inference_requests_total", model=CHAT, status="2xx") == ok
    assert value(s, "inference_requests_total", model=CHAT, status="4xx") == traffic.client_errors
    unknown = value(s, "inference_requests_total", model=UNKNOWN_MODEL, status="4xx")
    assert unknown == traffic.unknown_model_errors
    assert "gpt-9" not in text, "a client's model name must never become a label value"


def test_latency_histograms_count_successful_requests(router_samples, traffic) -> None:
    _, s = router_samples
    ok = len(traffic.ok_ids)
    for name in (
        "inference_latency_seconds",
        "awq_serve_time_to_first_token_seconds",
        "awq_serve_queue_time_seconds",
    ):
        assert value(s, name + "_count", model=CHAT) == ok, name
        assert value(s, name + "_sum", model=CHAT) > 0, name
    multi_token = sum(1 for n in traffic.completion_tokens if n > 1)
    assert value(s, "awq_serve_time_per_output_token_seconds_count", model=CHAT) == multi_token
    e2e = value(s, "inference_latency_seconds_sum", model=CHAT)
    assert value(s, "awq_serve_time_to_first_token_seconds_sum", model=CHAT) < e2e


def test_token_counters_equal_usage_totals(router_samples, traffic) -> None:
    _, s = router_samples
    assert value(s, "awq_serve_prompt_tokens_total", model=CHAT) == traffic.prompt_tokens
    assert value(s, "awq_serve_generation_tokens_total", model=CHAT) == sum(
        traffic.completion_tokens
    )


def test_live_cost_follows_price_and_window_throughput(router_samples, traffic) -> None:
    _, s = router_samples
    tps = value(s, "awq_serve_output_tokens_per_second", variant=CHAT)
    assert tps > 0
    per_million = value(s, "awq_serve_cost_per_1m_output_tokens_dollars", variant=CHAT)
    assert per_million == pytest.approx(PRICE / (tps * 3600) * 1e6)
    mean_tokens = sum(traffic.completion_tokens) / len(traffic.completion_tokens)
    per_request = value(s, "awq_serve_cost_per_request_dollars", variant=CHAT)
    assert per_request == pytest.approx(per_million * mean_tokens / 1e6)


def test_replica_metrics_reach_rays_export_with_sane_values(replica_samples, traffic) -> None:
    s, n = replica_samples, EXPORTED_REPLICA_METRICS
    tokens = value(s, n["generated_tokens"] + "_total", model=CHAT)
    assert tokens == sum(traffic.completion_tokens)
    # The first token of a request comes from prefill, every later one from a decode step, and
    # at most 4 requests ran together. (Ray exports histogram sums from bucket midpoints, so
    # only counts are exact.)
    decoded = sum(k - 1 for k in traffic.completion_tokens)
    n_steps = value(s, n["batch_size"] + "_count", model=CHAT)
    assert decoded / 4 <= n_steps <= decoded
    assert value(s, n["batch_size"] + "_bucket", model=CHAT, le="4.0") == n_steps
    assert value(s, n["step_seconds"] + "_count", model=CHAT) == n_steps
    assert value(s, n["step_seconds"] + "_sum", model=CHAT) > 0
    assert value(s, n["running"], model=CHAT) == 0  # idle after the traffic
    assert value(s, n["waiting"], model=CHAT) == 0
    assert value(s, n["kv_bytes"], model=CHAT) == 0
    assert value(s, n["memory"], model=CHAT) > 50e6  # a process holding a model
    assert 0 < value(s, n["model_load_seconds"], model=CHAT) < 600
    # Every admitted prompt token is looked up once; hits come in whole 16-token blocks.
    assert value(s, n["prefix_cache_queries"] + "_total", model=CHAT) == traffic.prompt_tokens
    hits = value(s, n["prefix_cache_hits"] + "_total", model=CHAT)
    assert hits is not None and hits % 16 == 0 and 0 < hits < traffic.prompt_tokens


def test_every_dashboard_metric_appears_in_a_scrape(router_samples, replica_samples) -> None:
    scraped = set(router_samples[1]) | set(replica_samples)
    missing = dashboard_metric_names() - scraped
    assert not missing, f"dashboard queries metrics nobody exports: {sorted(missing)}"


def test_health_reports_readiness_replicas_and_queue_depth(app, traffic) -> None:
    r = httpx.get(app.url + "/health", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["models"][CHAT] == {"ready": True, "replicas": 1}

    model = health_detail(
        lambda: httpx.get(app.url + "/health?detail=1", timeout=30).json(),
        CHAT,
        until=lambda m: (m.get("running"), m.get("waiting")) == (0, 0),
    )
    assert model["ready"] is True and model["healthy"] is True and model["replicas"] == 1
    # The replica says how it decodes: the native CPU step, and the demo's fp16-saved lm_head
    # stored in 16 bits with fp32 math (an empty reason: nothing fell back).
    assert model["hardware"]["decode_step"] == "native", model["hardware"]
    assert "native_unavailable" not in model["hardware"]
    assert model["hardware"]["kernels"]["lm_head"] == "native float16-stored, fp32 math"
    # The int4 projections: the native kernel where the CPU has AVX512-BF16, ATen's otherwise.
    bf16 = "avx512_bf16" in model["hardware"]["cpu"]["flags"]
    int4 = model["hardware"]["kernels"]["int4"]
    assert int4 == "native avx512-bf16" if bf16 else int4.startswith("aten ("), int4


def test_json_logs_carry_the_request_id_from_router_to_replica(app, traffic) -> None:
    wanted = set(traffic.ok_ids)

    def lines() -> list[dict[str, Any]]:
        out = []
        for path in app.logs_dir.glob("worker-*.err"):
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    record = json.loads(line)
                    if record.get("request_id") in wanted:
                        out.append(record)
        return out

    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while True:
        records = lines()
        seen = {(r["logger"], r["msg"], r["request_id"]) for r in records}
        expected = {
            (logger, msg, rid)
            for rid in wanted
            for logger, msg in (
                ("awq_serve.router", "request finished"),
                ("awq_serve.replica", "generation finished"),
                ("awq_serve.replica", "admitted"),  # DEBUG: LOG_LEVEL=DEBUG reached the replica
            )
        }
        if expected <= seen or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert expected <= seen, sorted(expected - seen)[:5]
    router = next(r for r in records if r["logger"] == "awq_serve.router")
    assert router["status"] == 200 and router["level"] == "INFO" and router["latency_ms"] > 0


# ---- without Ray ---------------------------------------------------------------------------
def test_dashboard_has_a_datasource_variable_and_a_panel_for_every_metric() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${datasource}" and p["targets"] for p in panels)
    # Family names are the base names: counters without _total, histograms without _bucket.
    declared = {f.name for f in RouterMetrics({"m": 1.0}).registry.collect()}
    declared |= set(EXPORTED_REPLICA_METRICS.values())
    missing = declared - {base_name(n) for n in dashboard_metric_names()}
    assert not missing, f"metrics without a dashboard panel: {sorted(missing)}"


def test_router_metrics_keep_labels_to_the_served_names() -> None:
    m = RouterMetrics({"a": 0.0, "b": 1.0}, aliases=["chat"])
    m.observe("chat", "a", 200, 0.5, Finished("stop", Usage(2, 3)))
    m.observe("DROP TABLE users", "-", 404, 0.01, None)
    text = m.render().decode()
    assert 'inference_requests_total{model="chat",status="2xx",variant="a"} 1.0' in text
    assert 'inference_requests_total{model="unknown",status="4xx",variant="-"} 1.0' in text
    assert "DROP TABLE" not in text
    # Variant a has no price: throughput but no made-up $0 cost series.
    assert 'awq_serve_output_tokens_per_second{variant="a"}' in text
    assert 'cost_per_1m_output_tokens_dollars{variant="a"}' not in text


def test_router_cost_gauge_uses_the_window_throughput() -> None:
    clock = iter([10.0, 12.0])
    m = RouterMetrics({"b": 3.6}, clock=lambda: next(clock))
    m.observe("b", "b", 200, 2.0, Finished("stop", Usage(1, 100)))  # 8..10
    m.observe("b", "b", 200, 1.0, Finished("stop", Usage(1, 100)))  # 11..12
    tps = 200 / (12.0 - 8.0)
    assert m.output_tok_per_s.labels("b")._value.get() == pytest.approx(tps)
    per_million = 3.6 / (tps * 3600) * 1e6
    assert m.cost_per_million.labels("b")._value.get() == pytest.approx(per_million)
    assert m.cost_per_request.labels("b")._value.get() == pytest.approx(per_million * 100 / 1e6)


def test_health_is_503_while_a_model_has_no_running_replica() -> None:
    status, body = health_report({"a": ModelState(1, "HEALTHY"), "b": ModelState(0, "UNHEALTHY")})
    assert status == 503 and body["not_ready"] == ["b"] and body["status"] == "unavailable"
    assert body["models"]["a"] == {"ready": True, "replicas": 1}  # the public body: no details
    status, body = health_report({"a": ModelState(None)})  # count unknown: not a reason for 503
    assert status == 200 and body["status"] == "ok" and body["models"]["a"]["ready"] is True


def test_health_detail_merges_the_replicas_last_info_but_never_decides_readiness() -> None:
    busy = {"healthy": False, "error": "TimeoutError", "source": "m:v1"}  # info() timed out
    status, body = health_report({"a": ModelState(2, "HEALTHY")}, {"a": busy})
    assert status == 200
    model = body["models"]["a"]
    assert model["ready"] is True and model["replicas"] == 2
    assert model["source"] == "m:v1" and model["deployment_status"] == "HEALTHY"


def test_health_monitor_rereads_the_controller_only_for_a_503_from_an_old_snapshot() -> None:
    now = [100.0]
    monitor = HealthMonitor({}, clock=lambda: now[0])
    assert monitor._stale_refusal()  # nothing read yet
    monitor.states, monitor._states_at = {"a": ModelState(0)}, now[0]
    assert not monitor._stale_refusal()  # a fresh 503 stands
    now[0] += 1.0
    assert monitor._stale_refusal()  # an old one is confirmed first
    monitor.states = {"a": ModelState(1)}
    assert not monitor._stale_refusal()  # a 200 is answered from the snapshot, however old


def test_controller_is_polled_slowly_only_while_every_model_is_ready_and_healthy() -> None:
    period = partial(status_period, changing_s=1.0, steady_s=5.0)
    assert period({"a": ModelState(2, "HEALTHY"), "b": ModelState(1, "HEALTHY")}) == 5.0
    assert period({"a": ModelState(2, "HEALTHY"), "b": ModelState(0, "HEALTHY")}) == 1.0
    assert period({"a": ModelState(2, "UPDATING")}) == 1.0  # a redeploy or a scale-up
    assert period({"a": ModelState(1, "UNHEALTHY")}) == 1.0
    assert period({"a": ModelState(None)}) == 1.0  # the controller has not answered yet
    assert period({}) == 1.0


def test_controller_states_count_running_replicas_per_model_deployment() -> None:
    from ray.serve.handle import DeploymentHandle
    from ray.serve.schema import (
        ApplicationStatus,
        ApplicationStatusOverview,
        DeploymentStatus,
        DeploymentStatusOverview,
        DeploymentStatusTrigger,
        ServeStatus,
    )

    def deployment(status: DeploymentStatus, **replicas: int) -> DeploymentStatusOverview:
        return DeploymentStatusOverview(
            status, DeploymentStatusTrigger.UNSPECIFIED, dict(replicas), ""
        )

    app = ApplicationStatusOverview(
        ApplicationStatus.DEPLOYING,
        "",
        0.0,
        {
            "ModelServer-a": deployment(DeploymentStatus.HEALTHY, RUNNING=2, STARTING=1),
            "ModelServer-b": deployment(DeploymentStatus.UNHEALTHY, STARTING=1),
        },
    )
    handles = {
        name: DeploymentHandle(f"ModelServer-{name}", "awq-serve") for name in ("a", "b", "c")
    }
    states = controller_states(ServeStatus(applications={"awq-serve": app}), handles)
    assert states == {
        "a": ModelState(2, "HEALTHY"),
        "b": ModelState(0, "UNHEALTHY"),
        "c": ModelState(0, None),  # not deployed: nothing serves it
    }
    assert health_report(states)[1]["not_ready"] == ["b", "c"]


def test_log_lines_are_json_with_request_id_and_respect_the_level(
    monkeypatch, restore_logger
) -> None:
    out = StringIO()
    log = configure_logging("warning", stream=out)
    child = log.getChild("test")
    child.info("dropped", extra={"request_id": "r0"})
    child.warning("kept %d", 1, extra={"request_id": "r1", "status": 503})
    try:
        raise ValueError("boom")
    except ValueError:
        child.exception("failed", extra={"request_id": "r2"})
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(r["msg"], r["request_id"]) for r in lines] == [("kept 1", "r1"), ("failed", "r2")]
    assert lines[0]["status"] == 503 and lines[0]["logger"] == "awq_serve.test"
    assert "ValueError: boom" in lines[1]["exc"]
    monkeypatch.setenv("LOG_LEVEL", "debug")
    assert configure_logging(stream=StringIO()).level == 10
    assert len(configure_logging(stream=StringIO()).handlers) == 1, "reconfiguring must not stack"
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("LOUD")


def test_cost_metric_is_finite_for_any_observed_request() -> None:
    m = RouterMetrics({"b": 1.0}, clock=lambda: 5.0)
    m.observe("b", "b", 200, 0.0, Finished("stop", Usage(1, 0)))
    text = m.render().decode()
    assert "cost_per_1m_output_tokens_dollars{" not in text  # no tokens yet: undefined, absent
    assert all(not math.isinf(s.value) for f in m.registry.collect() for s in f.samples)
