"""RunPodNodeProvider against a local fake of RunPod's GraphQL API (tests/fakes/runpod_api.py)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import runpod
import yaml
from ray.autoscaler._private.providers import _get_node_provider_cls
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    NODE_KIND_WORKER,
    TAG_RAY_CLUSTER_NAME,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_RUNTIME_CONFIG,
    TAG_RAY_USER_NODE_TYPE,
)
from runpod.error import AuthenticationError

import cluster.runpod as provider_module
from cluster.runpod import (
    TAG_GLOBAL_NETWORKING,
    RunPodAPIError,
    RunPodNodeProvider,
    backoff_delays,
    decode_tags,
    encode_tags,
    pod_mutation,
)
from tests.fakes.runpod_api import NO_CAPACITY, FakeRunPodAPI

CLUSTER = "awq-serve"
CLUSTER_YAML = Path(__file__).resolve().parents[2] / "configs" / "cluster" / "runpod.yaml"
IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
RTX4090 = {
    "gpu_type_id": "NVIDIA GeForce RTX 4090",
    "gpu_count": 1,
    "cloud_type": "SECURE",
    "global_networking": True,
    "data_center_id": "US-KS-2",
    "image_name": IMAGE,
    "container_disk_in_gb": 40,
    "volume_in_gb": 50,
    "volume_mount_path": "/workspace",
    "ports": "22/tcp,8000/http",
    "env": {"HF_HOME": "/workspace/hf"},
}
A6000 = {**RTX4090, "gpu_type_id": "NVIDIA RTX A6000", "volume_in_gb": 80}
CPU_POD = {"instance_id": "cpu3g-4-16", "image_name": IMAGE, "ports": "22/tcp"}
FAST_RETRIES = {"max_retries": 3, "backoff_base_s": 0.001, "backoff_cap_s": 0.004}


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeRunPodAPI]:
    server = FakeRunPodAPI().start()
    yield server
    server.stop()


@pytest.fixture
def fake(
    fake_server: FakeRunPodAPI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> FakeRunPodAPI:
    """The fake, emptied, with the SDK's API URL and key pointing at it."""
    fake_server.reset()
    # Tag state files go to this test's folder, never to the developer's ~/.ray.
    monkeypatch.setattr(provider_module, "default_state_path", lambda name: tmp_path / name)
    monkeypatch.setenv("RUNPOD_API_BASE_URL", fake_server.url)
    monkeypatch.setenv("RUNPOD_API_KEY", fake_server.api_key)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a developer's HTTP(S)_PROXY must not see it
    # <pod id>.runpod.internal only resolves inside RunPod; answer it as RunPod's DNS would.
    monkeypatch.setattr(
        provider_module, "resolve_ipv4", lambda host: fake_server.internal_dns().get(host)
    )
    return fake_server


def make_provider(**settings: Any) -> RunPodNodeProvider:
    config = {"type": "external", "module": "cluster.runpod.RunPodNodeProvider"}
    return RunPodNodeProvider({**config, **FAST_RETRIES, **settings}, CLUSTER)


@pytest.fixture
def provider(fake: FakeRunPodAPI) -> RunPodNodeProvider:
    return make_provider()


def launch(
    provider: RunPodNodeProvider,
    node_type: str = "rtx4090",
    count: int = 1,
    node_config: dict[str, Any] | None = None,
    kind: str = NODE_KIND_WORKER,
) -> list[str]:
    tags = {TAG_RAY_NODE_KIND: kind, TAG_RAY_USER_NODE_TYPE: node_type}
    created = provider.create_node(node_config or RTX4090, tags, count)
    return list(created)


# --- pure helpers ----------------------------------------------------------------------------


def test_tags_round_trip_through_a_pod_env_entry() -> None:
    tags = {"ray-node-name": 'odd "name" \\ with\nnewline', "ray-user-node-type": "a6000"}
    env = ["HF_HOME=/workspace/hf", f"RAY_NODE_TAGS={encode_tags(tags)}"]
    assert decode_tags(env) == tags


