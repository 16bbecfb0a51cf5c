"""What a quantization task should ask Ray for on the cluster it runs on.

A request has to be satisfiable by one node, and, on an autoscaling cluster with no GPU node up
yet, has to name the GPU: Ray's autoscaler launches a node for a pending demand only when some
node type could hold it, so a CPU request never brings a GPU pod up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# Where `ray up` puts the autoscaler's config on the head (where `ray job submit` runs jobs).
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def node_types_have_gpus(config_path: Path | None = None) -> bool:
    """Whether the cluster's autoscaler can add GPU nodes: the autoscaler v2 cluster config in
    the GCS, or the v1 autoscaler's bootstrap config on the head, declares a GPU node type."""
    import ray

    try:
        max_resources = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:  # not connected, or a Ray without the v2 cluster config
        max_resources = {}
    if max_resources.get("GPU", 0) > 0:
        return True
    path = (config_path or BOOTSTRAP_CONFIG).expanduser()
    if not path.is_file():
        return False
    config: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    node_types = (config.get("available_node_types") or {}).values()
    return any((t.get("resources") or {}).get("GPU", 0) > 0 for t in node_types)


def cluster_has_gpus() -> bool:
    """A GPU is up now, or a node type the autoscaler can launch has one."""
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1 or node_types_have_gpus()


def cpus_fitting_one_node() -> int:
    """The most CPUs free on one alive node now (at least 1): never the cluster total, which no
    single task can get on a multi-node cluster, nor CPUs a Serve replica already holds."""
    import ray

    free = [
        node.get("CPU", 0)
        for node in ray._private.state.state.available_resources_per_node().values()
    ]
    return max(1, int(max(free, default=1)))
