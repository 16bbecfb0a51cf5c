"""The quantization job as a Ray task graph: prepare → AWQ → evaluate → gate → publish.

The only quantization module that imports Ray. Each step is a Ray task asking for its resources
(a whole GPU for AWQ and evaluation when the cluster has GPUs, so jobs land on spare GPUs and never
on one a serving replica holds). Several (model x recipe) branches run in parallel; each step's
output is cached by the hash of its inputs, so a re-run resumes. Publishing happens in the driver,
after the gate, by atomic rename: a failed, rejected or interrupted job leaves nothing in the registry.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from quantization import report, steps
from quantization.recipes import QuantRecipe
from quantization.registry import Manifest, Registry, library_versions

log = logging.getLogger("awq_serve.pipeline")


@dataclass(frozen=True)
class JobSpec:
    source: str  # "demo", a local folder, or a hub id
    name: str  # registry name of the AWQ model
    recipe: QuantRecipe
    publish_fp16: bool = False


@dataclass
class JobResult:
    spec: JobSpec
    published: Path | None
    evaluation: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)
    report_md: str = ""


def _resources() -> dict[str, float]:
    gpus = ray.cluster_resources().get("GPU", 0)
    return (
        {"num_gpus": 1} if gpus >= 1 else {"num_cpus": max(1, int(ray.cluster_resources()["CPU"]))}
    )


def _use_assigned_cpus() -> None:
    """Ray caps a task's OpenMP threads; give torch every CPU this task was granted."""
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


@ray.remote
def _prepare(source: str, cache: str) -> tuple[str, dict]:
    _use_assigned_cpus()
    key = steps.fingerprint(step="prepare", source=source)
    folder, result = steps.cached_step(
        Path(cache), "prepare", key, lambda out: steps.prepare_source(source, out)
    )
    return str(folder), result


@ray.remote
def _awq(fp_dir: str, recipe: dict, cache: str) -> tuple[str, dict]:
    _use_assigned_cpus()
    r = QuantRecipe.model_validate(recipe)
    key = steps.fingerprint(step="awq", fp=Path(fp_dir), recipe=recipe)
    folder, result = steps.cached_step(
        Path(cache), "awq", key, lambda out: steps.run_awq(Path(fp_dir), r, out)
    )
    return str(folder), result


@ray.remote
def _evaluate(fp_dir: str, awq_dir: str, recipe: dict, cache: str) -> dict:
    _use_assigned_cpus()
    r = QuantRecipe.model_validate(recipe)
    key = steps.fingerprint(step="eval", fp=Path(fp_dir), awq=Path(awq_dir), recipe=recipe)

    def run(out: Path) -> dict:
        return steps.evaluate(Path(fp_dir), Path(awq_dir), r)

    return steps.cached_step(Path(cache), "eval", key, run)[1]


def _timed(ref) -> tuple[Any, float]:
    start = time.perf_counter()
    value = ray.get(ref)
    return value, time.perf_counter() - start


def run_jobs(specs: list[JobSpec], registry: Registry, publish: bool = True) -> list[JobResult]:
    """Run every job's graph; branches run in parallel as far as resources allow."""
    cache = str(registry.root / ".cache")
    res = _resources()
    branches = []
    for spec in specs:
        recipe = spec.recipe.model_dump()
        prepared = _prepare.remote(spec.source, cache)
        fp_dir = _first.remote(prepared)
        awq = _awq.options(**res).remote(fp_dir, recipe, cache)
        awq_dir = _first.remote(awq)
        evaluation = _evaluate.options(**res).remote(fp_dir, awq_dir, recipe, cache)
        branches.append((spec, prepared, awq, evaluation))
    results = []
    for spec, prepared, awq, evaluation in branches:
        start = time.perf_counter()
        (fp_dir, prep_info), _ = _timed(prepared)
        t_prep = time.perf_counter() - start
        (awq_dir, awq_info), t_awq = _timed(awq)
        ev, t_eval = _timed(evaluation)
        timings = {"prepare_s": t_prep, "awq_s": awq_info.get("seconds", t_awq), "eval_s": t_eval}
        reused = {"prepare": prep_info["reused"], "awq": awq_info["reused"], "eval": ev["reused"]}
        md = report.markdown(spec.name, spec.recipe, ev, timings)
        published = None
        if publish and ev["gate"]["passed"] and spec.recipe.servable:
            published = _publish(registry, spec, Path(fp_dir), Path(awq_dir), ev, md)
        results.append(JobResult(spec, published, ev, timings, reused, md))
    return results


@ray.remote
def _first(pair: tuple[str, dict]) -> str:
    return pair[0]


def _publish(registry: Registry, spec: JobSpec, fp_dir: Path, awq_dir: Path, ev: dict,
             md: str) -> Path:  # fmt: skip
    """Copy into staging, add the report, and rename into `<name>/<version>/`."""
    versions = library_versions()
    recipe = spec.recipe.model_dump()
    if spec.publish_fp16:
        fp_name = f"{spec.name}-fp16"
        if not registry.versions(fp_name):
            with registry.staging(fp_name) as staged:
                _copy_model(fp_dir, staged)
                registry.publish(staged, Manifest(name=fp_name, version="1", kind="fp16",
                                                  source_model=spec.source,
                                                  library_versions=versions,
                                                  evaluation=ev["qualities"]["fp16"]))  # fmt: skip
    version = f"{spec.recipe.name}-{len(registry.versions(spec.name)) + 1}"
    with registry.staging(spec.name) as staged:
        _copy_model(awq_dir, staged)
        (staged / "REPORT.md").write_text(md)
        report.chart(ev["qualities"], staged / "report.png", f"{spec.name} {spec.recipe.name}")
        manifest = Manifest(
            name=spec.name, version=version, kind="awq", source_model=spec.source,
            recipe=recipe, library_versions=versions,
            evaluation={**ev["qualities"], "candidate": ev["qualities"]["awq"],
                        "gate": ev["gate"], "eval_tokens": ev["eval_tokens"]},
        )  # fmt: skip
        return registry.publish(staged, manifest)


def _copy_model(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_file() and p.name != steps.DONE:
            shutil.copy2(p, dst / p.name)
