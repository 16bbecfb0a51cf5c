"""Multi-node serving: a real two-node Ray cluster on this machine, replicas spread, a node lost.

Each node is its own `ray start` (the head with resource `node_a`, a joining node with `node_b`),
each in its own process group, so one node can be killed like a crashed machine without touching
any other Ray on the host (`ray stop` would stop them all). The app is the real one on the demo
model: two ModelServer replicas with `max_replicas_per_node: 1`, the Router pinned to the head.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from deployments.app import deployment_name
from tests.serving import CHAT, app_args, disconnect_ray, free_port, health_detail

pytestmark = pytest.mark.slow  # starts Ray Serve with the demo model

RAY = str(Path(sys.executable).with_name("ray"))
APP = "awq-serve"
REPLICA_CLASS = f"ServeReplica:{APP}:{deployment_name(CHAT)}"
REQUEST_TIMEOUT_S = 60  # a request that outlives this counts as a hang
CLIENTS = 3


@dataclass
class RayNode:
    """One Ray node on this machine, started by `ray start` in its own process group."""

    resource: str
    launcher: subprocess.Popen[bytes]

    def processes(self) -> list[psutil.Process]:
        """The node's daemons (its process group) and every worker its raylet started."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if os.getpgid(proc.pid) == self.launcher.pid:
                    found[proc.pid] = proc
                    # Workers run in their own process groups, as children of the raylet.
                    found.update({c.pid: c for c in proc.children(recursive=True)})
        return list(found.values())

    def kill(self) -> None:
        """SIGKILL every process of the node at once: a machine failure, not a drain."""
        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=30)


def start_node(args: list[str], resource: str, log: Path) -> RayNode:
    """`ray start` returns once the node has registered with the cluster."""
    env = {
        **os.environ,
        # Explicit: the head turns token auth on when ~/.ray/auth_token exists, a joining node
        # and a driver given an address do not, so leaving it unset depends on the home folder.
        "RAY_AUTH_MODE": "disabled",
    }
    cmd = [
        RAY, "start", *args, f"--resources={json.dumps({resource: 1})}", "--num-cpus=1",
        "--num-gpus=0", "--object-store-memory=100000000", "--disable-usage-stats",
        # 52365, the default, would collide with the other node and with other Rays here.
        f"--dashboard-agent-listen-port={free_port()}",
    ]  # fmt: skip
    with log.open("wb") as out:
        launcher = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)  # fmt: skip
    node = RayNode(resource, launcher)
    try:
        rc = launcher.wait(timeout=120)
    except subprocess.TimeoutExpired:
        node.kill()
        raise
    assert rc == 0, f"`ray start` for {resource} failed:\n{log.read_text()[-3000:]}"
    return node


@dataclass
class Cluster:
    address: str
    dashboard: str
    head: RayNode
    worker: RayNode


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("ray")
    port, dashboard_port = free_port(), free_port()
    nodes: list[RayNode] = []
    try:
        nodes.append(start_node(
            ["--head", f"--port={port}", f"--temp-dir={tmp}",
             # The state API (which replica runs on which node) is served by the dashboard.
             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}"],
            "node_a", tmp / "head.log"))  # fmt: skip
        nodes.append(start_node([f"--address=127.0.0.1:{port}"], "node_b", tmp / "node_b.log"))
        yield Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", *nodes)
    finally:
        for node in nodes:
            node.kill()


@dataclass
class App:
    url: str
    cluster: Cluster
    node_ids: dict[str, str]  # custom resource -> Ray node id


@pytest.fixture(scope="module")
def app(cluster: Cluster, registry_root: Path) -> Iterator[App]:
    import ray
    from ray import serve

    from deployments.app import build_app

    args = app_args(registry_root, audit={"enabled": False})
    args["models"][0].update(num_cpus=0.5, num_replicas=2, max_replicas_per_node=1)
    port = free_port()
    ray.init(address=cluster.address)
    try:
        node_ids = {
            r: n["NodeID"] for n in ray.nodes() for r in ("node_a", "node_b") if r in n["Resources"]
        }
        assert len(node_ids) == 2, ray.nodes()
        # One proxy, on the head: both nodes share this machine's ports.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield App(f"http://127.0.0.1:{port}", cluster, node_ids)
    finally:
        serve.shutdown()
        disconnect_ray()


