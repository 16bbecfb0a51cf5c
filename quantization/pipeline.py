"""The quantization job as a Ray task graph: prepare → AWQ → evaluate → gate → publish.

The only quantization module that imports Ray. Each step is a Ray task asking for its resources
(a whole GPU for AWQ and evaluation when the cluster has GPUs, so jobs land on spare GPUs and never
on one a serving replica holds). Several (model x recipe) branches run in parallel; each step's
output is cached by the hash of its inputs, so a re-run resumes. Publishing happens in the driver,
after the gate, by atomic rename: a failed, rejected or interrupted job leaves nothing in the
registry.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import ray

from quantization import report, steps
from quantization.cache_keys import project_version
from quantization.gate import gate
from quantization.recipes import QuantRecipe
from quantization.registry import Manifest, Registry, library_versions
from quantization.served import ServedCheckResult, ServedPathCheck

T = TypeVar("T")

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
    outcome: str = ""  # one line: published, evaluated only, or why not published


@dataclass(frozen=True)
class ServedCheckPolicy:
    """How the served-path check is done: injected by the caller, or explicitly waived.

    Without a check the gate fails closed for publishable recipes; `waived` (tests, tools that
    never serve) makes the report say the check was skipped instead.
    """

    check: ServedPathCheck | None = None
    waived: bool = False


def _resources(gpus: float | None = None, cpus: float | None = None) -> dict[str, float]:
    """What each AWQ and evaluation task asks Ray for; every request fits one node.

    gpus None: 1 when the cluster has a GPU or can add one (a GPU node type), so on an
    autoscaling cluster the pending task makes the autoscaler launch a GPU node. gpus 0: a CPU
    task with `cpus` CPUs, by default the most CPUs free on one node (never the cluster total).
    """
    from cluster.resources import cluster_has_gpus, cpus_fitting_one_node

    if gpus is None:
        gpus = 1 if cluster_has_gpus() else 0
    if gpus > 0:
        return {"num_gpus": gpus, **({"num_cpus": cpus} if cpus is not None else {})}
    return {"num_cpus": cpus if cpus is not None else cpus_fitting_one_node()}


def _worker_ends_if_interrupted(step: Callable[..., T]) -> Callable[..., T]:
    """Cancellation raises KeyboardInterrupt in the task, possibly inside an import: torch
    registers its ops at import time and cannot import again ("duplicate registrations for
    aten.linspace..." in the next task of the same worker). The step's own `finally` has removed
    its temp by the time the interrupt reaches here, so the worker exits instead of being reused.
    """

    @functools.wraps(step)
    def run(*args: Any, **kwargs: Any) -> T:
        try:
            return step(*args, **kwargs)
        except KeyboardInterrupt:
            os._exit(1)

    return run


def _use_assigned_cpus() -> None:
    """Ray caps a task's OpenMP threads; give torch every CPU this task was granted."""
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))


@ray.remote
@_worker_ends_if_interrupted
def _prepare(source: str, cache: str) -> tuple[str, dict]:
    _use_assigned_cpus()
    folder, result = steps.prepare(source, Path(cache))
    return str(folder), result


# Steps take the previous steps' (folder, result) pairs; Ray passes them in once they are done.
@ray.remote
@_worker_ends_if_interrupted
def _awq(prepared: tuple[str, dict], recipe: dict, cache: str) -> tuple[str, dict]:
    _use_assigned_cpus()
    r = QuantRecipe.model_validate(recipe)
    folder, result = steps.awq(Path(prepared[0]), prepared[1], r, Path(cache))
    return str(folder), result


@ray.remote
@_worker_ends_if_interrupted
def _evaluate(prepared: tuple[str, dict], awq: tuple[str, dict], recipe: dict, cache: str) -> dict:
    _use_assigned_cpus()
    r = QuantRecipe.model_validate(recipe)
    return steps.evaluate_cached(Path(prepared[0]), prepared[1], Path(awq[0]), awq[1], r,
                                 Path(cache))  # fmt: skip


@ray.remote
@_worker_ends_if_interrupted
def _served(prepared: tuple[str, dict], awq: tuple[str, dict], recipe: dict, check: Any,
            cache: str) -> dict:  # fmt: skip
    _use_assigned_cpus()
    r = QuantRecipe.model_validate(recipe)
    return steps.served_cached(Path(prepared[0]), prepared[1], Path(awq[0]), awq[1], r, check,
                               Path(cache))  # fmt: skip