def test_pods_without_valid_tags_decode_to_none() -> None:
    assert decode_tags(["HF_HOME=/workspace/hf"]) is None
    assert decode_tags(["RAY_NODE_TAGS=not json"]) is None
    assert decode_tags(["RAY_NODE_TAGS=[1, 2]"]) is None
    assert decode_tags(None) is None


def test_backoff_delays_double_until_the_cap() -> None:
    assert backoff_delays(5, base_s=0.5, cap_s=4.0) == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert backoff_delays(0, base_s=0.5, cap_s=4.0) == []


# --- create and list -------------------------------------------------------------------------


def test_create_node_deploys_a_pod_from_node_config_with_tags_on_the_pod(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [node_id] = launch(provider)

    pod = fake.pods[node_id]
    assert fake.calls == ["podFindAndDeployOnDemand"]
    assert pod.name.startswith(f"{CLUSTER}-rtx4090-")
    assert {key: pod.spec[key] for key in ("gpuTypeId", "gpuCount", "cloudType", "imageName")} == {
        "gpuTypeId": "NVIDIA GeForce RTX 4090",
        "gpuCount": 1,
        "cloudType": "SECURE",
        "imageName": IMAGE,
    }
    assert pod.spec["ports"] == "22/tcp,8000/http"
    assert (pod.spec["volumeInGb"], pod.spec["volumeMountPath"]) == (50, "/workspace")
    assert pod.spec["containerDiskInGb"] == 40
    assert pod.spec["globalNetwork"] is True
    assert pod.env["HF_HOME"] == "/workspace/hf"
    assert pod.spec["dataCenterId"] == "US-KS-2"
    assert json.loads(pod.env["RAY_NODE_TAGS"]) == {
        TAG_RAY_CLUSTER_NAME: CLUSTER,
        TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
        TAG_RAY_USER_NODE_TYPE: "rtx4090",
        TAG_GLOBAL_NETWORKING: "true",
    }


def test_node_config_without_gpu_deploys_a_cpu_pod(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [node_id] = launch(provider, "head", node_config=CPU_POD, kind=NODE_KIND_HEAD)

    assert fake.calls == ["deployCpuPod"]
    assert fake.pods[node_id].spec["instanceId"] == "cpu3g-4-16"
    assert provider.node_tags(node_id)[TAG_RAY_NODE_KIND] == NODE_KIND_HEAD


def test_env_values_with_quotes_and_newlines_reach_the_pod_unchanged(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    note = 'say "hi"\nthen \\ leave'
    [node_id] = launch(provider, node_config={**RTX4090, "env": {"NOTE": note}})

    assert fake.pods[node_id].env["NOTE"] == note


def test_create_node_returns_one_pod_per_requested_node(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    node_ids = launch(provider, count=3)

    assert sorted(node_ids) == sorted(fake.pods)
    assert len({pod.name for pod in fake.live_pods()}) == 3


def test_non_terminated_nodes_filters_by_tags(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [head] = launch(provider, "head", node_config=CPU_POD, kind=NODE_KIND_HEAD)
    gpu_4090 = launch(provider, "rtx4090", count=2)
    [gpu_a6000] = launch(provider, "a6000", node_config=A6000)

    assert sorted(provider.non_terminated_nodes({})) == sorted([head, *gpu_4090, gpu_a6000])
    assert provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD}) == [head]
    workers = provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_WORKER})
    assert sorted(workers) == sorted([*gpu_4090, gpu_a6000])
    assert provider.non_terminated_nodes({TAG_RAY_USER_NODE_TYPE: "a6000"}) == [gpu_a6000]
    assert provider.non_terminated_nodes({TAG_RAY_USER_NODE_TYPE: "h100"}) == []


def test_pods_of_other_clusters_and_untagged_pods_are_not_listed(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    fake.seed_pod("my-notebook", env={"JUPYTER_PASSWORD": "x"})
    other_tags = {TAG_RAY_CLUSTER_NAME: "other", TAG_RAY_NODE_KIND: NODE_KIND_WORKER}
    fake.seed_pod("other-worker", env={"RAY_NODE_TAGS": encode_tags(other_tags)})
    [mine] = launch(provider)

    assert provider.non_terminated_nodes({}) == [mine]
    assert provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_WORKER}) == [mine]


