"""Deploying Serve configs from Python: the one module that touches Serve's controller client.

Ray has no public Python call that deploys a config (a `ServeDeploySchema`) and waits for it;
`serve deploy` does it over the dashboard's REST API, which a cluster started without the
dashboard lacks. So the controller client `serve deploy`'s handler uses is reached here, and only
here, so a Ray upgrade that moves it breaks one file.
"""

from __future__ import annotations

from typing import Any


def _client() -> Any:
    from ray.serve.context import _get_global_client

    return _get_global_client()


def serve_details() -> Any:
    """Serve's `ServeInstanceDetails` (the body of `GET /api/serve/applications/`)."""
    from ray.serve.schema import ServeInstanceDetails

    return ServeInstanceDetails(**_client().get_serve_details())


def deploy_apps(schema: Any, wait_for: list[str], timeout_s: float) -> None:
    """Submit `schema` (a `ServeDeploySchema`) and wait until the `wait_for` apps are RUNNING."""
    client = _client()
    client.deploy_apps(schema, _blocking=False)
    for name in wait_for:
        client._wait_for_application_running(name, timeout_s=timeout_s)
