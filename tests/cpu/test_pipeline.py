"""The quantization job end to end: the Ray task graph with real AutoAWQ on a tiny random Llama."""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import torch
import yaml

from awq_serve_cli import main as cli
from deployments.engine.served_check import EngineServedCheck
from deployments.model_source import ModelUnavailable, resolve_model_dir
from quantization import steps
from quantization.gate import gate
from quantization.pipeline import JobResult, JobSpec, ServedCheckPolicy, run_jobs
from quantization.recipes import CalibrationSpec, EvaluationSpec, GateSpec, QuantRecipe
from quantization.registry import MANIFEST, STAGING, Registry, sha256_file
from tests.serving import disconnect_ray

NAME = "tiny"
# A random model's perplexity is about its vocabulary size: only the top-1 check means anything.
LOOSE_GATE = GateSpec(
    max_ppl_increase_pct=1000.0,
    max_increase_vs_rtn=100.0,
    min_top1_agreement=0,
    max_kl=100.0,
    rtn_noise_pct=100.0,  # RTN's rise on a random model is noise, often negative
)
# The serving engine's own check, as the CLI injects it.
SERVED = ServedCheckPolicy(EngineServedCheck())


def tiny_recipe(**update: object) -> QuantRecipe:
    recipe = QuantRecipe(
        name="tiny",
        q_group_size=64,
        calibration=CalibrationSpec(n_samples=8, seq_len=64),
        evaluation=EvaluationSpec(n_blocks=4, block_len=64),
        gate=LOOSE_GATE,
    )
    return recipe.model_copy(update=update)


@dataclass(frozen=True)
class FirstRun:
    result: JobResult
    seconds: float


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    # address="local": never join another Ray instance running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    disconnect_ray()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return Registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def first_run(ray_local: None, registry: Registry, tiny_llama_dir: Path) -> FirstRun:
    start = time.perf_counter()
    [result] = run_jobs(
        [JobSpec(str(tiny_llama_dir), NAME, tiny_recipe())], registry, served=SERVED
    )
    return FirstRun(result, time.perf_counter() - start)


@pytest.fixture(scope="module")
def hidden_96_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny Llama at hidden size 96, which group size 64 does not divide."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.hidden_size, config.intermediate_size, config.head_dim = 96, 192, 24
    out = tmp_path_factory.mktemp("tiny-hidden-96")
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


def _cli(registry: Registry, *args: str) -> int:
    return cli.main(["--registry", str(registry.root), *args])


def _recipe_file(folder: Path, recipe: QuantRecipe) -> str:
    path = folder / f"{recipe.name}.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump()))
    return str(path)


def _leftovers(registry: Registry) -> list[str]:
    """Half-written step outputs and unpublished staging folders."""
    return [p.name for p in (registry.root / ".cache").glob(".tmp-*")] + [
        p.name for p in (registry.root / STAGING).glob("*")
    ]


