"""Serve autoscaling of CPU replicas: sustained load adds a replica, idleness removes it again.

The real app on the demo model with `autoscaling: {min 1, max 2, target_ongoing_requests 2}` and
short delays. Ray's own defaults (upscale after 30 s, downscale after 600 s) would not scale down
within this test, so passing shows that app.py hands the config's fields to Serve.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from deployments.app import deployment_name
from deployments.config import AppArgs, AutoscalingConfig, apply_env_overrides
from tests.serving import CHAT, REPO, app_args, serve_app

pytestmark = pytest.mark.slow  # starts Ray Serve with the demo model

APP = "awq-serve"
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 5,
    # Averaged over 3 s, not Ray's 30 s (and reported every 0.5 s, PUSH_INTERVAL below): the test
    # then waits for the new replica's model load, not for Serve's averaging window.
    "look_back_period_s": 3,
}
PUSH_INTERVAL = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}
CLIENTS = 8  # 4x the target for one replica: Serve wants ceil(8 / 2) = 4, capped at 2
# Bounds for Serve to react: a new replica loads the model (10-20 s on 2 busy cores).
SCALE_UP_S = 120
SCALE_DOWN_S = 120


def test_our_autoscaling_fields_are_ones_ray_serve_accepts() -> None:
    from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

    assert set(AutoscalingConfig.model_fields) <= set(RayAutoscalingConfig.model_fields)
    ours = AutoscalingConfig.model_validate(AUTOSCALING).model_dump()
    assert RayAutoscalingConfig(**ours).model_dump(include=set(ours)) == ours


def test_gpu_serve_config_autoscales_one_gpu_replicas_onto_the_runpod_workers() -> None:
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load((REPO / "configs/serve_gpu.yaml").read_text())
    cluster_yaml = (REPO / "configs/cluster/runpod.yaml").read_text()
    cluster = yaml.safe_load(cluster_yaml)
    serve = ServeDeploySchema.model_validate(serve_config)
    assert serve.http_options.host == "0.0.0.0", "RunPod's proxy must reach the head pod"
    args = AppArgs.model_validate(apply_env_overrides(serve.applications[0].args, environ={}))
    assert args.auth.enabled, "a public endpoint needs API keys"
    workers = [t for name, t in cluster["available_node_types"].items()
               if name != cluster["head_node_type"]]  # fmt: skip
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"]["GPU"] == 0, "replicas must land on GPU workers, not the head"
    assert all(t["resources"]["GPU"] >= 1 for t in workers)
    for model in args.models:
        assert model.num_gpus == 1 and model.device == "auto"
        assert model.autoscaling is not None and model.autoscaling.min_replicas >= 1
        # Each replica needs a worker pod of its own: no more replicas than pods can start.
        assert model.max_replicas_per_node == 1
        assert model.autoscaling.max_replicas == cluster["max_workers"]
        assert all(t["resources"]["CPU"] >= model.num_cpus for t in workers)
    # `serve deploy` builds the app in a worker whose cwd is not the repo: paths must be absolute.
    raw = serve_config["applications"][0]["args"]
    paths = [m["registry"] for m in raw["models"]]
    paths += [raw["audit"]["path"], raw["auth"]["keys_file"]]
    assert all(Path(path).is_absolute() for path in paths), paths
    assert "serve deploy configs/serve_gpu.yaml" in cluster_yaml


@pytest.fixture(scope="module")
def base_url(registry_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = app_args(registry_root)["models"][0]
    model.update(num_cpus=0.5, autoscaling=AUTOSCALING)
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with pytest.MonkeyPatch.context() as env:
        for name, value in PUSH_INTERVAL.items():
            env.setenv(name, value)  # read by Serve's controller and replicas, started below
        with serve_app(registry_root, audit_path=audit, models=[model]) as url:
            yield url


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments[deployment_name(CHAT)]
    return deployment.replica_states.get("RUNNING", 0)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `condition` held; fails the test past `timeout_s`."""
    started = time.monotonic()
    while not condition():
        waited = time.monotonic() - started
        assert waited < timeout_s, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(1)
    return time.monotonic() - started


def test_sustained_load_scales_to_two_replicas_and_idle_scales_back_to_one(base_url) -> None:
    assert running_replicas() == 1, "starts at min_replicas"
    statuses: list[int] = []
    stop = threading.Event()

    def client_loop() -> None:
        body = {"model": CHAT, "prompt": "Write a long story about a cat.", "max_tokens": 64,
                "ignore_eos": True, "stream": True}  # fmt: skip
        with httpx.Client(base_url=base_url, timeout=120) as client:
            while not stop.is_set():
                try:
                    with client.stream("POST", "/v1/completions", json=body) as r:
                        lines = [line for line in r.iter_lines() if line]
                except httpx.HTTPError:
                    statuses.append(-1)
                    continue
                done = r.status_code == 200 and lines[-1:] == ["data: [DONE]"]
                statuses.append(r.status_code if done else -1)  # -1: the stream broke off

    threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: running_replicas() == 2, SCALE_UP_S, "a second replica under load")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=130)
    assert statuses and set(statuses) == {200}, "every streamed request completed"

    # Idle now: Serve removes the extra replica once the averaged load falls below target.
    wait_until(lambda: running_replicas() == 1, SCALE_DOWN_S, "scale-down to min_replicas")
    r = httpx.post(base_url + "/v1/completions", timeout=60,
                   json={"model": CHAT, "prompt": "Hello", "max_tokens": 4})  # fmt: skip
    assert r.status_code == 200, r.text
