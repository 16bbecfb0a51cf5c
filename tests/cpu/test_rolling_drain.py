"""Downscale and redeploy under streaming load cut no stream: Serve stops a replica only after its
ongoing requests (a stream counts until its last event) are done, within the drain timeout.

The real app deployed as a config (as `serve run serve_config.yaml` does) with two autoscaled
replicas; streams run on both while (1) the autoscaling bounds drop to one replica, then (2) the
app is redeployed with new init args (a rolling restart of the model and router replicas). Each
step must have a replica STOPPING while streams are open, and every stream ends with [DONE]."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deployments.app import ROUTER_DEPLOYMENT, deployment_name
from tests.serving import APP, CHAT, app_args, serve_app
from tests.streams import Stream, open_stream, wait_all, wait_until

pytestmark = pytest.mark.slow  # starts Ray Serve with the demo model

STREAMS = 6
MAX_TOKENS = 192  # long enough that the change lands mid-stream, short of the 30 s drain
TWO = {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 64,
       "upscale_delay_s": 0, "downscale_delay_s": 1}  # fmt: skip


MODEL = deployment_name(CHAT)


@dataclass(frozen=True)
class Served:
    url: str
    args: dict[str, Any]


def model_args(registry_root: Path, **changes: Any) -> dict[str, Any]:
    model = app_args(registry_root)["models"][0]
    model.update(num_cpus=0.5, **changes)  # two replicas and a rolling one fit in 2 CPUs
    return model


@pytest.fixture(scope="module")
def served(registry_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    model = model_args(registry_root, autoscaling=TWO)
    with serve_app(registry_root, audit_path=audit, from_config=True, models=[model]) as url:
        wait_until(lambda: replicas(MODEL).get("RUNNING") == 2, 300, "2 replicas")
        # The args serve_app deployed: a redeploy changes only what a step means to change.
        args = app_args(registry_root, models=[model])
        args["audit"] = {"enabled": True, "path": str(audit)}
        yield Served(url, args)


def deploy(args: dict[str, Any], deployments: list[dict[str, Any]]) -> None:
    """Deploy the app config, without waiting (the streams are watched instead)."""
    from ray.serve.schema import ServeDeploySchema

    from deployments.serve_controller import deploy_apps

    app = {"name": APP, "route_prefix": "/", "import_path": "deployments.app:build_app"}
    app |= {"args": args, "deployments": deployments}
    deploy_apps(ServeDeploySchema(applications=[app]), wait_for=[], timeout_s=0)


def replicas(deployment: str) -> dict[str, int]:
    from ray import serve

    app = serve.status().applications.get(APP)
    # Empty while the controller rebuilds the app (a config with an autoscaling_config override
    # has a new code version); the replicas keep serving meanwhile.
    state = app.deployments.get(deployment) if app else None
    return dict(state.replica_states) if state else {}


def change_under_load(url: str, change: Callable[[], None]) -> list[Stream]:
    """Open streams, apply `change`, and check that a model replica stopped while they ran."""
    stopping = MODEL
    streams = [open_stream(url, MAX_TOKENS) for _ in range(STREAMS)]
    wait_all(streams, lambda s: s.started, 120)
    change()
    wait_until(lambda: replicas(stopping).get("STOPPING", 0) > 0 or all_ended(streams), 60,
               f"a {stopping} replica to stop")  # fmt: skip
    assert not all_ended(streams), "the replica must stop while streams are open"
    wait_all(streams, lambda s: s.ended, 120)
    return streams


def all_ended(streams: list[Stream]) -> bool:
    return all(s.ended.is_set() for s in streams)


def assert_all_finished(streams: list[Stream]) -> None:
    for s in streams:
        assert s.status == 200 and s.transport_error is None, s.summary()
        assert s.error is None and s.finish_reason == "length" and s.done, s.summary()


def test_downscale_then_redeploy_under_streaming_load_cut_no_stream(served: Served) -> None:
    # Serve's own scale-down: the same app, autoscaling bounds now 1..1 (a config-level change,
    # no restart), so the controller stops one of the two replicas, streams and all.
    one = [{"name": MODEL, "autoscaling_config": {**TWO, "min_replicas": 1, "max_replicas": 1}}]
    assert_all_finished(change_under_load(served.url, lambda: deploy(served.args, one)))
    wait_until(lambda: replicas(MODEL) == {"RUNNING": 1}, 120, "one replica")

    # New init args: Serve replaces the model replica and the router (both take the args).
    args = copy.deepcopy(served.args)
    args["models"][0]["default_max_tokens"] = 200
    assert_all_finished(change_under_load(served.url, lambda: deploy(args, one)))
    wait_until(lambda: replicas(ROUTER_DEPLOYMENT) == {"RUNNING": 1}, 180, "the new router")
    wait_until(lambda: replicas(MODEL) == {"RUNNING": 1}, 180, "the new model replica")
