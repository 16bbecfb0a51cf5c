"""Fake RunPod pods that are real Ray nodes on this machine, for end-to-end autoscaler tests.

What a pod is here: a loopback address of its own (127.0.0.N, from the fake API's private DNS),
an environment (RUNPOD_POD_ID and the pod's env, as RunPod sets them) and the processes started
in it. Ray drives a pod the way it drives a real one, through a command runner: the autoscaler's
updater runs the cluster config's setup and `ray start` commands, which here run as local shell
commands in the pod's environment instead of over SSH (as Ray's fake multi-node provider starts
real raylets with fake resources; the GPU is Ray's `GPU` resource, from the node type's
`resources` that the updater exports as RAY_OVERRIDE_RESOURCES).

Everything else is the production provider, `cluster.runpod.RunPodNodeProvider`, talking
GraphQL to the fake RunPod API. A terminated pod's processes are killed, as the pod's container
would be; they are found by the FAKE_RUNPOD_POD env var every process of the pod inherits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import requests
from ray.autoscaler._private.command_runner import _with_environment_variables
from ray.autoscaler.command_runner import CommandRunnerInterface

from cluster.runpod import API_BASE_URL_ENV_VAR, RunPodNodeProvider

POD_MARKER = "FAKE_RUNPOD_POD"  # env var naming the pod a process belongs to
SESSION_MARKER = "FAKE_RUNPOD_SESSION"  # env var naming the test run, inherited by every pod

# Run by `start_reaper`: when the test process is gone, however it ended (a Ray driver can end
# its process from a background thread), kill every process of the session's pods.
_REAPER = """
import os, sys, time, psutil
parent, token = int(sys.argv[1]), sys.argv[2]
while psutil.pid_exists(parent):
    time.sleep(1)
for proc in psutil.process_iter():
    try:
        if proc.environ().get("FAKE_RUNPOD_SESSION") == token:
            proc.kill()
    except psutil.Error:
        pass
"""


def start_reaper(token: str) -> subprocess.Popen[bytes]:
    """A watchdog that cleans up after this process; end it with `.kill()` after cleaning up."""
    return subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpid()), token], start_new_session=True
    )


def kill_session(token: str) -> None:
    """SIGKILL every process started in any pod of the session."""
    procs = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(SESSION_MARKER) == token:
                procs.append(proc)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


def pod_processes(pod_id: str) -> list[psutil.Process]:
    """Every process on this machine started in the pod (carrying its marker)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(POD_MARKER) == pod_id:
                found.append(proc)
    return found


def kill_pod(pod_id: str) -> None:
    """SIGKILL the pod's processes at once, as RunPod stopping its container does."""
    procs = pod_processes(pod_id)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


class LocalPodCommandRunner(CommandRunnerInterface):
    """Runs Ray's commands for a pod as local shell commands in the pod's environment."""

    def __init__(self, provider: LocalPodNodeProvider, node_id: str, log_prefix: str) -> None:
        self.provider = provider
        self.node_id = node_id
        self.log_prefix = log_prefix

    def _pod_env(self) -> dict[str, str]:
        pod = self.provider._pod(self.node_id) or {}
        env = dict(os.environ)
        for entry in pod.get("env") or []:
            key, _, value = entry.partition("=")
            env[key] = value
        ip = self.provider.internal_ip(self.node_id)
        env.update(RUNPOD_POD_ID=self.node_id, FAKE_POD_IP=ip or "", **{POD_MARKER: self.node_id})
        return env

    def home(self) -> Path:
        """The pod's ~ for rsync targets (its disk)."""
        home = Path(self.provider.provider_config["pods_dir"]) / self.node_id
        home.mkdir(parents=True, exist_ok=True)
        return home

    def run(
        self,
        cmd: str | None = None,
        timeout: int = 120,
        exit_on_fail: bool = False,
        port_forward: Any = None,
        with_output: bool = False,
        environment_variables: dict[str, object] | None = None,
        run_env: str = "auto",
        ssh_options_override_ssh_key: str = "",
        shutdown_after_run: bool = False,
        silent: bool = False,
    ) -> str:
        if not cmd:
            return ""
        if environment_variables:
            cmd = _with_environment_variables(cmd, environment_variables)
        # Output goes to files, not pipes: Ray's daemons outlive `ray start` and would hold a
        # pipe open, so waiting for its end would wait for the node to stop.
        pods_dir = Path(self.provider.provider_config["pods_dir"])
        output = pods_dir / f"{self.node_id}.last-output"
        with output.open("wb") as out:
            rc = subprocess.run(
                ["bash", "-c", cmd],
                env=self._pod_env(),
                cwd=self.home(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=max(timeout, 300),
                start_new_session=True,
            ).returncode
        text = output.read_text(errors="replace")
        with (pods_dir / f"{self.node_id}.log").open("a") as log:
            log.write(f"$ {cmd}\n{text}[exit {rc}]\n")
        if rc != 0:
            raise subprocess.CalledProcessError(rc, cmd, text)
        return text if with_output else ""

    def run_rsync_up(self, source: str, target: str, options: Any = None) -> None:
        self._copy(Path(source), self._on_pod(target))

    def run_rsync_down(self, source: str, target: str, options: Any = None) -> None:
        self._copy(self._on_pod(source), Path(target))

    def remote_shell_command_str(self) -> str:
        return f"cd {self.home()}\n"

    def _on_pod(self, path: str) -> Path:
        return self.home() / path.removeprefix("~/").lstrip("/")

    @staticmethod
    def _copy(source: Path, target: Path) -> None:
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


class LocalPodNodeProvider(RunPodNodeProvider):
    """The production provider, with RunPod's private DNS answered by the fake API and commands
    run on the local fake pods instead of over SSH. Nothing else is overridden."""

    def _resolve(self, host: str) -> str | None:
        base_url = os.environ[API_BASE_URL_ENV_VAR].rstrip("/")
        answer = requests.get(f"{base_url}/internal-dns/{host}", timeout=10)
        return answer.json()["ip"] if answer.status_code == 200 else None

    def get_command_runner(  # type: ignore[override]
        self, log_prefix: str, node_id: str, *args: Any, **kwargs: Any
    ) -> CommandRunnerInterface:
        """Whatever the auth and addressing: a pod here is reached without SSH."""
        return LocalPodCommandRunner(self, node_id, log_prefix)
