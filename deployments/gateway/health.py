"""`/health`: per-model readiness, replica counts and queue depth, as data.

`health_report` is pure (unit-tested); `replica_counts` asks Serve's controller how many replicas
of each model deployment are running, which the router cannot see through its handles.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ray.serve.handle import DeploymentHandle


async def replica_info(handle: DeploymentHandle, timeout_s: float = 5.0) -> dict[str, Any]:
    """A replica's `info()`; any failure (none running, timeout, crash) reads as not healthy."""
    try:
        async with asyncio.timeout(timeout_s):
            return await handle.info.remote()
    except Exception as e:  # reported in the body, never raised
        return {"healthy": False, "error": type(e).__name__}


async def replica_counts(
    handles: Mapping[str, DeploymentHandle], timeout_s: float = 5.0
) -> dict[str, int | None]:
    """RUNNING replicas per model from `serve.status()`; None where Serve could not say."""
    from ray import serve

    try:
        async with asyncio.timeout(timeout_s):
            status = await asyncio.to_thread(serve.status)  # a blocking controller call
    except Exception:
        return dict.fromkeys(handles)
    counts: dict[str, int | None] = {}
    for name, handle in handles.items():
        app = status.applications.get(handle.app_name)
        dep = app.deployments.get(handle.deployment_name) if app else None
        counts[name] = dep.replica_states.get("RUNNING", 0) if dep else None
    return counts


def health_report(
    infos: Mapping[str, dict[str, Any]], replicas: Mapping[str, int | None]
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 when every model has a ready replica, else 503 naming the rest.

    A model is ready when a replica answered `info()` healthy and Serve does not report zero
    running replicas (an unknown count does not block readiness).
    """
    models: dict[str, Any] = {}
    for name, info in infos.items():
        n = replicas.get(name)
        ready = bool(info.get("healthy")) and n != 0
        models[name] = {
            **info,
            "ready": ready,
            "replicas": n,
            "running": info.get("running"),
            "waiting": info.get("waiting"),
        }
    not_ready = sorted(n for n, m in models.items() if not m["ready"])
    body: dict[str, Any] = {"status": "unavailable" if not_ready else "ok", "models": models}
    if not_ready:
        body["not_ready"] = not_ready
    return (503 if not_ready else 200), body