def test_a_fresh_provider_finds_existing_pods_and_their_tags(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [node_id] = launch(provider)

    restarted = make_provider()
    assert restarted.non_terminated_nodes({TAG_RAY_USER_NODE_TYPE: "rtx4090"}) == [node_id]
    assert restarted.node_tags(node_id)[TAG_RAY_CLUSTER_NAME] == CLUSTER


def test_runpod_sdk_lists_the_pods_the_provider_created(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [node_id] = launch(provider)

    pods = runpod.get_pods(api_key=fake.api_key)
    assert [(pod["id"], pod["desiredStatus"]) for pod in pods] == [(node_id, "RUNNING")]


# --- tags, state and addresses ---------------------------------------------------------------


def test_set_node_tags_merges_into_node_tags_and_tag_filters(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [updated, untouched] = launch(provider, count=2)

    provider.set_node_tags(updated, {TAG_RAY_NODE_STATUS: "up-to-date"})

    assert provider.node_tags(updated) == {
        TAG_RAY_CLUSTER_NAME: CLUSTER,
        TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
        TAG_RAY_USER_NODE_TYPE: "rtx4090",
        TAG_GLOBAL_NETWORKING: "true",
        TAG_RAY_NODE_STATUS: "up-to-date",
    }
    assert TAG_RAY_NODE_STATUS not in provider.node_tags(untouched)
    assert provider.non_terminated_nodes({TAG_RAY_NODE_STATUS: "up-to-date"}) == [updated]


def test_tags_set_after_launch_survive_a_restart_of_the_provider(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [node_id] = launch(provider)
    provider.set_node_tags(node_id, {TAG_RAY_NODE_STATUS: "up-to-date"})
    provider.set_node_tags(node_id, {TAG_RAY_RUNTIME_CONFIG: "abc123"})

    restarted = make_provider()  # a new autoscaler process on the same head

    assert restarted.node_tags(node_id)[TAG_RAY_NODE_STATUS] == "up-to-date"
    assert restarted.node_tags(node_id)[TAG_RAY_RUNTIME_CONFIG] == "abc123"
    assert restarted.non_terminated_nodes({TAG_RAY_NODE_STATUS: "up-to-date"}) == [node_id]


def test_tag_state_file_is_replaced_whole_and_forgets_terminated_pods(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [kept, doomed] = launch(provider, count=2)
    provider.set_node_tags(kept, {TAG_RAY_NODE_STATUS: "up-to-date"})
    provider.set_node_tags(doomed, {TAG_RAY_NODE_STATUS: "up-to-date"})
    state_file = provider._tags.path
    inode = state_file.stat().st_ino

    provider.terminate_node(doomed)

    assert json.loads(state_file.read_text()) == {kept: {TAG_RAY_NODE_STATUS: "up-to-date"}}
    assert state_file.stat().st_ino != inode  # a rename over the old file, not a rewrite
    assert [p.name for p in state_file.parent.iterdir() if p.name.startswith(".")] == []


def test_is_running_only_once_the_pod_container_is_up(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    fake.auto_start = False
    [node_id] = launch(provider)
    provider.non_terminated_nodes({})

    assert not provider.is_running(node_id)
    assert not provider.is_terminated(node_id)
    assert provider.external_ip(node_id) is None

    fake.start_pod(node_id)
    provider.non_terminated_nodes({})

    assert provider.is_running(node_id)
    assert provider.external_ip(node_id) == fake.pods[node_id].public_ip


def test_internal_ip_is_the_global_networking_address(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [node_id] = launch(provider)

    assert provider.internal_ip(node_id) == fake.pods[node_id].global_ip
    assert provider.internal_ip(node_id).startswith("10.")


def test_internal_ip_falls_back_to_the_private_runtime_address_without_global_networking(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [node_id] = launch(provider, node_config={**RTX4090, "global_networking": False})

    assert fake.pods[node_id].global_ip is None
    assert provider.internal_ip(node_id) == fake.pods[node_id].host_ip


AUTH = {"ssh_user": "root", "ssh_private_key": "~/.ssh/id_ed25519"}


def launch_with_ssh_entry(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> tuple[str, dict[str, Any]]:
    """A launched pod and its runtime.ports entry for port 22."""
    [node_id] = launch(provider)
    [ssh] = [port for port in fake.pods[node_id].runtime_ports() if port["privatePort"] == 22]
    return node_id, ssh


def test_ssh_over_the_public_ip_uses_the_port_runpod_maps_to_22(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    node_id, ssh = launch_with_ssh_entry(provider, fake)

    public = provider.get_command_runner("", node_id, AUTH, CLUSTER, subprocess, False)
    public._set_ssh_ip_if_required()
    private = provider.get_command_runner("", node_id, AUTH, CLUSTER, subprocess, True)
    private._set_ssh_ip_if_required()

    assert public.ssh_ip == provider.external_ip(node_id) == ssh["ip"]
    assert f"Port={ssh['publicPort']}" in public.ssh_options.to_ssh_options_list()
    assert private.ssh_ip == fake.pods[node_id].global_ip
    assert not any(o.startswith("Port=") for o in private.ssh_options.to_ssh_options_list())


class RecordingProcessRunner:
    """Stands in for the `subprocess` module Ray hands its command runners: records commands."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def check_output(self, cmd: list[str], **kwargs: Any) -> bytes:
        self.commands.append(cmd)
        return b""


def test_initialization_commands_ssh_to_the_mapped_port_too(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    node_id, ssh = launch_with_ssh_entry(provider, fake)
    recorder = RecordingProcessRunner()
    runner = provider.get_command_runner("", node_id, AUTH, CLUSTER, recorder, False)

    # Ray's updater runs initialization_commands with fresh SSH options built from this key.
    runner.run("echo init", with_output=True, ssh_options_override_ssh_key="~/.ssh/other")
    runner.run("echo setup", with_output=True)

    for command in recorder.commands:
        assert f"Port={ssh['publicPort']}" in command
        assert f"root@{ssh['ip']}" in command
    assert "~/.ssh/other" in recorder.commands[0]
    assert "~/.ssh/id_ed25519" in recorder.commands[1]
    assert f"ssh -p {ssh['publicPort']} " in runner.remote_shell_command_str()


def test_global_networking_pod_has_no_internal_ip_until_its_dns_name_resolves(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    [node_id] = launch(provider)
    answers = fake.internal_dns()
    monkeypatch.setattr(provider_module, "resolve_ipv4", lambda host: None)

    # Not the host address: other pods could not reach it, and Ray keeps the first IP it gets.
    assert provider.internal_ip(node_id) is None

    monkeypatch.setattr(provider_module, "resolve_ipv4", answers.get)
    assert provider.internal_ip(node_id) == fake.pods[node_id].global_ip


def test_dns_that_never_resolves_is_reported_after_the_deadline(
    fake: FakeRunPodAPI, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    provider = make_provider(dns_timeout_s=0.05)
    [node_id] = launch(provider)
    monkeypatch.setattr(provider_module, "resolve_ipv4", lambda host: None)

    assert provider.internal_ip(node_id) is None
    assert "did not" not in caplog.text and "without" not in caplog.text
    time.sleep(0.1)
    assert provider.internal_ip(node_id) is None
    assert f"{node_id}.runpod.internal resolving" in caplog.text


# --- terminate -------------------------------------------------------------------------------


def test_terminate_node_removes_the_pod(provider: RunPodNodeProvider, fake: FakeRunPodAPI) -> None:
    [doomed, kept] = launch(provider, count=2)

    provider.terminate_node(doomed)

    assert list(fake.pods) == [kept]
    assert provider.non_terminated_nodes({}) == [kept]
    assert provider.is_terminated(doomed)
    assert provider.node_tags(doomed) == {}


def test_terminating_a_gone_pod_is_not_an_error(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [node_id] = launch(provider)

    provider.terminate_nodes([node_id])
    provider.terminate_nodes([node_id, "neverexisted01"])

    assert fake.pods == {}
    assert fake.calls.count("podTerminate") == 3


def test_terminate_of_a_live_pod_that_keeps_failing_raises(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [node_id] = launch(provider)
    fake.fail_next(10, status=500, operation="podTerminate")

    with pytest.raises(RunPodAPIError, match=node_id):
        provider.terminate_nodes([node_id])
    assert list(fake.pods) == [node_id]


# --- retries ---------------------------------------------------------------------------------


def test_calls_are_retried_after_http_429(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [node_id] = launch(provider)
    fake.calls.clear()
    fake.fail_next(2, status=429)

    assert provider.non_terminated_nodes({}) == [node_id]
    assert fake.calls == ["myself"] * 3


def test_create_is_retried_after_http_5xx_without_duplicating_the_pod(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    fake.fail_next(1, status=500, operation="podFindAndDeployOnDemand")
    fake.fail_next(1, status=503, operation="podFindAndDeployOnDemand")

    [node_id] = launch(provider)

    assert list(fake.pods) == [node_id]
    assert fake.calls.count("podFindAndDeployOnDemand") == 3


def test_calls_are_retried_after_dropped_connections(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    fake.drop_next(2)

    [node_id] = launch(provider)

    assert list(fake.pods) == [node_id]


def test_a_lost_create_response_adopts_the_pod_instead_of_creating_another(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    fake.lose_next_response(1, operation="podFindAndDeployOnDemand")

    [node_id] = launch(provider)

    assert list(fake.pods) == [node_id]
    assert fake.calls == ["podFindAndDeployOnDemand", "myself"]


def test_retry_waits_back_off_exponentially_and_honour_retry_after(
    fake: FakeRunPodAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []
    provider = make_provider(max_retries=4, backoff_base_s=0.5, backoff_cap_s=3.0)
    # On this provider only: patching time.sleep itself turns every other thread's sleep loop
    # into a busy loop appending to `waits` (the process then ran out of memory).
    monkeypatch.setattr(provider, "sleep", waits.append)
    fake.fail_next(1, status=429, retry_after=2)
    fake.fail_next(3, status=502)

    provider.non_terminated_nodes({})

    assert waits == [2.0, 1.0, 2.0, 3.0]


def test_gives_up_after_the_retry_bound_with_a_clear_error(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    fake.fail_next(10, status=503)

    with pytest.raises(RunPodAPIError, match=r"myPods failed 4 times, last with HTTP 503"):
        provider.non_terminated_nodes({})
    assert fake.calls == ["myself"] * 4


def test_authentication_errors_are_not_retried(
    fake: FakeRunPodAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", "wrong-key")

    with pytest.raises(AuthenticationError, match="HTTP 401"):
        make_provider().non_terminated_nodes({})
    assert fake.calls == ["myself"]


# --- failed launches -------------------------------------------------------------------------


def test_failed_launch_terminates_created_pods(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    fake.fail_create(3)

    with pytest.raises(NodeLaunchException) as raised:
        launch(provider, count=4)

    assert fake.pods == {}
    assert fake.calls.count("podTerminate") == 2
    assert NO_CAPACITY in raised.value.description
    assert "terminated the 2 pod(s)" in raised.value.description


def test_launch_that_exhausts_retries_fails_and_leaves_other_pods_alone(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    [kept] = launch(provider)
    fake.fail_next(4, status=500, operation="podFindAndDeployOnDemand")

    with pytest.raises(NodeLaunchException) as raised:
        launch(provider, count=2)

    assert "podFindAndDeployOnDemand failed 4 times, last with HTTP 500" in str(raised.value)
    assert list(fake.pods) == [kept]


def test_failed_launch_names_the_pods_it_could_not_terminate(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    fake.fail_create(2)
    fake.fail_next(10, status=500, operation="podTerminate")

    with pytest.raises(NodeLaunchException) as raised:
        launch(provider, count=2)

    [leaked] = fake.pods
    assert f"could NOT terminate pods ['{leaked}']" in raised.value.description


# --- configuration ---------------------------------------------------------------------------


def test_a_missing_api_key_is_reported_when_the_provider_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)

    with pytest.raises(ValueError, match="RUNPOD_API_KEY"):
        make_provider()


def test_api_key_in_provider_config_wins_over_the_environment(
    fake: FakeRunPodAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", "pod-scoped-key")

    assert make_provider(api_key=fake.api_key).non_terminated_nodes({}) == []


def test_head_node_config_carries_the_launching_api_key(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    config = {"cluster_name": CLUSTER, "provider": {"type": "external"}}

    head_config = provider.prepare_for_head_node(config)

    assert head_config["provider"]["api_key"] == fake.api_key
    assert "api_key" not in config["provider"]


def test_head_gets_the_restricted_head_key_when_one_is_set(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNPOD_HEAD_API_KEY", "restricted-key")
    config = {"cluster_name": CLUSTER, "provider": {"type": "external"}}

    assert provider.prepare_for_head_node(config)["provider"]["api_key"] == "restricted-key"


def test_bad_node_config_is_rejected_before_any_pod_is_created(
    provider: RunPodNodeProvider, fake: FakeRunPodAPI
) -> None:
    with pytest.raises(ValueError, match="gpu_type"):
        launch(provider, node_config={**RTX4090, "gpu_type": "RTX 4090"})
    with pytest.raises(ValueError, match="GPU pods only"):
        launch(provider, node_config={**CPU_POD, "global_networking": True})
    with pytest.raises(ValueError, match="cloud_type"):
        launch(provider, node_config={**RTX4090, "cloud_type": "secure"})
    with pytest.raises(ValueError, match="must be SECURE"):
        launch(provider, node_config={**RTX4090, "cloud_type": "COMMUNITY"})

    assert fake.calls == []


def filled_cluster_yaml() -> dict[str, Any]:
    """configs/cluster/runpod.yaml with a user's values in place of its CHANGE_ME fields (YAML
    anchors make the head's values the workers' too)."""
    text = CLUSTER_YAML.read_text()
    for anchor, value in (("data_center", "EU-RO-1"), ("image", "ghcr.io/me/awq-serve:0.1.0"),
                          ("volume", "vol123abc")):  # fmt: skip
        text = text.replace(f"&{anchor} CHANGE_ME", f"&{anchor} {value}")
    return yaml.safe_load(text)


def test_cluster_yaml_as_shipped_names_the_first_value_to_set() -> None:
    config = prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))

    with pytest.raises(ValueError, match=r"available_node_types\.head\.node_config\.\w+: still "):
        RunPodNodeProvider.bootstrap_config(config)


def test_cluster_yaml_is_a_valid_ray_config_for_this_provider(fake: FakeRunPodAPI) -> None:
    config = prepare_config(filled_cluster_yaml())
    validate_config(config)
    assert RunPodNodeProvider.bootstrap_config(config) is config

    assert config["cluster_name"] == CLUSTER
    assert _get_node_provider_cls(config["provider"]) is RunPodNodeProvider
    node_types = config["available_node_types"]
    assert node_types["rtx4090"]["node_config"]["gpu_type_id"] == "NVIDIA GeForce RTX 4090"
    assert node_types["a6000"]["node_config"]["gpu_type_id"] == "NVIDIA RTX A6000"
    for name in ("rtx4090", "a6000"):
        assert node_types[name]["resources"]["GPU"] == 1
        assert 0 <= node_types[name]["min_workers"] <= node_types[name]["max_workers"]
    for node_type in node_types.values():
        pod_mutation(node_type["node_config"], "probe", {})  # raises on a key RunPod lacks
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    # No clone, no install on the pods: the image has the stack, file_mounts ships the code.
    assert config["file_mounts"]["~/awq-serve"] == "."
    assert not any("git clone" in c or "make setup" in c for c in config["setup_commands"])
    # The dashboard stays on the head's loopback; nothing publishes 8265.
    [head_start] = [c for c in config["head_start_ray_commands"] if "--head" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    assert all("8265" not in t["node_config"]["ports"] for t in node_types.values())
    # A plain GPU demand scores the cheaper 4090 higher: the a6000 carries an extra resource.
    assert node_types["a6000"]["resources"]["GPU_48GB"] == 1
    assert "GPU_48GB" not in node_types["rtx4090"]["resources"]


def test_ray_prefers_the_rtx4090_for_a_plain_gpu_demand(fake: FakeRunPodAPI) -> None:
    from functools import partial

    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilitySummary,
    )
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_nodes_for,
    )

    node_types = prepare_config(filled_cluster_yaml())["available_node_types"]
    # Named to win a tie (Ray breaks equal scores by the larger type name): the extra resource
    # alone must make the 4090 the choice.
    workers = {"rtx4090": node_types["rtx4090"], "zz_a6000": node_types["a6000"]}
    # The scorer Ray's autoscaler uses, with no launch failures on record.
    scorer = partial(
        _default_utilization_scorer,
        node_availability_summary=NodeAvailabilitySummary(node_availabilities={}),
    )

    plain, _ = get_nodes_for(workers, {}, "head", 6, [{"GPU": 1, "CPU": 4}], scorer)
    big, _ = get_nodes_for(workers, {}, "head", 6, [{"GPU": 1, "GPU_48GB": 1}], scorer)

    assert dict(plain) == {"rtx4090": 1}
    assert dict(big) == {"zz_a6000": 1}


# --- config checks when the config loads ----------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"cloud_type": "ALL"}, r"rtx4090\.node_config\.cloud_type: must be SECURE"),
        ({"cloud_type": "COMMUNITY"}, r"rtx4090\.node_config\.cloud_type: must be SECURE"),
        ({"data_center_id": None}, r"rtx4090\.node_config\.data_center_id: required with"),
        ({"data_center_id": "Kansas"}, r"rtx4090\.node_config\.data_center_id: 'Kansas' is not"),
        ({"ports": "22/tcp,8265/http"}, r"rtx4090\.node_config\.ports: '8265/http' would publ"),
        ({"image_name": "CHANGE_ME"}, r"rtx4090\.node_config\.image_name: still CHANGE_ME"),
        ({"gpu_type": "x"}, r"rtx4090\.node_config: unknown RunPod keys \['gpu_type'\]"),
    ],
)
def test_bad_node_types_fail_when_the_config_loads_naming_the_field(
    change: dict[str, Any], error: str
) -> None:
    config = filled_cluster_yaml()
    node_config = config["available_node_types"]["rtx4090"]["node_config"]
    config["available_node_types"]["rtx4090"]["node_config"] = {
        k: v for k, v in {**node_config, **change}.items() if v is not None
    }

    with pytest.raises(ValueError, match=error):
        RunPodNodeProvider.bootstrap_config(prepare_config(config))


def test_network_volume_needs_a_data_centre_and_global_networking_one_data_centre() -> None:
    config = filled_cluster_yaml()
    types = config["available_node_types"]
    types["a6000"]["node_config"] = {**types["a6000"]["node_config"], "data_center_id": "US-KS-2"}
    with pytest.raises(ValueError, match=r"global-networking node types are in different data"):
        RunPodNodeProvider.bootstrap_config(prepare_config(config))

    volume_only = {"image_name": IMAGE, "network_volume_id": "vol1"}
    with pytest.raises(ValueError, match=r"node_config\.data_center_id: required with network_vo"):
        pod_mutation(volume_only, "probe", {})