def test_job_publishes_version_with_hashes_evaluation_report_and_chart(
    first_run: FirstRun, registry: Registry
) -> None:
    assert first_run.result.evaluation["gate"]["reasons"] == []
    published = first_run.result.published
    assert published == registry.path(NAME, "tiny-1")
    manifest = registry.manifest(NAME, "tiny-1")
    on_disk = {p.name for p in published.iterdir() if p.name != MANIFEST}
    assert set(manifest.files) == on_disk >= {"model.safetensors", "REPORT.md", "report.png"}
    assert all(sha256_file(published / f) == h for f, h in manifest.files.items())
    assert manifest.recipe == tiny_recipe().model_dump()
    assert {"torch", "transformers", "autoawq"} <= set(manifest.library_versions)
    for model in ("fp16", "rtn", "awq"):
        assert math.isfinite(manifest.evaluation[model]["perplexity"])
    assert manifest.evaluation["candidate"] == manifest.evaluation["awq"]
    assert manifest.evaluation["gate"]["passed"] is True
    assert manifest.evaluation["gate"]["reasons"] == []
    assert manifest.evaluation["served_check"]["kl_per_token"] < 1e-3
    assert "| AWQ |" in (published / "REPORT.md").read_text()
    assert (published / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(registry) == []


def test_verify_accepts_the_published_version(
    first_run: FirstRun, registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(registry, "verify", NAME) == 0
    assert f"{NAME}:tiny-1 OK" in capsys.readouterr().out


def test_second_run_reuses_every_cached_step_and_is_faster(
    first_run: FirstRun, registry: Registry, tiny_llama_dir: Path
) -> None:
    start = time.perf_counter()
    [again] = run_jobs([JobSpec(str(tiny_llama_dir), NAME, tiny_recipe())], registry, False)
    seconds = time.perf_counter() - start
    assert again.reused == {"prepare": True, "awq": True, "eval": True}
    assert again.evaluation["qualities"] == first_run.result.evaluation["qualities"]
    assert again.published is None
    assert seconds < first_run.seconds / 3


@pytest.mark.parametrize(
    ("short_calibration", "expected"),
    [(False, "group size 64 does not divide"), (True, "blocks are needed")],
    ids=["group-size-does-not-divide-hidden-size", "calibration-source-too-short"],
)
def test_failed_job_exits_with_its_cause_and_leaves_nothing_behind(
    short_calibration: bool,
    expected: str,
    first_run: FirstRun,
    registry: Registry,
    tiny_llama_dir: Path,
    hidden_96_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, extra = hidden_96_dir, []
    if short_calibration:
        (tmp_path / "short.txt").write_text("Far too little text to calibrate on.")
        model, extra = tiny_llama_dir, ["--calib", str(tmp_path / "short.txt")]
    recipe = _recipe_file(tmp_path, tiny_recipe())
    rc = _cli(registry, "quantize", str(model), "--recipe", recipe, "--name", "broken", *extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert "failed in the awq step" in err and expected in err
    assert not (registry.root / "broken").exists()
    assert _leftovers(registry) == []


def test_interrupt_while_awq_runs_cancels_it_and_leaves_no_trace(
    first_run: FirstRun, registry: Registry, tiny_llama_dir: Path
) -> None:
    cache = registry.root / ".cache"
    before = sorted(p.name for p in cache.iterdir())
    awq_started, finished = threading.Event(), threading.Event()

    def press_ctrl_c_once_awq_writes() -> None:
        # The step's temp folder is the only outside sign that it is running. A real SIGINT (not
        # interrupt_main's flag) wakes the driver out of Ray's blocking wait, as Ctrl-C does;
        # none is sent once run_jobs has returned, so a late one cannot hit pytest itself.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(cache.glob(".tmp-awq-*")):
            time.sleep(0.02)
        if any(cache.glob(".tmp-awq-*")) and not finished.is_set():
            awq_started.set()
            os.kill(os.getpid(), signal.SIGINT)

    presser = threading.Thread(target=press_ctrl_c_once_awq_writes)
    presser.start()
    # Two branches sharing one prepare step, with recipes no earlier test ran: no AWQ step is
    # cached. Both use a group size the CPU int4 kernel can evaluate (32+), so a branch that gets
    # past AWQ before the interrupt lands cannot fail the job first.
    recipes = [tiny_recipe(q_group_size=32), tiny_recipe(q_group_size=32, apply_clip=False)]
    specs = [JobSpec(str(tiny_llama_dir), "interrupted", r) for r in recipes]
    # Python's own Ctrl-C handler, whatever an earlier test (Ray, Serve) left installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_jobs(specs, registry)
    finally:
        finished.set()
        presser.join()
        signal.signal(signal.SIGINT, previous)
    assert awq_started.is_set()
    # A branch that finished before the interrupt landed may stay cached (complete, for resume);
    # nothing partial may: every new cache entry is a whole, marked step.
    new = [p for p in cache.iterdir() if p.name not in before]
    assert all((p / steps.DONE).is_file() for p in new), new
    assert not (registry.root / "interrupted").exists()
    assert _leftovers(registry) == []


def test_temp_folders_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    """What a killed job (`ray job stop`, a force-cancelled task) leaves is swept on this host."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    host = socket.gethostname()
    dead = tmp_path / f".tmp-awq-{host}-{finished.stdout.strip()}-x1y2"
    live = tmp_path / f".tmp-awq-{host}-{os.getpid()}-a1b2"
    elsewhere = tmp_path / f".tmp-eval-other-host-{finished.stdout.strip()}-c3d4"
    for folder in (dead, live, elsewhere):
        folder.mkdir()
    assert steps.remove_dead_temps(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, elsewhere.name])


def test_tampered_weights_fail_verify_naming_the_file_and_serving_refuses_them(
    first_run: FirstRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = Registry(tmp_path / "models")
    shutil.copytree(first_run.result.published, copy.path(NAME, "tiny-1"))
    weights = copy.path(NAME, "tiny-1") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    assert _cli(copy, "verify", NAME) != 0
    assert "modified model.safetensors" in capsys.readouterr().err
    with pytest.raises(ModelUnavailable, match=r"modified model\.safetensors"):
        resolve_model_dir(NAME, copy.root, verify=True)


def test_gate_rejects_awq_artifact_whose_scales_are_tripled(
    first_run: FirstRun, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    strict = tiny_recipe(gate=GateSpec())
    assert gate(strict.gate, first_run.result.evaluation["qualities"], served_required=False).passed
    broken = tmp_path / "broken"
    shutil.copytree(first_run.result.published, broken)
    weights = broken / "model.safetensors"
    tensors = load_file(weights)
    scaled = {k: v * 3 if k.endswith(".scales") else v for k, v in tensors.items()}
    assert scaled.keys() == tensors.keys() and any(k.endswith(".scales") for k in scaled)
    save_file(scaled, weights, metadata={"format": "pt"})

    qualities = steps.evaluate(tiny_llama_dir, broken, strict)["qualities"]
    verdict = gate(strict.gate, qualities, served_required=False)
    assert verdict.passed is False
    assert any("top-1 agreement" in reason for reason in verdict.reasons)


def test_job_failing_its_gate_is_not_published_and_cli_exits_1(
    first_run: FirstRun,
    registry: Registry,
    tiny_llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Same AWQ and evaluation as the first run (both reused); only the gate is impossible.
    impossible = tiny_recipe(gate=LOOSE_GATE.model_copy(update={"min_top1_agreement": 1.0}))
    recipe = _recipe_file(tmp_path, impossible)
    rc = _cli(registry, "quantize", str(tiny_llama_dir), "--recipe", recipe, "--name", "strict")
    out, err = capsys.readouterr()
    assert rc == 1, err[-3000:]
    assert "NOT PUBLISHED: strict failed its quality gate" in err
    assert "(reused cached steps: prepare, awq, eval, served)" in out
    assert "Gate: FAILED\n" in out
    assert "- FAIL: top-1 agreement with FP16 = " in out
    assert not (registry.root / "strict").exists()
    assert _leftovers(registry) == []


def test_w3_job_says_evaluated_not_published_in_cli_and_report_and_publishes_nothing(
    first_run: FirstRun,
    registry: Registry,
    tiny_llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = _recipe_file(tmp_path, tiny_recipe(name="tiny-w3", w_bit=3))
    rc = _cli(registry, "quantize", str(tiny_llama_dir), "--recipe", recipe, "--name", "tiny-w3")
    out = capsys.readouterr().out
    assert rc == 0
    outcome = "evaluated, not published: recipe tiny-w3 is evaluate-only"
    assert f"\ntiny-w3: {outcome}" in out, out
    assert f"Outcome: {outcome}" in out
    assert "Loads in: none." in out
    assert "served-path check = not measured" in out and "evaluate-only recipe" in out
    assert not (registry.root / "tiny-w3").exists()
    assert _leftovers(registry) == []


def test_list_prints_a_row_for_the_published_version_with_its_size(
    first_run: FirstRun, registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(registry, "list") == 0
    awq = first_run.result.evaluation["qualities"]["awq"]
    row = next(line for line in capsys.readouterr().out.splitlines() if "| tiny-1 |" in line)
    assert row.startswith(f"| {NAME} | tiny-1 | awq | tiny | {awq['perplexity']:.3f} |")
    assert f"| {awq['size_bytes'] / 1e6:.1f} |" in row
