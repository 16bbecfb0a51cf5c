"""AWQ through AutoAWQ: search scales and clips on calibration blocks, pack, save.

CPU runs in float32 (float16 matmuls on CPU are many times slower); GPU runs in float16. Either way
the saved non-quantized tensors (embeddings, norms) are float16, the standard AWQ artifact.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantization.autoawq_patches import scale_search_sequences
from quantization.quant_math import check_group_size
from quantization.recipes import QuantRecipe


class UnsupportedModelError(ValueError):
    """A model type AutoAWQ has no layer map for."""


@dataclass(frozen=True)
class AwqResult:
    out_dir: Path
    seconds: float
    device: str


def compute_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def supported_model_types() -> list[str]:
    from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP

    return sorted(AWQ_CAUSAL_LM_MODEL_MAP)


def check_supported(model_dir: Path) -> str:
    """Model type from config.json, or a clear error naming the supported ones."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    model_type = json.loads(config_path.read_text()).get("model_type", "?")
    supported = supported_model_types()
    if model_type not in supported:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported by AutoAWQ; supported: "
            f"{', '.join(supported)}"
        )
    return model_type


def linear_in_features(model: nn.Module) -> dict[str, int]:
    """Input width of every Linear inside the decoder blocks (the ones AWQ quantizes)."""
    return {
        name: m.in_features
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in f".{name}"
    }


def quantize_awq(
    fp_dir: Path, out_dir: Path, recipe: QuantRecipe, calib_blocks: torch.Tensor
) -> AwqResult:
    """Run AWQ on the model in `fp_dir` and save the packed artifact to `out_dir`."""
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    check_supported(fp_dir)
    device = compute_device()
    dtype = torch.float16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    model = AutoAWQForCausalLM.from_pretrained(
        str(fp_dir), torch_dtype=dtype, device_map=None, safetensors=True
    )
    check_group_size(recipe.q_group_size, linear_in_features(model.model), fp_dir.name)
    with scale_search_sequences(recipe.calibration.scale_search_sequences):
        model.quantize(
            tokenizer,
            quant_config=recipe.autoawq_config(),
            calib_data=calib_blocks.tolist(),
            max_calib_samples=calib_blocks.shape[0],
            max_calib_seq_len=calib_blocks.shape[1],
            apply_clip=recipe.apply_clip,
            duo_scaling=recipe.duo_scaling,
            # No packing kernels below 4 bits: keep the AWQ-scaled and clipped FP weights.
            export_compatible=not recipe.servable,
        )
    model.model.to(torch.float16)
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe.servable:
        model.save_quantized(str(out_dir))
    else:
        model.model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # AutoAWQ turns sampling on in the saved generation config; serving samples per request.
    generation = out_dir / "generation_config.json"
    if generation.is_file():
        cfg = json.loads(generation.read_text())
        cfg["do_sample"] = False
        generation.write_text(json.dumps(cfg, indent=2))
    return AwqResult(out_dir, time.perf_counter() - start, device)
