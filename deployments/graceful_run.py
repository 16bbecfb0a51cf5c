"""`python -m deployments.graceful_run serve_config.yaml [serve run options]`: `serve run` that
drains on Ctrl-C and SIGTERM instead of cutting every open stream.

Plain `serve run` cannot wait (Ray 2.60, ray/serve/scripts.py `run`): Ctrl-C calls
`serve.shutdown()`, whose first controller step kills the HTTP proxy (`ProxyState.shutdown` in
serve/_private/proxy_state.py), and SIGTERM exits the driver through Ray's handler (`sys.exit`),
whose exit tears the local cluster down. This runs the same `serve run` with `--non-blocking`,
waits for a signal itself, and then stops in order:

1. every model replica stops admitting (503 with Retry-After) and finishes its streams, up to
   DRAIN_TIMEOUT_S: a `draining` user_config, which Serve hands to every replica's `reconfigure`
   and reports applied once all of them returned, i.e. drained;
2. the application is deleted: Serve stops the router's replicas once their responses are out;
3. `serve.shutdown()`, then exit. A second signal skips what is left.
"""

from __future__ import annotations

import copy
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from deployments.app import deployment_name
from deployments.model_server import DRAIN_TIMEOUT_S

APP_IMPORT_PATH = "deployments.app:build_app"
# On top of the drain itself: the controller rebuilds the app (imports, config) before it hands
# the new user_config to the replicas.
REDEPLOY_MARGIN_S = 60.0


def draining_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (a serve config file's data) with every model deployment of our apps told to
    drain; the rest is unchanged, so Serve applies it in place without restarting a replica."""
    out = copy.deepcopy(config)
    for app in out.get("applications", []):
        if app.get("import_path") != APP_IMPORT_PATH:
            continue
        overrides = {d["name"]: d for d in app.get("deployments", [])}
        for model in app.get("args", {}).get("models", []):
            name = deployment_name(model["name"])
            entry = overrides.setdefault(name, {"name": name})
            entry["user_config"] = {**entry.get("user_config", {}), "draining": True}
        app["deployments"] = list(overrides.values())
    return out


def say(message: str) -> None:
    print(f"graceful_run: {message}", file=sys.stderr, flush=True)


def drain_and_shut_down(config: dict[str, Any]) -> None:
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from deployments.serve_controller import deploy_apps

    schema = ServeDeploySchema.model_validate(draining_config(config))
    names = [app.name for app in schema.applications]
    try:
        say(f"draining (up to {DRAIN_TIMEOUT_S:.0f}s): new requests get 503")
        deploy_apps(schema, wait_for=names, timeout_s=DRAIN_TIMEOUT_S + REDEPLOY_MARGIN_S)
        say("model replicas drained; stopping the applications")
        for name in names:
            serve.delete(name)  # waits for the router's replicas to finish their responses
    except KeyboardInterrupt:
        say("second signal: shutting down now")
    except Exception as e:  # a failed drain must not keep the server from stopping
        say(f"drain failed ({type(e).__name__}: {e}); shutting down now")
    finally:
        serve.shutdown()
        say("stopped")


def main(argv: list[str]) -> int:
    if not argv or not Path(argv[0]).is_file():
        say("usage: python -m deployments.graceful_run CONFIG.yaml [serve run options]")
        return 2
    from ray.serve.scripts import cli

    config = yaml.safe_load(Path(argv[0]).read_text())
    # Deploys and returns; the Ray cluster it started (`--address local`) lives with this process.
    cli.main(["run", "--non-blocking", *argv], prog_name="serve", standalone_mode=False)

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C or SIGTERM: stop without waiting
        say(f"got {signal.Signals(signum).name}")
        stop.set()

    # Installed after `serve run`: ray.init replaces the SIGTERM handler with an immediate exit.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    while not stop.wait(1.0):
        pass
    drain_and_shut_down(config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
