"""`build_app`: the only place that binds deployments together (`serve run serve_config.yaml`)."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from deployments.config import AppArgs, ModelConfig, RouterUserConfig, apply_env_overrides
from deployments.gateway.router import Router
from deployments.model_server import DRAIN_TIMEOUT_S, ModelServer
from deployments.model_source import resolve_model_dir

HEAD_NODE_RESOURCE = "node:__internal_head__"
ROUTER_DEPLOYMENT = "Router"
# A stopping replica (downscale, redeploy, app deletion) gets no new requests, and Serve waits for
# its ongoing ones (a stream counts until its last event) before the destructor and the kill.
# Serve checks every DRAIN_POLL_S, so an idle replica leaves within that.
DRAIN_POLL_S = 0.5
# The router's streams end just after the model's; its extra seconds let them reach the client.
ROUTER_DRAIN_TIMEOUT_S = DRAIN_TIMEOUT_S + 5


def deployment_name(model: str) -> str:
    return "ModelServer-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in model)


def model_deployment(config: ModelConfig) -> Application:
    """A ModelServer deployment sized by the config: one GPU per replica on GPU nodes."""
    options: dict[str, Any] = {
        "name": deployment_name(config.name),
        "max_ongoing_requests": config.max_ongoing_requests,
        "max_queued_requests": config.max_queued_requests,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": DRAIN_TIMEOUT_S,
        "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
        # Batching sizes change live (`serve deploy` with a new user_config), no replica restart.
        "user_config": {"batching": config.batching.model_dump()},
    }
    if config.autoscaling is not None:
        options["autoscaling_config"] = config.autoscaling.model_dump()
    else:
        options["num_replicas"] = config.num_replicas
    if config.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = config.max_replicas_per_node
    return serve.deployment(ModelServer).options(**options).bind(config)


def build_app(args: dict[str, Any]) -> Application:
    """Validate `args` (serve_config.yaml) and bind the Router to one ModelServer per model."""
    app_args = AppArgs.model_validate(apply_env_overrides(args)).with_absolute_paths()
    for model in app_args.models:
        # Fail the deploy here, with the fix, rather than in a replica retry loop.
        resolve_model_dir(model.source, model.registry, verify=False)
    handles = {m.name: model_deployment(m) for m in app_args.models}
    router = serve.deployment(Router).options(
        name=ROUTER_DEPLOYMENT,
        num_replicas=app_args.router_replicas,
        # Live split weights (`awq-serve rollout`) arrive as user_config. The default has none,
        # so a redeployed config without them puts every alias back to its configured split.
        user_config=RouterUserConfig().model_dump(mode="json"),
        max_ongoing_requests=1000,
        graceful_shutdown_timeout_s=ROUTER_DRAIN_TIMEOUT_S,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        # Pinned to the head node (Ray's built-in head resource): the ingress then lives as
        # long as the cluster, and losing a worker node loses only that node's replicas.
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}},
    )
    return router.bind(app_args.model_dump(mode="json"), handles)
