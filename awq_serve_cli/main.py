"""`awq-serve`: quantize, evaluate, publish and inspect models; manage API keys.

Thin: parses arguments, calls the pipeline or the registry, prints, and maps failures to a
one-paragraph message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantization.registry import DEFAULT_ROOT, Registry, RegistryError, manifest_table

DEMO_RECIPE = "w4-g64"


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(Path(args.registry))


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _ray_session() -> Iterator[None]:
    """Join Ray (RAY_ADDRESS, or a local instance) unless the caller already did; leave it after.

    `ray job stop` sends SIGTERM: turn it into KeyboardInterrupt so the job cancels its tasks
    and cleans up like on Ctrl-C.
    """
    import ray

    owned = not ray.is_initialized()
    if owned:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 logging_level=logging.WARNING)  # fmt: skip
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
    try:
        yield
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        if owned:
            ray.shutdown()


def _served_check_policy():
    """The serving engine's own check, imported here only: `quantization` never imports the
    server; the CLI wires the two together."""
    from deployments.engine.served_check import EngineServedCheck
    from quantization.pipeline import ServedCheckPolicy

    return ServedCheckPolicy(EngineServedCheck())


def _run(
    specs: list,
    registry: Registry,
    publish: bool = True,
    gpus: float | None = None,
    cpus: float | None = None,
) -> int:
    from quantization.pipeline import run_jobs

    try:
        with _ray_session():
            results = run_jobs(
                specs,
                registry,
                publish=publish,
                gpus=gpus,
                cpus=cpus,
                served=_served_check_policy(),
            )
    except KeyboardInterrupt:
        print("interrupted: tasks cancelled, nothing published", file=sys.stderr)
        return 130
    failed = False
    for r in results:
        print(r.report_md, "\n")
        reused = [k for k, v in r.reused.items() if v]
        if reused:
            print(f"(reused cached steps: {', '.join(reused)})")
        if not r.evaluation["gate"]["passed"]:
            failed = True
            print(f"NOT PUBLISHED: {r.spec.name} failed its quality gate.", file=sys.stderr)
        else:
            print(f"{r.spec.name}: {r.outcome}")
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from quantization.demo_model import DEMO_NAME
    from quantization.pipeline import JobSpec
    from quantization.recipes import load_recipe
    from quantization.steps import DEMO_SOURCE

    registry = _registry(args)
    if registry.versions(DEMO_NAME) and not args.force:
        print(f"demo model present: {registry.path(*registry.resolve(DEMO_NAME))}")
        return 0
    spec = JobSpec(DEMO_SOURCE, DEMO_NAME, load_recipe(args.recipe), publish_fp16=True)
    return _run([spec], registry, gpus=args.gpus, cpus=args.cpus)


def cmd_quantize(args: argparse.Namespace) -> int:
    from quantization.pipeline import JobSpec
    from quantization.recipes import load_recipe

    specs = []
    for recipe_name in args.recipe:
        recipe = load_recipe(recipe_name)
        if args.calib:
            recipe = recipe.model_copy(
                update={"calibration": recipe.calibration.model_copy(update={"source": args.calib})}
            )
        name = args.name or Path(args.model.rstrip("/")).name.lower()
        specs.append(JobSpec(args.model, name, recipe, publish_fp16=args.publish_fp16))
    return _run(specs, _registry(args), not args.no_publish, args.gpus, args.cpus)


def cmd_list(args: argparse.Namespace) -> int:
    entries = _registry(args).entries()
    print(manifest_table(entries) if entries else f"registry {args.registry} is empty")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    registry = _registry(args)
    name, version = registry.resolve(args.model)
    registry.verify(name, version)
    print(f"{name}:{version} OK ({len(registry.manifest(name, version).files)} files verified)")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from deployments.gateway.auth import create_key, list_keys, revoke_key

    path = Path(args.keys_file)
    if args.keys_cmd == "create":
        secret = create_key(path, args.key_id, args.models or None, args.rpm, args.tpm)
        print(f"created key '{args.key_id}'. Secret (shown once): {secret}")
    elif args.keys_cmd == "list":
        for rec in list_keys(path):
            print(json.dumps(rec.model_dump(exclude={"key_hash"}), default=str))
    else:
        revoke_key(path, args.key_id)
        print(f"revoked '{args.key_id}'")
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from deployments.ops.rollout import cli_rollout

    return cli_rollout(args.app, args.alias, args.variant, args.steps, args.interval, args.url)


def cmd_rollback(args: argparse.Namespace) -> int:
    from deployments.ops.rollout import cli_rollback

    return cli_rollback(args.app, args.alias, args.to)


def cmd_cost(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from deployments.ops.cost import (
        Throughput,
        cost_rows,
        cost_table,
        load_prices,
        throughput_from_benchmark,
    )

    if args.from_json:
        throughput = throughput_from_benchmark(Path(args.from_json))
    else:
        throughput = Throughput(args.tokens_per_second, None, "--tokens-per-second")
    if args.tokens_per_request is not None:
        throughput = replace(throughput, tokens_per_request=args.tokens_per_request)
    prices = load_prices(Path(args.prices)) if args.prices else load_prices()
    print(cost_table(cost_rows(prices, throughput), throughput))
    return 0


def _percents(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def _add_resource_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpus",
        type=float,
        help="GPUs per AWQ/eval task; 0: on CPU (default: 1 "
        "if the cluster has a GPU or a GPU node type the autoscaler can add)",
    )
    p.add_argument(
        "--cpus",
        type=float,
        help="CPUs per task (default with --gpus 0: the most "
        "CPUs free on one node, never the cluster total)",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="awq-serve", description=__doc__)
    p.add_argument("--registry", default=str(DEFAULT_ROOT), help="model registry root")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build the embedded demo model (offline)")
    demo.add_argument("--recipe", default=DEMO_RECIPE)
    demo.add_argument("--force", action="store_true", help="rebuild even if present")
    _add_resource_options(demo)
    demo.set_defaults(func=cmd_demo)

    q = sub.add_parser("quantize", help="quantize, evaluate, gate and publish a model")
    q.add_argument("model", help="local model folder or Hugging Face id (needs a network)")
    q.add_argument("--recipe", action="append", default=None, help="recipe name(s) or YAML")
    q.add_argument("--calib", help="calibration source: pydoc, file.txt/.jsonl, hf:<dataset>")
    q.add_argument("--name", help="registry name (default: the folder name)")
    q.add_argument("--no-publish", action="store_true", help="evaluate and report only")
    q.add_argument("--publish-fp16", action="store_true", help="also store the FP16 source")
    _add_resource_options(q)
    q.set_defaults(func=cmd_quantize)

    ls = sub.add_parser("list", help="registry contents")
    ls.set_defaults(func=cmd_list)

    v = sub.add_parser("verify", help="check a model's files against its manifest")
    v.add_argument("model", help="name[:version]")
    v.set_defaults(func=cmd_verify)

    k = sub.add_parser("keys", help="API keys for the router")
    k.add_argument("--keys-file", default="configs/keys.json")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create")
    kc.add_argument("key_id")
    kc.add_argument("--models", nargs="*")
    kc.add_argument("--rpm", type=int)
    kc.add_argument("--tpm", type=int)
    ksub.add_parser("list")
    kr = ksub.add_parser("revoke")
    kr.add_argument("key_id")
    k.set_defaults(func=cmd_keys)

    ro = sub.add_parser("rollout", help="move an alias' traffic to a canary step by step")
    ro.add_argument("alias")
    ro.add_argument("--variant", required=True, help="the canary: a served model name")
    ro.add_argument("--steps", type=_percents, default=[10, 25, 50, 100], help="e.g. 10,25,50,100")
    ro.add_argument("--interval", type=float, default=60.0, help="seconds watched per step")
    ro.add_argument("--url", help="router base URL for /metrics (default: Serve's http_options)")
    ro.add_argument("--app", default="awq-serve", help="Serve application name")
    ro.set_defaults(func=cmd_rollout)

    rb = sub.add_parser("rollback", help="send all of an alias' traffic to its stable variant")
    rb.add_argument("alias")
    rb.add_argument("--to", help="variant to send traffic to (default: the configured heaviest)")
    rb.add_argument("--app", default="awq-serve", help="Serve application name")
    rb.set_defaults(func=cmd_rollback)

    c = sub.add_parser("cost", help="$ per 1M output tokens and per request on each GPU type")
    measured = c.add_mutually_exclusive_group(required=True)
    measured.add_argument("--tokens-per-second", type=float, help="measured output tok/s")
    measured.add_argument("--from", dest="from_json", help="benchmarks/load.py result JSON")
    c.add_argument(
        "--tokens-per-request", type=float, help="output tokens per request (default: from --from)"
    )
    c.add_argument("--prices", help="GPU types and $/hour (default: configs/cost.yaml)")
    c.set_defaults(func=cmd_cost)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "recipe", None) is None and args.command == "quantize":
        args.recipe = ["w4-g128"]
    try:
        return args.func(args)
    except (RegistryError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"awq-serve {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
