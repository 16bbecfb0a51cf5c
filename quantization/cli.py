"""`awq-serve`: quantize, evaluate, publish and inspect models; manage API keys.

Thin: parses arguments, calls the pipeline or the registry, prints, and maps failures to a
one-paragraph message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from quantization.registry import DEFAULT_ROOT, Registry, RegistryError, manifest_table

DEMO_RECIPE = "w4-g64"


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(Path(args.registry))


def _run(specs: list, registry: Registry, publish: bool = True) -> int:
    import ray

    from quantization.pipeline import run_jobs

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
             logging_level=logging.WARNING)  # fmt: skip
    try:
        results = run_jobs(specs, registry, publish=publish)
    finally:
        ray.shutdown()
    failed = False
    for r in results:
        print(r.report_md, "\n")
        reused = [k for k, v in r.reused.items() if v]
        if reused:
            print(f"(reused cached steps: {', '.join(reused)})")
        if not r.evaluation["gate"]["passed"]:
            failed = True
            print(f"NOT PUBLISHED: {r.spec.name} failed its quality gate.", file=sys.stderr)
        elif r.published:
            print(f"published {r.published}")
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
    return _run([spec], registry)


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
    return _run(specs, _registry(args), publish=not args.no_publish)


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
    from deployments.auth import create_key, list_keys, revoke_key

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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="awq-serve", description=__doc__)
    p.add_argument("--registry", default=str(DEFAULT_ROOT), help="model registry root")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build the embedded demo model (offline)")
    demo.add_argument("--recipe", default=DEMO_RECIPE)
    demo.add_argument("--force", action="store_true", help="rebuild even if present")
    demo.set_defaults(func=cmd_demo)

    q = sub.add_parser("quantize", help="quantize, evaluate, gate and publish a model")
    q.add_argument("model", help="local model folder or Hugging Face id (needs a network)")
    q.add_argument("--recipe", action="append", default=None, help="recipe name(s) or YAML")
    q.add_argument("--calib", help="calibration source: pydoc, file.txt/.jsonl, hf:<dataset>")
    q.add_argument("--name", help="registry name (default: the folder name)")
    q.add_argument("--no-publish", action="store_true", help="evaluate and report only")
    q.add_argument("--publish-fp16", action="store_true", help="also store the FP16 source")
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
