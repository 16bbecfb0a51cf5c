"""A local fake of RunPod's GraphQL API (``POST /graphql``), for the calls the node provider makes.

It parses, validates and executes the query text with graphql-core against a schema holding the
part of RunPod's schema that the runpod SDK's pod documents use: ``myself { pods {...} }``,
``podFindAndDeployOnDemand``, ``deployCpuPod`` and ``podTerminate``. Point the SDK at it with
``RUNPOD_API_BASE_URL=<fake.url>``. It can fail the next calls with an HTTP status, drop the
connection, lose a response after doing the work, and fail the Nth pod creation.

For end-to-end runs (tests/fakes/runpod_pods.py) pods can be given loopback addresses
(`global_ip_base="127.0.0."`), RunPod's private DNS is answered on ``GET /internal-dns/<name>``
for processes other than the test's, and `on_terminate` is told when a pod is terminated, as a
real pod's processes end with it.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from graphql import GraphQLError, build_schema, execute, parse, validate
from graphql.language import FieldNode, OperationDefinitionNode

NO_CAPACITY = (
    "There are no longer any instances available with the requested specifications. "
    "Please refresh and try again."
)

SCHEMA = build_schema(
    """
    scalar Void

    enum CloudTypeEnum { ALL SECURE COMMUNITY }
    enum PodStatus { CREATED RUNNING RESTARTING EXITED PAUSED DEAD TERMINATED }

    input EnvironmentVariableInput { key: String! value: String! }
    input PodTerminateInput { podId: String! }

    input PodFindAndDeployOnDemandInput {
      name: String
      imageName: String
      cloudType: CloudTypeEnum
      startSsh: Boolean
      gpuTypeId: String
      supportPublicIp: Boolean
      gpuCount: Int
      volumeInGb: Int
      minVcpuCount: Int
      minMemoryInGb: Int
      allowedCudaVersions: [String]
      dataCenterId: String
      dockerArgs: String
      countryCode: String
      containerDiskInGb: Int
      ports: String
      volumeMountPath: String
      env: [EnvironmentVariableInput]
      templateId: String
      networkVolumeId: String
      minDownload: Int
      minUpload: Int
      globalNetwork: Boolean
    }

    input deployCpuPodInput {
      name: String
      imageName: String
      cloudType: CloudTypeEnum
      startSsh: Boolean
      instanceId: String
      dataCenterId: String
      dockerArgs: String
      countryCode: String
      containerDiskInGb: Int
      ports: String
      volumeMountPath: String
      env: [EnvironmentVariableInput]
      templateId: String
      networkVolumeId: String
      minDownload: Int
      minUpload: Int
    }

    type PodRuntimePorts {
      ip: String
      isIpPublic: Boolean
      privatePort: Int
      publicPort: Int
      type: String
    }
    type PodRuntime { uptimeInSeconds: Int ports: [PodRuntimePorts] }
    type PodMachineInfo { gpuDisplayName: String podHostId: String }

    type Pod {
      id: String!
      name: String
      containerDiskInGb: Int
      costPerHr: Float
      desiredStatus: PodStatus
      dockerArgs: String
      dockerId: String
      env: [String]
      gpuCount: Int
      imageName: String
      lastStatusChange: String
      machineId: String
      memoryInGb: Float
      podType: String
      port: Int
      ports: String
      uptimeSeconds: Int
      vcpuCount: Float
      volumeInGb: Float
      volumeMountPath: String
      runtime: PodRuntime
      machine: PodMachineInfo
    }

    type User { id: String pods: [Pod] }

    type Query { myself: User }

    type Mutation {
      podFindAndDeployOnDemand(input: PodFindAndDeployOnDemandInput): Pod
      deployCpuPod(input: deployCpuPodInput!): Pod
      podTerminate(input: PodTerminateInput): Void
    }
    """
)


@dataclass
class FakePod:
    """One pod as the fake holds it; spec is the creation input with RunPod's field names."""

    id: str
    name: str
    spec: dict[str, Any]
    env: dict[str, str]
    number: int
    running: bool = False
    desired_status: str = "RUNNING"
    global_ip_base: str = "10.65.0."

    @property
    def public_ip(self) -> str:
        return f"203.0.113.{self.number}"

    @property
    def host_ip(self) -> str:
        return f"100.65.0.{self.number}"

    @property
    def global_ip(self) -> str | None:
        return f"{self.global_ip_base}{self.number}" if self.spec.get("globalNetwork") else None

    def runtime_ports(self) -> list[dict[str, Any]]:
        """RunPod's runtime.ports: TCP ports on the public IP, HTTP ports on the host address."""
        entries = []
        for index, port in enumerate(filter(None, (self.spec.get("ports") or "").split(","))):
            number, _, kind = port.partition("/")
            public = kind == "tcp"
            entries.append(
                {
                    "ip": self.public_ip if public else self.host_ip,
                    "isIpPublic": public,
                    "privatePort": int(number),
                    "publicPort": (40000 if public else 60000) + 100 * self.number + index,
                    "type": kind,
                }
            )
        return entries

    def as_graphql(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "id": self.id,
            "name": self.name,
            "containerDiskInGb": spec.get("containerDiskInGb"),
            "costPerHr": 0.69 if spec.get("gpuTypeId") else 0.08,
            "desiredStatus": self.desired_status,
            "dockerArgs": spec.get("dockerArgs", ""),
            "dockerId": None,
            "env": [f"{key}={value}" for key, value in self.env.items()],
            "gpuCount": spec.get("gpuCount", 0),
            "imageName": spec.get("imageName"),
            "lastStatusChange": f"Rented by User: {self.desired_status}",
            "machineId": f"machine{self.number}",
            "memoryInGb": 31.0,
            "podType": "RESERVED",
            "port": None,
            "ports": spec.get("ports"),
            "uptimeSeconds": 60 if self.running else 0,
            "vcpuCount": 8.0,
            "volumeInGb": spec.get("volumeInGb", 0),
            "volumeMountPath": spec.get("volumeMountPath"),
            "runtime": (
                {"uptimeInSeconds": 60, "ports": self.runtime_ports()} if self.running else None
            ),
            "machine": {
                "gpuDisplayName": spec.get("gpuTypeId"),
                "podHostId": f"{self.id}-644110{self.number:02d}",
            },
        }


