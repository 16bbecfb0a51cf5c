"""The drain `graceful_run` deploys on a signal: the same config, every model deployment told to
drain through its user_config, nothing else changed (so Serve restarts no replica)."""

from __future__ import annotations

import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.app import deployment_name
from deployments.graceful_run import draining_config
from tests.serving import REPO


def test_the_drain_config_tells_every_model_deployment_and_changes_nothing_else() -> None:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    app = config["applications"][0]
    second = {**app["args"]["models"][0], "name": "second model"}
    app["args"]["models"].append(second)
    app["deployments"] = [{"name": "Router", "num_replicas": 2}]
    out = draining_config(config)

    schema = ServeDeploySchema.model_validate(out)  # what Serve will accept
    deployments = {d.name: d for d in schema.applications[0].deployments}
    models = [deployment_name(m["name"]) for m in app["args"]["models"]]
    assert set(deployments) == {"Router", *models}
    assert all(deployments[m].user_config == {"draining": True} for m in models)
    assert out["applications"][0]["deployments"][0] == {"name": "Router", "num_replicas": 2}
    assert out["applications"][0]["args"] == app["args"]  # the app itself is the same
    assert config["applications"][0]["deployments"] == [{"name": "Router", "num_replicas": 2}]
