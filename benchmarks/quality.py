"""Quality of AWQ against RTN and FP16, per recipe, on the demo model (nothing is published).

Runs the quantization task graph (`run_jobs(..., publish=False)`) in a scratch registry, so its
step cache is reused on a re-run, and prints one Markdown table: held-out perplexity of FP16 / RTN /
AWQ on evaluation text deduplicated against calibration, AWQ's perplexity rise as a fraction of
RTN's, top-1 agreement and KL against FP16, the served-path check's KL (engine vs transformers;
publishable recipes only) and the AWQ artifact's size. JSON goes to
`benchmarks/results/quality.json`. The two default recipes take about 8 minutes on 2 CPU cores.
Run `python -m benchmarks.quality --help`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from quantization.recipes import QuantRecipe, load_recipe
from quantization.registry import DEFAULT_ROOT, Registry, library_versions
from quantization.steps import DEMO_SOURCE, prepare_key

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_RECIPES = ("w4-g64", "w3-g64")


def seed_prepare_cache(source: str, cache: Path, registry_cache: Path) -> bool:
    """Reuse the registry's prepared FP16 export of `source` (the demo build made one).

    The AWQ step's key is the prepared folder's content hash, so it matches the registry's.
    """
    folder = f"prepare-{prepare_key(source)[0]}"
    found, target = registry_cache / folder, cache / folder
    if target.exists() or not (found / ".done.json").is_file():
        return False
    cache.mkdir(parents=True, exist_ok=True)
    staging = cache / f".tmp-seed-{folder}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(found, staging, copy_function=_link_or_copy)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def quality_row(recipe: QuantRecipe, evaluation: dict[str, Any]) -> dict[str, Any]:
    """The table's figures for one recipe."""
    q = evaluation["qualities"]
    fp, rtn, awq = q["fp16"]["perplexity"], q["rtn"]["perplexity"], q["awq"]["perplexity"]
    rtn_rise, awq_rise = rtn - fp, awq - fp
    return {
        "recipe": recipe.name,
        "fp16_ppl": fp,
        "rtn_ppl": rtn,
        "awq_ppl": awq,
        "awq_rise_over_rtn_rise": awq_rise / rtn_rise if rtn_rise > 0 else None,
        "awq_top1": q["awq"]["top1_agreement"],
        "rtn_top1": q["rtn"]["top1_agreement"],
        "awq_kl": q["awq"]["kl_vs_reference"],
        "rtn_kl": q["rtn"]["kl_vs_reference"],
        "awq_size_bytes": q["awq"]["size_bytes"],
        "served_kl": (evaluation.get("served_check") or {}).get("kl_per_token"),
        "removed_pct": (evaluation.get("held_out") or {}).get("removed_pct"),
        "gate_passed": evaluation["gate"]["passed"],
    }


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| recipe | FP16 ppl | RTN ppl | AWQ ppl | AWQ rise / RTN rise | top-1 AWQ | top-1 RTN "
        "| KL AWQ | KL RTN | served-path KL | eval words removed % | AWQ size MB | gate |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['fp16_ppl']:.3f} | {r['rtn_ppl']:.3f} | {r['awq_ppl']:.3f} | "
            f"{_num(r['awq_rise_over_rtn_rise'], 2)} | {r['awq_top1']:.3f} | {r['rtn_top1']:.3f} "
            f"| {r['awq_kl']:.4f} | {r['rtn_kl']:.4f} | {_sci(r['served_kl'])} | "
            f"{_num(r['removed_pct'], 1)} | {r['awq_size_bytes'] / 1e6:.1f} | "
            f"{'pass' if r['gate_passed'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def run(
    source: str, recipes: list[QuantRecipe], scratch: Path, num_cpus: int | None
) -> dict[str, Any]:
    """Run every recipe on `source` as parallel branches; returns the JSON payload."""
    import ray

    from deployments.engine.served_check import EngineServedCheck
    from quantization.pipeline import JobSpec, ServedCheckPolicy, run_jobs

    specs = [JobSpec(source, f"quality-{r.name}", r) for r in recipes]
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             logging_level=logging.WARNING)  # fmt: skip
    start = time.perf_counter()
    try:
        served = ServedCheckPolicy(EngineServedCheck())  # evaluate-only recipes skip it
        results = run_jobs(specs, Registry(scratch), publish=False, served=served)
    finally:
        ray.shutdown()
    return {
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "wall_s": time.perf_counter() - start,
        "library_versions": library_versions(),
        "rows": [quality_row(r.spec.recipe, r.evaluation) for r in results],
        "jobs": [
            {
                "recipe": r.spec.recipe.model_dump(),
                "evaluation": r.evaluation,
                "timings": r.timings,
                "reused": r.reused,
            }
            for r in results
        ],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description="FP16 vs RTN vs AWQ held-out quality per recipe, through the quantization "
        "task graph without publishing. Prints a Markdown table and writes JSON.",
    )
    p.add_argument("--source", default=DEMO_SOURCE, help="'demo' or a local model folder")
    p.add_argument(
        "--recipes", nargs="+", default=list(DEFAULT_RECIPES), help="recipe names or YAML paths"
    )
    p.add_argument(
        "--scratch",
        type=Path,
        default=RESULTS_DIR / "quality-cache",
        help="scratch registry whose .cache keeps step outputs between runs",
    )
    p.add_argument(
        "--registry",
        type=Path,
        default=DEFAULT_ROOT,
        help="registry whose cached export of --source is reused (hard links), if present",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "quality.json", help="JSON output")
    p.add_argument("--num-cpus", type=int, help="CPUs for the local Ray instance (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    recipes = [load_recipe(name) for name in args.recipes]
    seed_prepare_cache(args.source, args.scratch / ".cache", args.registry / ".cache")
    payload = run(args.source, recipes, args.scratch, args.num_cpus)
    print(markdown_table(payload["rows"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
