"""What quantization tasks ask Ray for: a GPU where the cluster has or can add one, else CPUs
that fit one node (never the cluster total), and `--gpus` / `--cpus` from the CLI."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import yaml

import cluster.resources as resources
from awq_serve_cli import main as cli
from quantization.pipeline import _resources
from tests.serving import disconnect_ray


@pytest.fixture(scope="module")
def ray_two_cpus() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    disconnect_ray()


@pytest.fixture
def no_bootstrap_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "ray_bootstrap_config.yaml"
    monkeypatch.setattr(resources, "BOOTSTRAP_CONFIG", path)
    return path


def test_cpu_only_cluster_asks_for_the_cpus_of_one_node(
    ray_two_cpus: None, no_bootstrap_config: Path
) -> None:
    assert _resources() == {"num_cpus": 2}
    assert _resources(cpus=1) == {"num_cpus": 1}
    assert _resources(gpus=0, cpus=2) == {"num_cpus": 2}


def test_cpus_held_by_a_replica_are_not_asked_for(
    ray_two_cpus: None, no_bootstrap_config: Path
) -> None:
    @ray.remote(num_cpus=1)
    class Replica:
        def ready(self) -> bool:
            return True

    replica = Replica.remote()
    ray.get(replica.ready.remote())
    try:
        request = _resources()

        @ray.remote
        def task() -> float:
            return ray.get_runtime_context().get_assigned_resources()["CPU"]

        # The old request (all cluster CPUs) could never be scheduled here; this one runs.
        assert request == {"num_cpus": 1}
        assert ray.get(task.options(**request).remote(), timeout=60) == 1
    finally:
        ray.kill(replica)


def test_gpu_node_types_of_the_autoscaler_make_the_default_a_gpu(
    ray_two_cpus: None, no_bootstrap_config: Path
) -> None:
    # configs/cluster/runpod.yaml's worker types, as `ray up` writes them to the head.
    types = {
        "head": {"resources": {"CPU": 4, "GPU": 0}},
        "rtx4090": {"resources": {"CPU": 8, "GPU": 1}},
    }
    no_bootstrap_config.write_text(yaml.safe_dump({"available_node_types": types}))

    assert _resources() == {"num_gpus": 1}
    assert _resources(gpus=0, cpus=2) == {"num_cpus": 2}


def test_explicit_gpu_request_on_a_cluster_without_gpus(
    ray_two_cpus: None, no_bootstrap_config: Path
) -> None:
    assert _resources(gpus=1) == {"num_gpus": 1}
    assert _resources(gpus=1, cpus=4) == {"num_gpus": 1, "num_cpus": 4}


def test_cli_passes_gpus_and_cpus_to_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[float | None, float | None]] = []
    monkeypatch.setattr(cli, "_run", lambda specs, registry, publish, gpus, cpus: seen.append(
        (gpus, cpus)) or 0)  # fmt: skip

    assert cli.main(["quantize", "some/model", "--gpus", "1"]) == 0
    assert cli.main(["quantize", "some/model", "--gpus", "0", "--cpus", "6"]) == 0
    assert cli.main(["quantize", "some/model"]) == 0
    assert seen == [(1.0, None), (0.0, 6.0), (None, None)]
