"""Ray autoscaler node provider that runs cluster nodes as RunPod pods.

Use it from a cluster YAML as
``provider: {type: external, module: cluster.runpod.RunPodNodeProvider}``. Pods are created,
listed and terminated through RunPod's GraphQL API with the query documents of the official
``runpod`` SDK, at the URL the SDK uses (``RUNPOD_API_BASE_URL``, default
``https://api.runpod.io``). The tags a pod is launched with live on the pod as JSON in its
``RAY_NODE_TAGS`` env var (they identify the cluster's pods from anywhere); tags Ray sets later
(node status, config hashes) go to a state file where the provider runs (`cluster.tag_store`).

Addresses:
- ``internal_ip``: the pod's RunPod global-networking address, found by resolving
  ``<pod id>.runpod.internal`` (RunPod's private DNS; GPU pods created with
  ``global_networking: true``). Where that name does not resolve, the fallback is the ``ip`` of a
  ``runtime.ports`` entry with ``isIpPublic: false``, which only the pod's own host can reach.
- ``external_ip``: the ``ip`` of the public ``runtime.ports`` entry for port 22 (any public entry
  if 22 is not exposed); SSH goes to the public port RunPod maps to 22, on every path Ray takes
  (commands, ``initialization_commands`` with their own SSH options, rsync, port forwards).

Node configs are checked when the cluster config loads (``bootstrap_config``, run by ``ray up``)
and again before each launch: a bad field is an error naming it, not a failed launch.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, TypeVar

import requests
from pydantic import BaseModel, ConfigDict, Field
from ray.autoscaler._private.command_runner import SSHCommandRunner, SSHOptions
from ray.autoscaler.command_runner import CommandRunnerInterface
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE
from runpod.api.mutations.pods import (
    generate_pod_deployment_mutation,
    generate_pod_terminate_mutation,
)
from runpod.api.queries.pods import QUERY_POD
from runpod.error import AuthenticationError, QueryError
from runpod.user_agent import USER_AGENT

from cluster.tag_store import TagStore, default_state_path

logger = logging.getLogger(__name__)

T = TypeVar("T")

TAGS_ENV_VAR = "RAY_NODE_TAGS"
API_BASE_URL_ENV_VAR = "RUNPOD_API_BASE_URL"  # the variable runpod.api.graphql reads
DEFAULT_API_BASE_URL = "https://api.runpod.io"
CLOUD_TYPES = ("ALL", "SECURE", "COMMUNITY")
SSH_PORT = 22
DASHBOARD_PORT = 8265
# Where `ray up` runs: a narrower key for the head (see prepare_for_head_node).
HEAD_API_KEY_ENV_VAR = "RUNPOD_HEAD_API_KEY"
# Launch tag: the pod was created with global networking, so only its private DNS name counts.
TAG_GLOBAL_NETWORKING = "runpod-global-networking"
# The value configs/cluster/runpod.yaml ships for what each user must choose (image, data centre,
# network volume): refused by name when the config loads.
PLACEHOLDER = "CHANGE_ME"
# RunPod data-centre ids look like US-KS-2, EU-RO-1, EUR-IS-1.
DATA_CENTER_ID = re.compile(r"^[A-Z]{2,3}-[A-Z]{2,4}-[0-9]+$")

# node_config keys are the SDK's pod-creation parameters (minus the name, which the provider
# chooses) plus `global_networking`, which the SDK's mutation builder does not offer.
POD_PARAMETERS = frozenset(inspect.signature(generate_pod_deployment_mutation).parameters) - {
    "name"
}
NODE_CONFIG_KEYS = POD_PARAMETERS | {"global_networking"}


class RunPodAPIError(RuntimeError):
    """The RunPod API kept failing (rate limit, server or network errors) past the retry bound."""


class TransientAPIError(Exception):
    """One failed call that is worth retrying: HTTP 429, HTTP 5xx or a network error."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RunPodProviderSettings(BaseModel):
    """The `provider:` section of the cluster YAML, beyond Ray's own `type` and `module`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    api_key: str | None = Field(
        default=None,
        description="RunPod API key; when unset, RUNPOD_API_KEY from the environment.",
    )
    max_retries: int = Field(
        default=5, ge=0, le=12, description="Retries of a call that got HTTP 429/5xx or no answer."
    )
    backoff_base_s: float = Field(
        default=0.5, ge=0, description="Wait before the first retry; doubles on each retry."
    )
    backoff_cap_s: float = Field(
        default=16.0, ge=0, description="Longest wait between retries, Retry-After included."
    )
    request_timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one HTTP call.")
    internal_dns_suffix: str = Field(
        default="runpod.internal",
        description="Private DNS zone of RunPod global networking; '' skips the DNS lookup.",
    )
    dns_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="How long a running pod's private DNS name may take to appear before it is "
        "reported as an error (Ray's own wait for the node's IP then gives up on the pod).",
    )
    state_path: str | None = Field(
        default=None,
        description="State file of tags set after launch (default: "
        "~/.ray/runpod/<cluster>.tags.json).",
    )


def encode_tags(tags: Mapping[str, str]) -> str:
    """Tags as compact, key-sorted JSON, the value of a pod's RAY_NODE_TAGS env var."""
    return json.dumps(dict(sorted(tags.items())), separators=(",", ":"))