@dataclass
class _Fault:
    """One injected failure. kind "status": answer with an HTTP error status; "drop": close the
    connection unanswered; "lost": do the work, then answer 502 like a timed-out proxy."""

    kind: str
    status: int = 0
    retry_after: float | None = None
    operation: str | None = None


@dataclass
class FakeRunPodAPI:
    """The fake server and its state; start() serves it on 127.0.0.1 in a background thread."""

    api_key: str = "fake-runpod-key"
    auto_start: bool = True
    pods: dict[str, FakePod] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    global_ip_base: str = "10.65.0."
    on_terminate: Callable[[FakePod], None] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._faults: deque[_Fault] = deque()
        self._failing_creates: dict[int, str] = {}
        self._creates = 0
        self._numbers = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeRunPodAPI:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                api._handle(self)

            def do_GET(self) -> None:
                ip = api.internal_dns().get(self.path.removeprefix("/internal-dns/"))
                api._send(self, 200 if ip else 404, {"ip": ip})

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        """Base URL to put in RUNPOD_API_BASE_URL (the SDK appends /graphql)."""
        assert self._server is not None, "start() the fake first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def reset(self) -> None:
        """Forget pods, calls and pending faults; new pods start running again."""
        with self._lock:
            self.pods.clear()
            self.calls.clear()
            self._faults.clear()
            self._failing_creates.clear()
            self._creates = 0
            self.auto_start = True

    # --- test controls ---------------------------------------------------------------------

    def fail_next(
        self,
        count: int,
        status: int = 429,
        retry_after: float | None = None,
        operation: str | None = None,
    ) -> None:
        """Answer the next count calls (of operation, if given) with an HTTP error status."""
        self._add_faults(count, _Fault("status", status, retry_after, operation))

    def drop_next(self, count: int, operation: str | None = None) -> None:
        """Close the connection of the next count calls without answering."""
        self._add_faults(count, _Fault("drop", operation=operation))

    def lose_next_response(self, count: int = 1, operation: str | None = None) -> None:
        """Execute the next count calls, then answer 502 instead of the result."""
        self._add_faults(count, _Fault("lost", 502, operation=operation))

    def fail_create(self, nth: int, message: str = NO_CAPACITY) -> None:
        """Make the nth pod creation from now fail with RunPod's out-of-capacity error."""
        with self._lock:
            self._failing_creates[self._creates + nth] = message

    def start_pod(self, pod_id: str) -> None:
        """Bring a pod's container up, so that the API reports its runtime and ports."""
        with self._lock:
            self.pods[pod_id].running = True

    def seed_pod(self, name: str, env: dict[str, str], **spec: Any) -> FakePod:
        """Add a pod made outside the provider (the console, another cluster)."""
        with self._lock:
            return self._add_pod(name, {"imageName": "runpod/base", **spec}, env)

    def live_pods(self) -> list[FakePod]:
        """Copies of the pods that exist now."""
        with self._lock:
            return [replace(pod) for pod in self.pods.values()]

    def internal_dns(self) -> dict[str, str]:
        """What <pod id>.runpod.internal resolves to inside RunPod's global network."""
        with self._lock:
            return {
                f"{pod.id}.runpod.internal": pod.global_ip
                for pod in self.pods.values()
                if pod.global_ip
            }

    def _add_faults(self, count: int, fault: _Fault) -> None:
        with self._lock:
            self._faults.extend(replace(fault) for _ in range(count))

    # --- GraphQL resolvers (graphql-core calls root fields as methods of the root value) ----

    def myself(self, info: Any) -> dict[str, Any]:
        return {"id": "user_fake", "pods": [pod.as_graphql() for pod in self.pods.values()]}

    def podFindAndDeployOnDemand(self, info: Any, input: dict[str, Any]) -> dict[str, Any]:
        return self._deploy(input)

    def deployCpuPod(self, info: Any, input: dict[str, Any]) -> dict[str, Any]:
        return self._deploy(input)

    def podTerminate(self, info: Any, input: dict[str, Any]) -> None:
        pod = self.pods.pop(input["podId"], None)
        if pod is None:
            raise GraphQLError(f"pod {input['podId']} not found")
        if self.on_terminate is not None:
            self.on_terminate(pod)

    def _deploy(self, spec: dict[str, Any]) -> dict[str, Any]:
        self._creates += 1
        if self._creates in self._failing_creates:
            raise GraphQLError(self._failing_creates.pop(self._creates))
        env = {item["key"]: item["value"] for item in spec.get("env") or []}
        return self._add_pod(spec.get("name") or "", spec, env).as_graphql()

    def _add_pod(self, name: str, spec: dict[str, Any], env: dict[str, str]) -> FakePod:
        number = next(self._numbers)
        pod = FakePod(uuid.uuid4().hex[:14], name, dict(spec), env, number)
        pod.global_ip_base = self.global_ip_base
        pod.running = self.auto_start
        self.pods[pod.id] = pod
        return pod

    # --- HTTP ------------------------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        if request.path.split("?")[0] != "/graphql":
            self._send(request, 404, {"errors": [{"message": "not found"}]})
            return
        length = int(request.headers.get("Content-Length") or 0)
        try:
            payload = json.loads(request.rfile.read(length) or b"{}")
            document = parse(payload["query"])
        except (ValueError, KeyError, GraphQLError) as exc:
            self._send(request, 400, {"errors": [{"message": f"bad request: {exc}"}]})
            return
        operation = _root_field(document)
        with self._lock:
            self.calls.append(operation)
            fault = self._take_fault(operation)
            if fault is not None and fault.kind == "drop":
                request.close_connection = True
                return
            if fault is not None and fault.kind == "status":
                headers = {} if fault.retry_after is None else {"Retry-After": fault.retry_after}
                self._send(request, fault.status, {"errors": [{"message": "fault"}]}, headers)
                return
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                self._send(request, 401, {"errors": [{"message": "Unauthorized"}]})
                return
            errors = validate(SCHEMA, document)
            if errors:
                self._send(request, 400, {"errors": [error.formatted for error in errors]})
                return
            result = execute(
                SCHEMA, document, root_value=self, variable_values=payload.get("variables")
            )
        if fault is not None:  # "lost": the work is done, the answer never arrives
            self._send(request, 502, b"<html><body>502 Bad Gateway</body></html>")
            return
        body: dict[str, Any] = {"data": result.data}
        if result.errors:
            body["errors"] = [error.formatted for error in result.errors]
        self._send(request, 200, body)

    def _take_fault(self, operation: str) -> _Fault | None:
        for fault in self._faults:
            if fault.operation in (None, operation):
                self._faults.remove(fault)
                return fault
        return None

    @staticmethod
    def _send(
        request: BaseHTTPRequestHandler,
        status: int,
        body: dict[str, Any] | bytes,
        headers: dict[str, Any] | None = None,
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request.send_response(status)
        content_type = "text/html" if isinstance(body, bytes) else "application/json"
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            request.send_header(key, str(value))
        request.end_headers()
        request.wfile.write(data)


def _root_field(document: Any) -> str:
    """Name of the first root field of the first operation, e.g. "podTerminate"."""
    for definition in document.definitions:
        if isinstance(definition, OperationDefinitionNode):
            for selection in definition.selection_set.selections:
                if isinstance(selection, FieldNode):
                    return selection.name.value
    return "unknown"
