"""The served-path check on the demo model: engine agrees with transformers; a runner bug fails."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from deployments.engine.model_runner import ModelRunner, StepLayout
from deployments.engine.served_check import EngineServedCheck
from quantization import steps
from quantization.gate import gate
from quantization.recipes import load_recipe
from quantization.served import DEFAULT_CHAT_PROBES, ServedCheckResult, ServedPathCheck

RECIPE = load_recipe("w4-g64")
# The demo model's published figures (README): only the served-path lines are under test here.
DEMO_QUALITIES = {
    "fp16": {"perplexity": 15.331, "kl_vs_reference": 0.0, "top1_agreement": 1.0},
    "rtn": {"perplexity": 20.260, "kl_vs_reference": 0.3255, "top1_agreement": 0.721},
    "awq": {"perplexity": 17.268, "kl_vs_reference": 0.1247, "top1_agreement": 0.817},
}


class WrongRopeInPrefill(ModelRunner):
    """A runner bug: packed prefill rotates each token by its column in the packed row, not by
    its position in its own sequence. Prefill logits hide it (RoPE scores depend on relative
    positions only); the cached keys are wrong for every later decode step."""

    def _forward(self, ids: torch.Tensor, at: StepLayout) -> torch.Tensor:
        if at.tile_rows == 1:  # a decode step: only prefill has the bug
            return super()._forward(ids, at)
        rotary = self.model.model.rotary_emb
        original = rotary.forward
        rotary.forward = lambda x, pos: original(x, torch.arange(pos.shape[1]).unsqueeze(0))
        try:
            return super()._forward(ids, at)
        finally:
            del rotary.forward


class WrongInt4Weights(ModelRunner):
    """A repacking bug: some nibbles of every gate/up projection flipped in the weights the
    runner multiplies by (the native kernel's repack, or ATen's where that kernel runs). The
    model's own modules read the same weights, so only a reference loaded on its own sees it."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        for p in self.gate_up:
            weights = p.native[0] if p.native else p.qweight
            weights.view(torch.uint8)[::64] ^= 0x11


def _run(check: EngineServedCheck, fp_dir: Path, awq_dir: Path) -> ServedCheckResult:
    data = steps.served_path_check(fp_dir, awq_dir, RECIPE, check)
    return ServedCheckResult.from_dict(data)


@pytest.fixture(scope="module")
def served(demo_fp16_dir: Path, demo_awq_dir: Path) -> ServedCheckResult:
    return _run(EngineServedCheck(), demo_fp16_dir, demo_awq_dir)


def test_engine_check_is_a_served_path_check() -> None:
    assert isinstance(EngineServedCheck(), ServedPathCheck)
    assert EngineServedCheck().key != EngineServedCheck(runner_factory=WrongRopeInPrefill).key


def test_engine_matches_transformers_on_every_path_and_keeps_paris(
    served: ServedCheckResult,
) -> None:
    assert served.kl_per_token < 1e-3
    assert served.top1_agreement >= 0.98
    assert set(served.kl_by_path) == {"packed_prefill", "decode", "prefix_hit", "chunked_prefill"}
    assert all(kl < 1e-3 for kl in served.kl_by_path.values())
    assert len(served.chat) == len(DEFAULT_CHAT_PROBES)
    assert all(a.reference_has_fact and a.served_has_fact for a in served.chat), served.chat
    assert gate(RECIPE.gate, DEMO_QUALITIES, served).passed


@pytest.mark.parametrize(
    ("bug", "path", "factor"),
    [(WrongRopeInPrefill, "decode", 100), (WrongInt4Weights, "packed_prefill", 10)],
)
def test_a_runner_bug_is_blocked_by_the_gate(
    served: ServedCheckResult,
    demo_fp16_dir: Path,
    demo_awq_dir: Path,
    bug: type[ModelRunner],
    path: str,
    factor: float,
) -> None:
    buggy = _run(EngineServedCheck(runner_factory=bug), demo_fp16_dir, demo_awq_dir)
    assert buggy.kl_by_path[path] > factor * served.kl_by_path[path]
    verdict = gate(RECIPE.gate, DEMO_QUALITIES, buggy)
    assert not verdict.passed
    assert any("served path KL vs transformers" in r for r in verdict.reasons)


def test_quantization_package_never_imports_deployments() -> None:
    package = Path(steps.__file__).parent
    offenders = []
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "deployments"]
    assert offenders == []