def _timed(ref: ray.ObjectRef, spec: JobSpec, step: str) -> tuple[Any, float]:
    """Wait for one step; its failure becomes a `PipelineError` naming the job, step and cause."""
    start = time.perf_counter()
    try:
        value = ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None) or e
        raise steps.PipelineError(
            f"job '{spec.name}' (recipe {spec.recipe.name}, source {spec.source}) failed in the "
            f"{step} step: {type(cause).__name__}: {cause}. Nothing was published."
        ) from None
    return value, time.perf_counter() - start


@dataclass(frozen=True)
class _Branch:
    spec: JobSpec
    prepared: ray.ObjectRef
    awq: ray.ObjectRef
    evaluation: ray.ObjectRef
    served: ray.ObjectRef | None  # None: no check given, or nothing of this recipe is served

    def refs(self) -> list[ray.ObjectRef]:
        return [r for r in (self.prepared, self.awq, self.evaluation, self.served) if r]


def _submit(
    specs: list[JobSpec],
    cache: str,
    served: ServedCheckPolicy,
    gpus: float | None = None,
    cpus: float | None = None,
) -> list[_Branch]:
    """Bind every job's tasks; jobs on the same source share one prepare task."""
    res = _resources(gpus, cpus)
    prepared: dict[str, ray.ObjectRef] = {}
    branches = []
    for spec in specs:
        recipe = spec.recipe.model_dump()
        if spec.source not in prepared:
            prepared[spec.source] = _prepare.remote(spec.source, cache)
        awq = _awq.options(**res).remote(prepared[spec.source], recipe, cache)
        evaluation = _evaluate.options(**res).remote(prepared[spec.source], awq, recipe, cache)
        check = None
        if served.check is not None and spec.recipe.publishable:
            check = _served.options(**res).remote(
                prepared[spec.source], awq, recipe, served.check, cache
            )
        branches.append(_Branch(spec, prepared[spec.source], awq, evaluation, check))
    return branches


def _cancel(branches: list[_Branch], cache: Path, grace_s: float = 10.0) -> None:
    """Cancel every task and wait for them to end, so each step's `finally` removes its temp.

    Some libraries swallow KeyboardInterrupt (bare `except` around optional imports), so a task
    still running after `grace_s` is killed, and the temp folder it leaves is removed here.
    """
    refs = list(dict.fromkeys(r for b in branches for r in b.refs()))
    # Only what has not finished: cancelling a task whose result is arriving trips a check in
    # Ray's task manager ("Tried to complete task that was not pending") that ends the driver.
    _, unfinished = ray.wait(refs, num_returns=len(refs), timeout=0)
    for ref in unfinished:
        ray.cancel(ref)
    _, running = ray.wait(unfinished, num_returns=len(unfinished), timeout=grace_s)
    for ref in running:
        ray.cancel(ref, force=True)
    if running:
        ray.wait(running, num_returns=len(running), timeout=grace_s)
    for ref in refs:  # fetch each outcome, else Ray logs the errors again as unhandled
        try:
            ray.get(ref, timeout=0)
        except Exception:
            continue
    steps.remove_dead_temps(cache)


def run_jobs(
    specs: list[JobSpec],
    registry: Registry,
    publish: bool = True,
    gpus: float | None = None,
    cpus: float | None = None,
    served: ServedCheckPolicy | None = None,
) -> list[JobResult]:
    """Run every job's graph; branches run in parallel as far as resources allow.

    `gpus`/`cpus`: what each AWQ and evaluation task asks for (see `_resources`). `served`
    carries the served-path check (the CLI injects the serving engine's); without one,
    publishable recipes fail their gate unless the policy waives the check.
    A failed step raises `PipelineError`; a failure or an interrupt (Ctrl-C, `ray job stop`)
    cancels the remaining tasks first, so no step output is left half-written.
    """
    cache = registry.root / ".cache"
    served = served or ServedCheckPolicy()
    branches = _submit(specs, str(cache), served, gpus, cpus)
    results = []
    try:
        for branch in branches:
            results.append(_finish(branch, registry, publish, served))
    except BaseException:
        _cancel(branches, cache)
        raise
    return results