def alive_on(app: App, class_name: str) -> list[str]:
    """Node ids of the live actors of a class, as Ray's state API reports them."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=app.cluster.dashboard,
        filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")],
    )
    return sorted(a.node_id for a in actors)


def test_two_replicas_of_one_model_are_spread_one_per_node(app: App) -> None:
    assert alive_on(app, REPLICA_CLASS) == sorted(app.node_ids.values())
    # Pinned to the head: losing a worker node must not take the ingress with it.
    assert alive_on(app, f"ServeReplica:{APP}:Router") == [app.node_ids["node_a"]]


@dataclass
class Outcome:
    started: float
    ended: float
    stream: bool
    status: int | None = None  # None: no HTTP answer within REQUEST_TIMEOUT_S (a hang) or no answer
    error: str | None = None  # transport error, or the error code from a JSON / SSE error body
    json_error: bool = False  # the failure carried an OpenAI-shaped JSON error

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def one_request(client: httpx.Client, stream: bool) -> Outcome:
    body = {"model": CHAT, "prompt": "The capital of France is", "max_tokens": 24,
            "temperature": 0, "stream": stream}  # fmt: skip
    out = Outcome(time.monotonic(), 0.0, stream)
    try:
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as r:
                out.status = r.status_code
                lines = [line for line in r.iter_lines() if line]
            last = lines[-1].removeprefix("data: ") if lines else ""
            if out.status == 200 and last != "[DONE]":  # a mid-stream failure event
                out.error, out.json_error = error_code(json_or_none(last))
            elif out.status != 200:
                out.error, out.json_error = error_code(json_or_none("\n".join(lines)))
        else:
            r = client.post("/v1/completions", json=body)
            out.status = r.status_code
            if r.status_code != 200:
                out.error, out.json_error = error_code(json_or_none(r.text))
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.ended = time.monotonic()
    return out


def json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def error_code(body: Any) -> tuple[str, bool]:
    """The `code` of an OpenAI-shaped error body, and whether the body had that shape."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and {"message", "type", "code"} <= set(err):
        return str(err["code"]), True
    return f"not an OpenAI error body: {body!r}", False


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.5)


def test_losing_a_node_keeps_requests_flowing_on_the_surviving_replica(app: App) -> None:
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def client_loop(stream: bool) -> None:
        with httpx.Client(base_url=app.url, timeout=REQUEST_TIMEOUT_S) as client:
            while not stop.is_set():
                outcomes.append(one_request(client, stream))

    threads = [threading.Thread(target=client_loop, args=(i == 0,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: sum(o.ok for o in outcomes) >= 2 * CLIENTS, 120, "traffic before kill")
        app.cluster.worker.kill()
        # Requests sent before this instant may have been in flight on the dead replica.
        killed_at = time.monotonic()
        assert app.cluster.worker.processes() == [], "node_b still has live processes"
        wait_until(lambda: sum(o.started > killed_at for o in outcomes) >= 4 * CLIENTS, 150,
                   "traffic after the kill")  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=REQUEST_TIMEOUT_S + 10)
    assert not any(t.is_alive() for t in threads), "a client hung past the request timeout"

    failed = [o for o in outcomes if not o.ok]
    assert all(o.status is not None for o in outcomes), [o.error for o in failed]
    # The only failures allowed: requests in flight on the dying replica, answered as the
    # router's 503 JSON error (or an SSE error event once a stream had started).
    for o in failed:
        assert o.json_error and o.error in {"replica_died", "replica_unavailable"}, o
        assert o.started < killed_at, f"a request sent after the kill failed: {o}"
        # A stream that had started reports the failure as its last SSE event.
        assert o.status == 503 or (o.stream and o.status == 200), o
    after = [o for o in outcomes if o.started > killed_at]
    assert len(after) >= 4 * CLIENTS and all(o.ok for o in after)
    assert all(o.ended - o.started < REQUEST_TIMEOUT_S for o in outcomes)

    # Ray saw the node die, and what serves now is the replica on the head node.
    import ray

    wait_until(
        lambda: not next(n["Alive"] for n in ray.nodes() if n["NodeID"] == app.node_ids["node_b"]),
        60,
        "Ray to mark node_b dead",
    )
    assert alive_on(app, REPLICA_CLASS) == [app.node_ids["node_a"]]
    health_detail(
        lambda: httpx.get(app.url + "/health?detail=1", timeout=30).json(),
        CHAT,
        until=lambda m: m.get("node_id") == app.node_ids["node_a"],
    )
