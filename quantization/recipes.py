"""Quantization recipes: typed, validated, loaded from `configs/quant/<name>.yaml`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs" / "quant"

SERVED_BY_AWQ_SERVE = "awq-serve (transformers + gptqmodel kernels)"
# Who loads each AutoAWQ packing. GEMV has AutoAWQ's own CUDA kernel only: vLLM, TGI and
# transformers' AWQ integration load GEMM, so a GEMV artifact is evaluated, never published.
PACKING_LOADERS: dict[str, tuple[str, ...]] = {
    "gemm": (SERVED_BY_AWQ_SERVE, "vLLM", "TGI", "transformers"),
    "gemv": ("AutoAWQ and transformers+gptqmodel GEMV kernels (CUDA)",),
}


class CalibrationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field("pydoc", description="pydoc, a .txt/.jsonl path, or hf:<dataset>[:split]")
    n_samples: int = Field(64, ge=1, description="Calibration blocks.")
    seq_len: int = Field(256, ge=16, description="Tokens per calibration block.")
    scale_search_sequences: int | None = Field(
        None, ge=1, description="Blocks the scale-search loss runs on (None: all); saves CPU time."
    )


class EvaluationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field("pydoc", description="Held-out text; pydoc uses topics never calibrated.")
    n_blocks: int = Field(24, ge=1, description="Evaluation blocks.")
    block_len: int = Field(256, ge=16, description="Tokens per evaluation block.")


class GateSpec(BaseModel):
    """Thresholds a quantized model must meet before it may be published."""

    model_config = ConfigDict(extra="forbid")
    max_ppl_increase_pct: float = Field(
        25.0, gt=0, description="Max AWQ perplexity rise over FP16, in percent."
    )
    max_increase_vs_rtn: float = Field(
        1.0, gt=0, description="Max AWQ rise as a fraction of RTN's rise (0.5 = half of RTN's)."
    )
    min_top1_agreement: float = Field(
        0.7, ge=0, le=1, description="Min share of next tokens where AWQ's top-1 equals FP16's."
    )
    rtn_noise_pct: float = Field(
        0.5,
        ge=0,
        description="Rise (% of FP16 perplexity) allowed on top of the RTN-relative "
        "limit: measurement noise, which is all there is when RTN loses nothing.",
    )
    max_kl: float = Field(
        0.25, gt=0, description="Max mean KL(FP16 || AWQ) of next-token distributions, nats."
    )
    max_served_kl: float = Field(
        1e-3, gt=0, description="Max mean KL between the serving engine and transformers' forward."
    )
    min_served_top1: float = Field(
        0.98, ge=0, le=1, description="Min top-1 agreement of the serving engine with transformers."
    )


class QuantRecipe(BaseModel):
    """What AutoAWQ is asked to do, on which data, and what the result must meet."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Recipe name, also the registry version prefix.")
    w_bit: Literal[3, 4] = Field(4, description="Weight bits (serving kernels are 4-bit only).")
    q_group_size: int = Field(128, description="Weights per quantization group.")
    zero_point: bool = Field(True, description="Asymmetric quantization with a zero point.")
    version: Literal["gemm", "gemv"] = Field("gemm", description="AutoAWQ packing layout.")
    apply_clip: bool = Field(True, description="Search per-group weight clipping (AWQ step 2).")
    duo_scaling: bool = Field(True, description="Scale by activations and weights.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    gate: GateSpec = Field(default_factory=GateSpec)

    @field_validator("q_group_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v not in (16, 32, 64, 128, 256):
            raise ValueError(f"q_group_size must be one of 16, 32, 64, 128, 256, not {v}")
        return v

    @property
    def servable(self) -> bool:
        """Packed (4-bit) artifacts; 3-bit ones stay AWQ-scaled FP weights (no kernels)."""
        return self.w_bit == 4

    @property
    def loaders(self) -> tuple[str, ...]:
        """Servers that can load this recipe's artifact."""
        return PACKING_LOADERS[self.version] if self.servable else ()

    @property
    def publishable(self) -> bool:
        """Published only when a server we run can load it; others are evaluated only."""
        return SERVED_BY_AWQ_SERVE in self.loaders

    def awq_inputs(self, packing: bool = True) -> dict:
        """What the AWQ step's output depends on (its cache key): not the name, eval or gate;
        the search (`packing=False`) does not depend on the packing layout either."""
        exclude = {"name", "evaluation", "gate"} | (set() if packing else {"version"})
        return self.model_dump(exclude=exclude)

    def eval_inputs(self) -> dict:
        """What the evaluation's figures depend on; the gate is applied to them uncached."""
        return self.model_dump(exclude={"name", "gate"})

    def autoawq_config(self) -> dict:
        return {
            "w_bit": self.w_bit,
            "q_group_size": self.q_group_size,
            "zero_point": self.zero_point,
            "version": self.version.upper(),
        }


def available_recipes(directory: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_recipe(name_or_path: str, directory: Path = RECIPES_DIR) -> QuantRecipe:
    """Load a recipe by name (`w4-g64`) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(available_recipes(directory))
        raise FileNotFoundError(f"no recipe '{name_or_path}'; known recipes: {known}")
    return QuantRecipe.model_validate(yaml.safe_load(path.read_text()))
