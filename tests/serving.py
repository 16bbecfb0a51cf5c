"""Start the real serving app for tests: Ray, Serve on a free loopback port, the demo model."""

from __future__ import annotations

import gc
import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
CHAT = "smollm2-135m-instruct"
APP = "awq-serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def disconnect_ray() -> None:
    """`ray.shutdown()` after a garbage collection. Ray has ended a test process with status 1
    just after its shutdown ("the language frontend accesses the Ray's worker after it is
    shutdown"); a suspected path, not a proven one, is a Ray handle in a reference cycle (Serve's
    client after `serve.shutdown()`) freed by the cyclic GC after the shutdown. Collecting first
    frees such handles while the core worker is still there."""
    import ray

    gc.collect()
    ray.shutdown()


def app_args(
    registry_root: Path, model_overrides: dict[str, Any] | None = None, **overrides: Any
) -> dict[str, Any]:
    """serve_config.yaml's args, pointed at the test registry, with overrides."""
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    args["models"][0]["registry"] = str(registry_root)
    args["models"][0].update(model_overrides or {})
    args["rate_limit"] = {"requests_per_minute_per_ip": 100_000}
    args["allow_ignore_eos"] = True  # the tests' load decodes to max_tokens, as benchmarks do
    # One test client sends many requests at once from one address, as a load generator does.
    args["client_limits"] = {"max_concurrent_per_client": 10_000, "tokens_per_minute_per_ip": None}
    args.update(overrides)
    return args


@contextmanager
def serve_app(
    registry_root: Path,
    audit_path: Path,
    model_overrides: dict[str, Any] | None = None,
    ray_options: dict[str, Any] | None = None,
    http_options: dict[str, Any] | None = None,
    from_config: bool = False,
    **overrides: Any,
) -> Iterator[str]:
    """`ray_options` go to `ray.init` (e.g. `_metrics_export_port` for the metrics tests).

    `http_options` are added to Serve's (e.g. `ssl_certfile`/`ssl_keyfile`: the URL is then
    https). `from_config` deploys the way `serve run serve_config.yaml` does, as a config the
    controller builds, so the app can be redeployed with a new user_config (rollout).
    """
    import ray
    from ray import serve

    from deployments.app import build_app

    args = app_args(registry_root, model_overrides, **overrides)
    args["audit"] = {"enabled": True, "path": str(audit_path)}
    port = free_port()
    http = {"host": "127.0.0.1", "port": port, **(http_options or {})}
    # "local": a cluster of its own, never one a `ray start` on this machine recorded.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        ignore_reinit_error=True,
        **(ray_options or {}),
    )
    try:
        serve.start(http_options=http)
        if from_config:
            deploy_config(args)
        else:
            serve.run(build_app(args), name=APP, route_prefix="/")
        url = f"{'https' if http.get('ssl_certfile') else 'http'}://127.0.0.1:{port}"
        wait_until_ready(url, http.get("ssl_certfile"))
        yield url
    finally:
        serve.shutdown()
        disconnect_ray()


def wait_until_ready(url: str, certfile: str | None = None, timeout_s: float = 60) -> None:
    """Until `/health` answers 200, as a load balancer's readiness probe waits. Serve calls an
    app RUNNING when its replicas are; the router's readiness comes from its own look at the
    controller, which once still read a just-started replica as missing (a 503 right after the
    deploy returned, in a clean-clone CI run)."""
    import ssl

    import httpx

    from tests.streams import wait_until  # it imports this module

    verify = ssl.create_default_context(cafile=certfile) if certfile else True

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/health", verify=verify, timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout_s, f"{url}/health to answer 200")


def deploy_config(args: dict[str, Any], timeout_s: int = 600) -> None:
    """Deploy `args` as serve_config.yaml's application, and wait until it runs."""
    from ray.serve.schema import ServeDeploySchema

    from deployments.serve_controller import deploy_apps

    app = {"name": APP, "route_prefix": "/", "import_path": "deployments.app:build_app"}
    deploy_apps(ServeDeploySchema(applications=[{**app, "args": args}]), [APP], timeout_s)


def health_detail(
    fetch: Callable[[], dict[str, Any]],
    model: str,
    until: Callable[[dict[str, Any]], bool] = lambda m: m.get("healthy") is True,
    timeout_s: float = 30,
) -> dict[str, Any]:
    """`model`'s entry of a `/health?detail=1` body (`fetch` gets one) once `until` holds.

    The detail is each replica's `info()` as the router last polled it, in the background every
    few seconds, so a test waits for the state it expects rather than reading it once.
    """
    deadline = time.monotonic() + timeout_s
    while not until(entry := fetch()["models"][model]):
        assert time.monotonic() < deadline, f"/health detail never matched: {entry}"
        time.sleep(0.5)
    return entry


def audit_records(path: Path) -> dict[str, dict[str, Any]]:
    """The app's audit log as records by request id (none yet: empty)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return {r["request_id"]: r for r in map(json.loads, lines)}