def decode_tags(env: Iterable[str] | None) -> dict[str, str] | None:
    """Tags from a pod's env list of "KEY=value" strings; None when it carries no valid tags."""
    for entry in env or ():
        key, sep, value = entry.partition("=")
        if not sep or key != TAGS_ENV_VAR:
            continue
        try:
            tags = json.loads(value)
        except ValueError:
            return None
        return {str(k): str(v) for k, v in tags.items()} if isinstance(tags, dict) else None
    return None


def tags_match(tags: Mapping[str, str], tag_filters: Mapping[str, str]) -> bool:
    """Whether tags hold every key/value pair of tag_filters."""
    return all(tags.get(key) == value for key, value in tag_filters.items())


def backoff_delays(retries: int, base_s: float, cap_s: float) -> list[float]:
    """Seconds to wait before each retry: base, 2·base, 4·base, ... each capped at cap_s."""
    return [min(cap_s, base_s * 2**attempt) for attempt in range(retries)]


def pod_name(cluster_name: str, node_type: str, token: str) -> str:
    """Pod name with the cluster as prefix, readable in the RunPod console and unique per launch."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", f"{cluster_name}-{node_type}-{token}")


def graphql_string(value: str) -> str:
    """Escape a value for a GraphQL string literal (the SDK pastes values into its query text)."""
    return json.dumps(value)[1:-1]


def resolve_ipv4(host: str) -> str | None:
    """IPv4 address of host, or None when it does not resolve (e.g. outside RunPod's network)."""
    try:
        infos = socket.getaddrinfo(host, None, family=socket.AF_INET)
    except OSError:
        return None
    return str(infos[0][4][0]) if infos else None


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    try:
        return float(headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _runtime_ports(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    runtime = pod.get("runtime") or {}
    return [port for port in runtime.get("ports") or [] if port.get("ip")]


def _public_ssh_entry(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    public = [port for port in _runtime_ports(pod) if port.get("isIpPublic")]
    ssh = [port for port in public if port.get("privatePort") == SSH_PORT]
    return (ssh or public or [None])[0]


def check_node_config(node_config: Mapping[str, Any], where: str = "node_config") -> None:
    """Raise ValueError naming the field (`where` is its path) if RunPod would refuse the pod or
    the cluster could not work on it; nothing is sent to RunPod."""
    for key, value in node_config.items():
        if value == PLACEHOLDER:
            raise ValueError(
                f"{where}.{key}: still {PLACEHOLDER}; set it for your account (README: Deploy on "
                "RunPod)"
            )
    unknown = set(node_config) - NODE_CONFIG_KEYS
    if unknown:
        raise ValueError(
            f"{where}: unknown RunPod keys {sorted(unknown)}; allowed keys: "
            f"{sorted(NODE_CONFIG_KEYS)}"
        )
    if not node_config.get("image_name") and not node_config.get("template_id"):
        raise ValueError(f"{where}: needs image_name or template_id")
    cloud_type = node_config.get("cloud_type", "ALL")
    if cloud_type not in CLOUD_TYPES:
        raise ValueError(f"{where}.cloud_type: {cloud_type!r} is not one of {CLOUD_TYPES}")
    data_center = node_config.get("data_center_id")
    if data_center is not None and not DATA_CENTER_ID.match(str(data_center)):
        raise ValueError(
            f"{where}.data_center_id: {data_center!r} is not a RunPod data-centre id "
            "(like US-KS-2 or EU-RO-1)"
        )
    if node_config.get("network_volume_id") and data_center is None:
        raise ValueError(
            f"{where}.data_center_id: required with network_volume_id (a network volume lives in "
            "one data centre, and a pod can only mount it there)"
        )
    if node_config.get("global_networking"):
        if node_config.get("gpu_type_id") is None:
            raise ValueError(
                f"{where}.global_networking: needs gpu_type_id: RunPod offers global networking "
                "on NVIDIA GPU pods only"
            )
        if cloud_type != "SECURE":
            raise ValueError(
                f"{where}.cloud_type: must be SECURE with global_networking (got {cloud_type!r}): "
                "RunPod offers global networking on Secure Cloud pods only"
            )
        if data_center is None:
            raise ValueError(
                f"{where}.data_center_id: required with global_networking: only some data "
                "centres offer it (console → Deploy → Global Networking filter), and every node "
                "of the cluster should be in the same one"
            )
    for port in str(node_config.get("ports") or "").split(","):
        if port.strip().partition("/")[0] == str(DASHBOARD_PORT):
            raise ValueError(
                f"{where}.ports: {port.strip()!r} would publish the Ray dashboard (which can "
                "submit jobs that run as root next to the RunPod API key) on RunPod's public "
                "proxy; reach it with `ray dashboard <cluster.yaml>` (an SSH tunnel) instead"
            )


def check_cluster_config(config: Mapping[str, Any]) -> None:
    """check_node_config on every node type of a cluster config, naming the node type, and the
    data centre shared by all global-networking node types."""
    centres = {}
    for name, node_type in (config.get("available_node_types") or {}).items():
        node_config = node_type.get("node_config") or {}
        check_node_config(node_config, f"available_node_types.{name}.node_config")
        if node_config.get("global_networking"):
            centres[name] = node_config.get("data_center_id")
    if len(set(centres.values())) > 1:
        raise ValueError(
            f"available_node_types.*.node_config.data_center_id: global-networking node types "
            f"are in different data centres {centres}; put them in one, where the network is "
            "fast and a shared network volume can be mounted"
        )


def pod_mutation(
    node_config: Mapping[str, Any], name: str, tags: Mapping[str, str]
) -> tuple[str, str]:
    """The GraphQL mutation that creates one pod, and the name of its result field."""
    check_node_config(node_config)
    params = dict(node_config)
    global_networking = bool(params.pop("global_networking", False))
    gpu_type_id = params.get("gpu_type_id")
    params.setdefault("cloud_type", "ALL")
    if gpu_type_id is None:
        params.pop("gpu_count", None)
    else:
        params.setdefault("gpu_count", 1)
    if params.get("template_id") is None:
        params.setdefault("container_disk_in_gb", 10)  # the SDK's create_pod default
    env = {**dict(params.pop("env", None) or {}), TAGS_ENV_VAR: encode_tags(tags)}
    escaped = {
        key: graphql_string(value) if isinstance(value, str) and key != "cloud_type" else value
        for key, value in params.items()
    }
    escaped["env"] = {graphql_string(str(k)): graphql_string(str(v)) for k, v in env.items()}
    mutation = generate_pod_deployment_mutation(name=graphql_string(name), **escaped)
    if global_networking:
        if "input: {" not in mutation:
            raise RuntimeError(
                "the runpod SDK's pod mutation changed shape; cannot add globalNetwork"
            )
        mutation = mutation.replace("input: {", "input: {\n          globalNetwork: true", 1)
    return ("podFindAndDeployOnDemand" if gpu_type_id else "deployCpuPod"), mutation


class PublicPortSSHCommandRunner(SSHCommandRunner):
    """SSH to a pod's public IP on the public port RunPod maps to the pod's port 22.

    Ray builds SSH options in two places: the runner's own (commands, rsync, port forwards) and,
    for `initialization_commands`, fresh options from `ssh_options_override_ssh_key`. Both get
    the port here; so does the `ssh` line Ray prints for the user.
    """

    ssh_port: int | None = None

    def _set_ssh_ip_if_required(self) -> None:
        super()._set_ssh_ip_if_required()
        if self.ssh_port is None:
            self.ssh_port = self.provider.public_ssh_port(self.node_id)
        if self.ssh_port is not None:
            self.ssh_options.arg_dict["Port"] = self.ssh_port

    def run(self, cmd: str | None = None, *args: Any, **kwargs: Any) -> str:
        override_key = kwargs.pop("ssh_options_override_ssh_key", "")
        if not override_key:
            return super().run(cmd, *args, **kwargs)
        self._set_ssh_ip_if_required()
        options = SSHOptions(override_key, ProxyCommand=self.ssh_proxy_command, Port=self.ssh_port)
        saved, self.ssh_options = self.ssh_options, options
        try:
            return super().run(cmd, *args, **kwargs)
        finally:
            self.ssh_options = saved

    def remote_shell_command_str(self) -> str:
        command = super().remote_shell_command_str()
        return command.replace("ssh ", f"ssh -p {self.ssh_port} ", 1) if self.ssh_port else command


class RunPodNodeProvider(NodeProvider):
    """Ray external node provider: one RunPod pod per Ray node, tags in the pod's env."""

    # The back-off's wait, per provider: a test replaces it on one instance, never process-wide.
    sleep: Callable[[float], None] = staticmethod(time.sleep)

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        self.settings = RunPodProviderSettings.model_validate(provider_config)
        api_key = self.settings.api_key or os.environ.get("RUNPOD_API_KEY")
        if not api_key:
            raise ValueError(
                "no RunPod API key: export RUNPOD_API_KEY or set provider.api_key in the "
                "cluster YAML"
            )
        self._api_key = api_key
        self._lock = threading.RLock()
        self._pods: dict[str, dict[str, Any]] = {}
        # RunPod cannot change a pod's env without restarting it: tag updates go to a file.
        state_path = self.settings.state_path or default_state_path(cluster_name)
        self._tags = TagStore(state_path)
        self._internal_ips: dict[str, str] = {}
        self._dns_first_try: dict[str, float] = {}

    @staticmethod
    def bootstrap_config(cluster_config: dict[str, Any]) -> dict[str, Any]:
        """Called by `ray up` when it loads the config: every node type is checked here, so a
        bad field fails in a second with its name instead of as a failed launch minutes later."""
        check_cluster_config(cluster_config)
        return cluster_config

    # --- Ray NodeProvider interface -------------------------------------------------------

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        """Ids of this cluster's pods that are not terminated and match tag_filters."""
        pods = self._refresh()
        return [pod_id for pod_id in pods if tags_match(self.node_tags(pod_id), tag_filters)]

    def is_running(self, node_id: str) -> bool:
        """Whether the pod's container is up (RunPod reports its runtime)."""
        pod = self._started_pod(node_id)
        return bool(pod and pod.get("desiredStatus") == "RUNNING")

    def is_terminated(self, node_id: str) -> bool:
        """Whether the pod is gone or terminated."""
        pod = self._pod(node_id)
        return pod is None or pod.get("desiredStatus") == "TERMINATED"

    def node_tags(self, node_id: str) -> dict[str, str]:
        """Tags stored on the pod at creation, updated by set_node_tags."""
        pod = self._pod(node_id)
        if pod is None:
            return {}
        return {**(decode_tags(pod.get("env")) or {}), **self._tags.get(node_id)}

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        """Merge tags into the node's tags, persisted in the state file."""
        self._tags.update(node_id, tags)

    def external_ip(self, node_id: str) -> str | None:
        """Public IP of the pod's SSH port mapping; None until the pod runs."""
        pod = self._started_pod(node_id)
        entry = _public_ssh_entry(pod) if pod else None
        return entry["ip"] if entry else None

    def internal_ip(self, node_id: str) -> str | None:
        """Global-networking IP of the pod (see the module docstring); None until known."""
        with self._lock:
            if node_id in self._internal_ips:
                return self._internal_ips[node_id]
        pod = self._started_pod(node_id)
        if pod is None:
            return None
        suffix = self.settings.internal_dns_suffix
        address = self._resolve(f"{node_id}.{suffix}") if suffix else None
        if address:
            with self._lock:
                self._internal_ips[node_id] = address
            return address
        if (decode_tags(pod.get("env")) or {}).get(TAG_GLOBAL_NETWORKING) == "true":
            # RunPod's DNS learns a new pod's name a little after the pod runs; the host address
            # below is unreachable from other pods, so wait (Ray polls until its own deadline).
            self._note_dns_wait(node_id)
            return None
        private = [port for port in _runtime_ports(pod) if not port.get("isIpPublic")]
        return private[0]["ip"] if private else None

    def public_ssh_port(self, node_id: str) -> int | None:
        """Public port that RunPod maps to the pod's port 22; None until the pod runs."""
        pod = self._started_pod(node_id)
        entry = _public_ssh_entry(pod) if pod else None
        return entry.get("publicPort") if entry else None

    def create_node(
        self, node_config: dict[str, Any], tags: dict[str, str], count: int
    ) -> dict[str, dict[str, Any]]:
        """Create count pods; if one fails, terminate those already created, then raise."""
        tags = {**tags, TAG_RAY_CLUSTER_NAME: self.cluster_name}
        if node_config.get("global_networking"):
            tags[TAG_GLOBAL_NETWORKING] = "true"
        node_type = tags.get(TAG_RAY_USER_NODE_TYPE) or tags.get(TAG_RAY_NODE_KIND) or "node"
        token = uuid.uuid4().hex[:8]
        pod_mutation(node_config, pod_name(self.cluster_name, node_type, token), tags)  # validate
        created: dict[str, dict[str, Any]] = {}
        try:
            for index in range(count):
                name = pod_name(self.cluster_name, node_type, f"{token}-{index}")
                pod = self._create_pod(name, *pod_mutation(node_config, name, tags))
                created[pod["id"]] = pod
        except Exception as exc:
            leaked = self._terminate_quietly(list(created))
            cleanup = (
                f"terminated the {len(created)} pod(s) it had created"
                if not leaked
                else f"could NOT terminate pods {leaked}: terminate them in the RunPod console"
            )
            raise NodeLaunchException(
                "RunPodLaunchFailed",
                f"launching {count} '{node_type}' pod(s) failed after {len(created)}: {exc}; "
                f"{cleanup}",
                sys.exc_info(),
            ) from exc
        return created

    def terminate_node(self, node_id: str) -> None:
        """Terminate the pod; a pod that is already gone counts as terminated."""
        try:
            self._graphql("podTerminate", generate_pod_terminate_mutation(graphql_string(node_id)))
        except QueryError:
            if node_id in self._refresh():
                raise
            logger.info("RunPod pod %s was already gone", node_id)
        with self._lock:
            self._pods.pop(node_id, None)
            self._internal_ips.pop(node_id, None)
            self._dns_first_try.pop(node_id, None)
        self._tags.forget([node_id])

    def terminate_nodes(self, node_ids: list[str]) -> None:
        """Terminate every pod in node_ids; raise afterwards if any could not be terminated."""
        leaked = self._terminate_quietly(node_ids)
        if leaked:
            raise RunPodAPIError(
                f"could not terminate RunPod pods {leaked}; retry or use the console"
            )

    def get_command_runner(
        self,
        log_prefix: str,
        node_id: str,
        auth_config: dict[str, Any],
        cluster_name: str,
        process_runner: ModuleType,
        use_internal_ip: bool,
        docker_config: dict[str, Any] | None = None,
    ) -> CommandRunnerInterface:
        """Ray's SSH runner, told the mapped public SSH port when it goes over the public IP."""
        if use_internal_ip or (docker_config and docker_config.get("container_name")):
            return super().get_command_runner(
                log_prefix,
                node_id,
                auth_config,
                cluster_name,
                process_runner,
                use_internal_ip,
                docker_config,
            )
        return PublicPortSSHCommandRunner(
            log_prefix=log_prefix,
            node_id=node_id,
            provider=self,
            auth_config=auth_config,
            cluster_name=cluster_name,
            process_runner=process_runner,
            use_internal_ip=use_internal_ip,
        )

    def prepare_for_head_node(self, cluster_config: dict[str, Any]) -> dict[str, Any]:
        """Give the head a RunPod key (inside a pod RUNPOD_API_KEY is a pod-scoped key that
        cannot launch pods): RUNPOD_HEAD_API_KEY where `ray up` runs, else the launching key.

        The head's autoscaler only lists, creates and terminates pods, so the head key should be
        a Restricted key with GraphQL Read/Write and no Serverless access (RunPod cannot scope a
        key to pods alone); the account's full key then never leaves the user's machine.
        """
        provider = dict(cluster_config["provider"])
        head_key = os.environ.get(HEAD_API_KEY_ENV_VAR)
        if not head_key and not provider.get("api_key"):
            logger.warning(
                "%s is not set: the head gets the key `ray up` runs with; create a Restricted "
                "key (GraphQL Read/Write only) for it",
                HEAD_API_KEY_ENV_VAR,
            )
        provider["api_key"] = head_key or provider.get("api_key") or self._api_key
        return {**cluster_config, "provider": provider}

    # --- addresses ------------------------------------------------------------------------

    def _resolve(self, host: str) -> str | None:
        """The pod's private address; a method so a test double can answer for RunPod's DNS."""
        return resolve_ipv4(host)

    def _note_dns_wait(self, node_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            first = self._dns_first_try.setdefault(node_id, now)
        waited = now - first
        if waited > self.settings.dns_timeout_s:
            with self._lock:  # once per timeout, not on every autoscaler update
                self._dns_first_try[node_id] = now
            logger.error(
                "RunPod pod %s has run for %.0fs without %s.%s resolving: is global networking "
                "offered in its data centre (node_config.data_center_id)?",
                node_id,
                waited,
                node_id,
                self.settings.internal_dns_suffix,
            )

    # --- RunPod API -----------------------------------------------------------------------

    def _pod(self, node_id: str) -> dict[str, Any] | None:
        with self._lock:
            pod = self._pods.get(node_id)
        return pod if pod is not None else self._refresh().get(node_id)

    def _started_pod(self, node_id: str) -> dict[str, Any] | None:
        """The pod with its runtime; refetched while the cached copy has none, as Ray polls
        addresses of starting nodes without refreshing the node list."""
        pod = self._pod(node_id)
        if pod is not None and not pod.get("runtime"):
            pod = self._refresh().get(node_id)
        return pod if pod is not None and pod.get("runtime") else None

    def _refresh(self) -> dict[str, dict[str, Any]]:
        mine = self._cluster_pods(self._graphql("myPods", QUERY_POD))
        with self._lock:
            self._pods = mine
        return mine

    def _cluster_pods(self, data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        pods = (data.get("myself") or {}).get("pods") or []
        return {
            pod["id"]: pod
            for pod in pods
            if (decode_tags(pod.get("env")) or {}).get(TAG_RAY_CLUSTER_NAME) == self.cluster_name
            and pod.get("desiredStatus") != "TERMINATED"
        }

    def _create_pod(self, name: str, result_field: str, mutation: str) -> dict[str, Any]:
        def attempt(number: int) -> dict[str, Any]:
            if number > 0:
                # The failed attempt may have created the pod before its answer was lost.
                existing = [
                    pod
                    for pod in self._cluster_pods(self._graphql_once(QUERY_POD)).values()
                    if pod.get("name") == name
                ]
                if existing:
                    return existing[0]
            return {**self._graphql_once(mutation)[result_field], "name": name}

        pod = self._with_retries(result_field, attempt)
        with self._lock:
            self._pods[pod["id"]] = pod
        logger.info("created RunPod pod %s (%s)", pod["id"], name)
        return pod

    def _terminate_quietly(self, node_ids: list[str]) -> list[str]:
        leaked = []
        for node_id in node_ids:
            try:
                self.terminate_node(node_id)
            except Exception:
                logger.exception("could not terminate RunPod pod %s", node_id)
                leaked.append(node_id)
        return leaked

    def _graphql(self, operation: str, query: str) -> dict[str, Any]:
        return self._with_retries(operation, lambda _: self._graphql_once(query))

    def _with_retries(self, operation: str, attempt: Callable[[int], T]) -> T:
        settings = self.settings
        delays = backoff_delays(
            settings.max_retries, settings.backoff_base_s, settings.backoff_cap_s
        )
        number = 0
        while True:
            try:
                return attempt(number)
            except TransientAPIError as exc:
                if number >= len(delays):
                    raise RunPodAPIError(
                        f"RunPod API call {operation} failed {number + 1} times, last with {exc}; "
                        "RunPod is rate-limiting or unavailable: retry later or raise "
                        "provider.max_retries"
                    ) from exc
                delay = max(delays[number], min(exc.retry_after_s or 0.0, settings.backoff_cap_s))
                logger.warning(
                    "RunPod API call %s failed (%s); retry %d/%d in %.2fs",
                    operation,
                    exc,
                    number + 1,
                    len(delays),
                    delay,
                )
                self.sleep(delay)
                number += 1

    def _graphql_once(self, query: str) -> dict[str, Any]:
        base_url = os.environ.get(API_BASE_URL_ENV_VAR, DEFAULT_API_BASE_URL).rstrip("/")
        try:
            response = requests.post(
                f"{base_url}/graphql",
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": USER_AGENT,
                    "Authorization": f"Bearer {self._api_key}",
                },
                data=json.dumps({"query": query}),
                timeout=self.settings.request_timeout_s,
            )
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ) as exc:
            raise TransientAPIError(f"network error: {exc}") from exc
        status = response.status_code
        if status == 429 or status >= 500:
            raise TransientAPIError(
                f"HTTP {status} {response.reason}", _retry_after_s(response.headers)
            )
        if status in (401, 403):
            raise AuthenticationError(
                f"RunPod rejected the API key (HTTP {status}); check RUNPOD_API_KEY or "
                "provider.api_key"
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise RunPodAPIError(f"RunPod answered HTTP {status} without JSON") from exc
        if body.get("errors"):
            raise QueryError(body["errors"][0].get("message"), query)
        if status >= 400 or not isinstance(body.get("data"), dict):
            raise RunPodAPIError(f"RunPod answered HTTP {status} without data: {body}")
        return body["data"]
