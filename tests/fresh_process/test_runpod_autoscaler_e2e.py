"""Ray's real autoscaler driving RunPodNodeProvider end to end, on this machine.

The head is a `ray start --head --autoscaling-config=...` whose monitor process runs Ray's
`StandardAutoscaler` with the production provider (`cluster.runpod`) against the fake RunPod
GraphQL API. Pods the autoscaler creates become real Ray nodes with a fake `GPU` resource
(tests/fakes/runpod_pods.py): the updater runs the config's setup and `ray start` commands in
them through a local command runner, the one thing that replaces SSH. Every node has its own
loopback address (127.0.0.N), which the provider learns from RunPod's (fake) private DNS.

Steps 1-4 use a tiny Serve deployment that needs `num_gpus: 1` and answers with the pod it runs
on (not the real model: what is under test is the autoscaling, and the model's own serving
tests cover the model). Step 5 runs the real quantization CLI with `--gpus 1` on a 2-layer model.

`make test` runs this module in a process of its own (tests/cpu/test_fresh_process.py says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from cluster.runpod import RunPodNodeProvider
from tests.fakes.runpod_api import FakeRunPodAPI
from tests.fakes.runpod_pods import (
    POD_MARKER,
    SESSION_MARKER,
    kill_pod,
    kill_session,
    pod_processes,
    start_reaper,
)
from tests.serving import REPO, disconnect_ray, free_port

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
CLUSTER = "awq-e2e"
POD = {
    "cloud_type": "SECURE",
    "global_networking": True,
    "data_center_id": "EU-RO-1",
    "image_name": "ghcr.io/test/awq-serve:0.1.0",
    "gpu_count": 1,
    "ports": "22/tcp",
}
HEAD_POD = {**POD, "gpu_type_id": "NVIDIA RTX A4000", "ports": "22/tcp,8000/http"}
GPU_POD = {**POD, "gpu_type_id": "NVIDIA GeForce RTX 4090"}
# 30 s: an idle GPU pod goes soon after its replica. Not less: a pod counts as idle from when
# it joins until its replica holds the GPU, and on a loaded 2-core host (this module runs beside
# the suite) that once took over 9 s, so the autoscaler ended a pod its pending replica was
# placed on (production: 10 minutes).
IDLE_TIMEOUT_MIN = 0.5
WAIT_S = 180  # bound of any one wait; a step that needs longer is a failure


class Timeline:
    """Seconds since the cluster fixture started, per event; printed at the end (-s)."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.events: list[tuple[float, str]] = []

    def mark(self, event: str) -> None:
        self.events.append((time.monotonic() - self.start, event))
        print(f"[{self.events[-1][0]:7.1f}s] {event}", flush=True)


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    """Poll check until it returns something truthy (nothing here signals these changes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@dataclass
class Cluster:
    fake: FakeRunPodAPI
    head_id: str
    gcs_address: str
    tmp: Path
    timeline: Timeline
    extra_processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def worker_pods(self) -> list[str]:
        return [p.id for p in self.fake.live_pods() if p.id != self.head_id]

    def log_lines(self, name: str) -> list[str]:
        path = self.tmp / name
        return path.read_text().split() if path.exists() else []

    def monitor(self) -> psutil.Process:
        """The head's autoscaler process (Ray's monitor.py)."""
        [proc] = [
            p
            for p in pod_processes(self.head_id)
            if any(part.endswith("autoscaler/_private/monitor.py") for part in p.cmdline())
        ]
        return proc


def cluster_config(port: int, tmp: Path, provider: dict[str, Any]) -> dict[str, Any]:
    """configs/cluster/runpod.yaml's shape, sized for this machine; the start commands are the
    YAML's without `ray stop` (here it would stop every Ray on the machine) and the DNS wait
    (RunPod's DNS is the fake's, which the provider asks)."""
    ray_start = (
        f"{RAY} start --address=$RAY_HEAD_IP:{port} --node-ip-address=$FAKE_POD_IP "
        "--object-store-memory=80000000 --disable-usage-stats --dashboard-agent-listen-port=0"
    )
    return {
        "cluster_name": CLUSTER,
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": provider,
        "auth": {"ssh_user": "root"},
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 2, "GPU": 0}, "node_config": HEAD_POD},
            "rtx4090": {
                "resources": {"CPU": 1, "GPU": 1},
                "min_workers": 0,
                "max_workers": 2,
                "node_config": GPU_POD,
            },
        },
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [f"echo $RUNPOD_POD_ID >> {tmp}/setup.log"],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [f"echo $RUNPOD_POD_ID >> {tmp}/ray_start.log", ray_start],
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    timeline = Timeline()
    tmp = tmp_path_factory.mktemp("runpod-e2e")
    (tmp / "pods").mkdir()
    # Pod N gets 127.0.0.N: the head, created first, is 127.0.0.1, where a driver finds it.
    fake = FakeRunPodAPI(global_ip_base="127.0.0.", on_terminate=lambda pod: kill_pod(pod.id))
    fake.start()
    token = uuid.uuid4().hex
    reaper = start_reaper(token)
    env = {
        SESSION_MARKER: token,
        **os.environ,
        "RUNPOD_API_BASE_URL": fake.url,
        "RUNPOD_API_KEY": fake.api_key,
        "NO_PROXY": "127.0.0.1",
        "PYTHONPATH": str(REPO),
        "RAY_AUTH_MODE": "disabled",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    }
    saved_env = dict(os.environ)
    os.environ.update({k: env[k] for k in ("RUNPOD_API_BASE_URL", "RUNPOD_API_KEY", "NO_PROXY")})
    provider_config = {
        "type": "external",
        "module": "tests.fakes.runpod_pods.LocalPodNodeProvider",
        "api_key": fake.api_key,
        "state_path": str(tmp / "head-tags.json"),
        "pods_dir": str(tmp / "pods"),
        "max_retries": 3,
        "backoff_base_s": 0.2,
    }
    port = free_port()
    # Short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes (pytest's are long).
    ray_tmp = Path(tempfile.mkdtemp(prefix="rp-", dir="/tmp"))
    head_id = ""
    state: Cluster | None = None
    try:
        # What `ray up` does first: launch the head pod through the provider.
        up_state = {**provider_config, "state_path": str(tmp / "up.json")}
        laptop = RunPodNodeProvider(up_state, CLUSTER)
        head_tags = {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: "head"}
        [head_id] = laptop.create_node(HEAD_POD, head_tags, 1)
        laptop.set_node_tags(head_id, {TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE})
        head_ip = fake.pods[head_id].global_ip
        assert head_ip == "127.0.0.1"
        config = prepare_config(cluster_config(port, tmp, provider_config))
        RunPodNodeProvider.bootstrap_config(config)  # what `ray up` checks
        config_path = tmp / "ray_bootstrap_config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        state = Cluster(fake, head_id, f"{head_ip}:{port}", tmp, timeline)
        cmd = [
            RAY, "start", "--head", f"--node-ip-address={head_ip}", f"--port={port}",
            f"--autoscaling-config={config_path}", "--num-cpus=2", "--num-gpus=0",
            f"--temp-dir={ray_tmp}", "--include-dashboard=false", "--disable-usage-stats",
            "--object-store-memory=100000000", f"--ray-client-server-port={free_port()}",
            "--dashboard-agent-listen-port=0",
        ]  # fmt: skip
        with (tmp / "head.log").open("wb") as out:
            rc = subprocess.run(
                cmd,
                env={**env, POD_MARKER: head_id},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                timeout=120,
            ).returncode
        assert rc == 0, (tmp / "head.log").read_text()[-3000:]
        timeline.mark(f"head up at {state.gcs_address} (pod {head_id}), autoscaler running")
        yield state
    finally:
        for proc in state.extra_processes if state else []:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        kill_session(token)
        reaper.kill()
        fake.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved_env)


@pytest.fixture(scope="module")
def ray_driver(cluster: Cluster) -> Iterator[None]:
    import ray
    from ray import serve

    ray.init(address=cluster.gcs_address, logging_level=logging.WARNING)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        disconnect_ray()


def deploy_gpu_app(host: str) -> str:
    """Deploy the app behind Serve's HTTP proxy on the head (as the Router is); its URL."""
    from ray import serve

    @serve.deployment(
        ray_actor_options={"num_gpus": 1, "num_cpus": 0},
        max_ongoing_requests=2,
        autoscaling_config={
            "min_replicas": 0,
            "initial_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "downscale_to_zero_delay_s": 3,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
    )
    class GpuModel:
        async def __call__(self, request: Any) -> dict[str, Any]:
            import ray

            await asyncio.sleep(float(request.query_params.get("seconds", 0)))
            return {"pod": os.environ.get("RUNPOD_POD_ID"), "pid": os.getpid(),
                    "gpus": ray.get_gpu_ids()}  # fmt: skip

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    # serve._run without waiting: serve.run would block until the replica runs, i.e. the pod.
    serve._run(GpuModel.bind(), name="gpu", route_prefix="/", _blocking=False)
    return f"http://{host}:{port}/"


def app_status() -> str:
    from ray import serve

    app = serve.status().applications.get("gpu")
    return app.status if app else "MISSING"


def ask(url: str, seconds: float) -> dict[str, Any]:
    reply = httpx.get(url, params={"seconds": seconds}, timeout=WAIT_S)
    reply.raise_for_status()
    return reply.json()


class Load:
    """Keeps `concurrency` requests in flight until stopped; records who answered."""

    def __init__(self, url: str, concurrency: int, seconds: float) -> None:
        self.url, self.seconds = url, seconds
        self.answers: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(concurrency)
        self._futures = [self._pool.submit(self._loop) for _ in range(concurrency)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(ask(self.url, self.seconds))
            except Exception as exc:
                self.errors.append(repr(exc))

    def pods(self) -> set[str]:
        return {a["pod"] for a in self.answers}

    def stop(self) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=WAIT_S)
        self._pool.shutdown()


def autoscaler_updates(pid: int) -> set[float]:
    """Times of the updates the autoscaler process `pid` has reported to the GCS so far."""
    from ray.experimental.internal_kv import _internal_kv_get

    seen = getattr(autoscaler_updates, "seen", {})
    autoscaler_updates.seen = seen  # type: ignore[attr-defined]
    raw = _internal_kv_get("__autoscaling_status")
    status = json.loads(raw) if raw else {}
    if status.get("monitor_pid") == pid and "autoscaler_report" in status:
        seen.setdefault(pid, set()).add(status["time"])
    return seen.get(pid, set())


def test_gpu_pods_come_and_go_with_serve_load_and_survive_an_autoscaler_restart(
    cluster: Cluster, ray_driver: None
) -> None:
    t = cluster.timeline
    fake = cluster.fake

    # 1. A replica that needs a GPU waits for the autoscaler to create a pod.
    creates_before = fake.calls.count("podFindAndDeployOnDemand")
    url = deploy_gpu_app(cluster.gcs_address.split(":")[0])
    status, pods_then = app_status(), cluster.worker_pods()
    assert status != "RUNNING"
    t.mark(f"app deployed: app {status}, replica pending, GPU pods {pods_then}")
    [first] = wait_for("a GPU pod", cluster.worker_pods)
    assert fake.pods[first].spec["gpuTypeId"] == "NVIDIA GeForce RTX 4090"
    assert fake.pods[first].spec["cloudType"] == "SECURE"
    assert fake.calls.count("podFindAndDeployOnDemand") == creates_before + 1
    t.mark(f"autoscaler called create_node: pod {first} created (podFindAndDeployOnDemand)")
    wait_for("the app to run", lambda: app_status() == "RUNNING")
    answer = ask(url, 0)
    assert answer["pod"] == first and answer["gpus"] == [0]
    t.mark(f"replica running on pod {first}, answered {answer}")

    # 2. Load above one replica's target: Serve adds a replica, the autoscaler a second pod.
    load = Load(url, concurrency=4, seconds=1.0)
    try:
        pods = wait_for("a second GPU pod", lambda: len(cluster.worker_pods()) == 2 or None)
        [second] = [p for p in cluster.worker_pods() if p != first]
        t.mark(f"under load: second pod {second} created")
        wait_for("answers from both pods", lambda: load.pods() >= {first, second})
        t.mark("second replica running: answers come from both pods")

        # 3. The autoscaler process dies and comes back; live workers are left alone.
        setups, starts = cluster.log_lines("setup.log"), cluster.log_lines("ray_start.log")
        assert sorted(setups) == sorted(starts) == sorted([first, second])
        replica_pids = {a["pid"] for a in load.answers[-8:]}
        old = cluster.monitor()
        command, environ, cwd = old.cmdline(), old.environ(), old.cwd()
        old.send_signal(signal.SIGKILL)
        old.wait(30)
        with (cluster.tmp / "monitor-restarted.log").open("wb") as out:
            new = subprocess.Popen(command, env=environ, cwd=cwd, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        cluster.extra_processes.append(new)
        t.mark(f"autoscaler killed (pid {old.pid}) and restarted (pid {new.pid})")
        wait_for("5 updates of the new autoscaler", lambda: len(autoscaler_updates(new.pid)) >= 5)
        answered_before = len(load.answers)
        wait_for("more answers", lambda: len(load.answers) >= answered_before + 8)
        assert cluster.log_lines("setup.log") == setups, "setup re-ran on a live worker"
        assert cluster.log_lines("ray_start.log") == starts, "ray start re-ran on a live worker"
        assert sorted(cluster.worker_pods()) == sorted([first, second])
        assert {a["pid"] for a in load.answers[-8:]} == replica_pids, "a replica restarted"
        assert load.errors == []
        t.mark("after 5 updates of the new autoscaler: no setup re-run, same pods and replicas")
    finally:
        load.stop()
    t.mark(f"load stopped after {len(load.answers)} answers")

    # 4. No load: Serve scales to zero, the idle pods are terminated through the API.
    wait_for("both GPU pods terminated", lambda: cluster.worker_pods() == [])
    assert fake.calls.count("podTerminate") == 2
    assert pod_processes(first) == [] and pod_processes(second) == []
    t.mark("both GPU pods terminated through podTerminate; their processes are gone")
    assert pods


def test_quantization_job_with_gpus_1_brings_a_gpu_pod_and_publishes(
    cluster: Cluster, tiny_llama_dir: Path
) -> None:
    from quantization.recipes import CalibrationSpec, EvaluationSpec, GateSpec, QuantRecipe
    from quantization.registry import Registry

    t = cluster.timeline
    wait_for("no GPU pod left", lambda: cluster.worker_pods() == [])
    recipe = QuantRecipe(
        name="tiny",
        q_group_size=64,
        calibration=CalibrationSpec(n_samples=8, seq_len=64),
        evaluation=EvaluationSpec(n_blocks=4, block_len=64),
        # A random model's perplexity is about its vocabulary size: only top-1 means anything.
        gate=GateSpec(max_ppl_increase_pct=1000.0, max_increase_vs_rtn=100.0, min_top1_agreement=0),
    )
    recipe_file = cluster.tmp / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump()))
    registry = cluster.tmp / "registry"
    env = {**os.environ, "RAY_ADDRESS": cluster.gcs_address, "RAY_AUTH_MODE": "disabled",
           "PYTHONPATH": str(REPO)}  # fmt: skip
    command = [
        sys.executable, "-m", "awq_serve_cli", "--registry", str(registry), "quantize",
        str(tiny_llama_dir), "--gpus", "1", "--recipe", str(recipe_file), "--name", "tiny",
    ]  # fmt: skip
    log = cluster.tmp / "quantize.log"
    with log.open("wb") as out:
        job = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    cluster.extra_processes.append(job)
    t.mark("quantize --gpus 1 submitted (no GPU pod up)")
    [pod] = wait_for("a GPU pod for the job", cluster.worker_pods)
    t.mark(f"pod {pod} created for the job")

    def awq_on_pod() -> bool:
        names = []
        for proc in pod_processes(pod):
            with contextlib.suppress(psutil.Error):
                names.append(" ".join(proc.cmdline()))
        return any("_awq" in n or "_evaluate" in n for n in names)

    # Ray names a task's worker process after the task (`ray::_awq`): seen among the pod's.
    wait_for("the AWQ task running on the pod", lambda: awq_on_pod() or job.poll() is not None)
    ran_on_pod = awq_on_pod()
    t.mark(f"AWQ/evaluate task running in pod {pod}: {ran_on_pod}")
    rc = job.wait(timeout=600)
    output = log.read_text()
    assert rc == 0, output[-3000:]
    t.mark(f"job finished: {output.strip().splitlines()[-1]}")
    [version] = Registry(registry).versions("tiny")
    assert (registry / "tiny" / version / "REPORT.md").exists()
    assert ran_on_pod, "no AWQ/evaluate task seen on the GPU pod"