def _served_outcome(
    branch: _Branch, policy: ServedCheckPolicy
) -> tuple[ServedCheckResult | None, bool, str, float, bool | None]:
    """(result, required, why it did not run, seconds, reused) of a branch's served check."""
    recipe = branch.spec.recipe
    if not recipe.publishable:
        return None, False, "evaluate-only recipe: nothing of it is served", 0.0, None
    if branch.served is None:
        why = "waived by the caller" if policy.waived else "no served-path check was given"
        return None, not policy.waived, why, 0.0, None
    data, seconds = _timed(branch.served, branch.spec, "served-path check")
    reused = data.pop("reused")
    return ServedCheckResult.from_dict(data), True, "", seconds, reused


PUBLISHING = "passed: published to the registry under the next free version of this recipe"


def _outcome(recipe: QuantRecipe, passed: bool, publish: bool) -> str:
    if not recipe.publishable:
        loaders = ", ".join(recipe.loaders) or "none (no packing kernels below 4 bits)"
        return (
            f"evaluated, not published: recipe {recipe.name} is evaluate-only (loads in: {loaders})"
        )
    if not passed:
        return "NOT PUBLISHED: failed its quality gate"
    if not publish:
        return "evaluated, not published (publishing was turned off)"
    return PUBLISHING


def _finish(
    branch: _Branch, registry: Registry, publish: bool, policy: ServedCheckPolicy
) -> JobResult:
    """Wait for one branch, gate it, and publish it when it passes."""
    spec = branch.spec
    (fp_dir, prep_info), t_prep = _timed(branch.prepared, spec, "prepare")
    (awq_dir, awq_info), t_awq = _timed(branch.awq, spec, "awq")
    ev, t_eval = _timed(branch.evaluation, spec, "evaluate")
    served, required, why, t_served, served_reused = _served_outcome(branch, policy)
    # The gate is not part of any cache key: apply this recipe's thresholds now.
    verdict = gate(spec.recipe.gate, ev["qualities"], served, required, why)
    ev["gate"] = verdict.to_dict()
    ev["served_check"] = None if served is None else served.to_dict()
    timings = {"prepare_s": t_prep, "awq_s": awq_info.get("seconds", t_awq), "eval_s": t_eval,
               "served_check_s": t_served}  # fmt: skip
    reused = {"prepare": prep_info["reused"], "awq": awq_info["reused"], "eval": ev["reused"]}
    if served_reused is not None:
        reused["served"] = served_reused
    outcome = _outcome(spec.recipe, verdict.passed, publish)
    md = report.markdown(spec.name, spec.recipe, ev, timings, outcome)
    published = None
    if outcome == PUBLISHING:
        published = _publish(registry, spec, Path(fp_dir), prep_info, Path(awq_dir), ev, md)
        outcome = f"published {published}"
    return JobResult(spec, published, ev, timings, reused, md, outcome)


def _publish(registry: Registry, spec: JobSpec, fp_dir: Path, prepared: dict, awq_dir: Path,
             ev: dict, md: str) -> Path:  # fmt: skip
    """Copy into staging, add the report, and rename into a newly allocated version."""
    provenance = {
        "source_model": spec.source,
        "source_revision": prepared.get("source_revision"),
        "library_versions": library_versions(),
        "project_version": project_version(),
    }
    if spec.publish_fp16:
        fp_name = f"{spec.name}-fp16"
        if not registry.versions(fp_name):
            with registry.staging(fp_name) as staged:
                _copy_model(fp_dir, staged)
                registry.publish_next(staged, Manifest(name=fp_name, version="-", kind="fp16",
                                                       evaluation=ev["qualities"]["fp16"],
                                                       **provenance), prefix="")  # fmt: skip
    with registry.staging(spec.name) as staged:
        _copy_model(awq_dir, staged)
        (staged / "REPORT.md").write_text(md)
        report.chart(ev["qualities"], staged / "report.png", f"{spec.name} {spec.recipe.name}")
        manifest = Manifest(
            name=spec.name, version="-", kind="awq", recipe=spec.recipe.model_dump(),
            evaluation={**ev["qualities"], "candidate": ev["qualities"]["awq"],
                        "gate": ev["gate"], "served_check": ev["served_check"],
                        "held_out": ev.get("held_out"), "eval_tokens": ev["eval_tokens"]},
            **provenance,
        )  # fmt: skip
        return registry.publish_next(staged, manifest, prefix=spec.recipe.name)


def _copy_model(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_file() and p.name != steps.DONE:
            shutil.copy2(p, dst / p.name)
