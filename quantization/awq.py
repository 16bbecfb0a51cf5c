"""AWQ through AutoAWQ in two steps, as llm-awq does: `search_awq` returns the scales and clips as
tensors; `apply_and_pack` turns them into an artifact. A search is stored with the job, so it can
be inspected, and packed again (GEMM and GEMV) without searching again.

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

from quantization.autoawq_patches import record_search, scale_search_sequences
from quantization.compute import compute_dtype, pick_device
from quantization.quant_math import check_group_size
from quantization.recipes import QuantRecipe


class UnsupportedModelError(ValueError):
    """A model type AutoAWQ has no layer map for."""


@dataclass(frozen=True)
class AwqResult:
    out_dir: Path
    seconds: float
    device: str


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


SEARCH_FILE = "awq_search.pt"


def _load_fp(fp_dir: Path, dtype: torch.dtype):
    from awq import AutoAWQForCausalLM

    return AutoAWQForCausalLM.from_pretrained(
        str(fp_dir), torch_dtype=dtype, device_map=None, safetensors=True
    )


def search_awq(
    fp_dir: Path, out_dir: Path, recipe: QuantRecipe, calib_blocks: torch.Tensor
) -> AwqResult:
    """AWQ step 1 (llm-awq's `run_awq`): search per-channel scales and per-group clips on the
    calibration blocks with AutoAWQ's own search; save them as tensors to `out_dir/awq_search.pt`.

    {"scale": [(prev_op, [linears], scales)], "clip": [(linear, max_val)]}, names from the HF model
    root; nothing is packed here, so one search can be packed as GEMM and GEMV, or inspected.
    """
    from transformers import AutoTokenizer

    check_supported(fp_dir)
    device = pick_device().type
    dtype = compute_dtype(device)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    model = _load_fp(fp_dir, dtype)
    check_group_size(recipe.q_group_size, linear_in_features(model.model), fp_dir.name)
    with scale_search_sequences(recipe.calibration.scale_search_sequences), \
            record_search(model.model) as found:  # fmt: skip
        # export_compatible: search and apply only; packing is `apply_and_pack`.
        model.quantize(**quantize_kwargs(tokenizer, recipe, calib_blocks), export_compatible=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(found, out_dir / SEARCH_FILE)
    return AwqResult(out_dir, time.perf_counter() - start, device)


def quantize_kwargs(tokenizer, recipe: QuantRecipe, calib_blocks: torch.Tensor) -> dict:
    """AutoAWQ `quantize` arguments for `recipe` on the calibration blocks (n_blocks, seq_len)."""
    return {
        "tokenizer": tokenizer,
        "quant_config": recipe.autoawq_config(),
        "calib_data": calib_blocks.tolist(),
        "max_calib_samples": calib_blocks.shape[0],
        "max_calib_seq_len": calib_blocks.shape[1],
        "apply_clip": recipe.apply_clip,
        "duo_scaling": recipe.duo_scaling,
    }


def load_search(path: Path) -> dict[str, list]:
    return torch.load(path, weights_only=True)


@torch.no_grad()
def apply_and_pack(
    fp_dir: Path, search: dict[str, list], recipe: QuantRecipe, out_dir: Path
) -> Path:
    """AWQ step 2 (llm-awq's `apply_awq` + real quantization): apply the searched scales and clips
    to a fresh FP copy, then pack in the recipe's layout (GEMM/GEMV), or, below 4 bits where no
    packing kernel exists, save the AWQ-scaled and clipped FP weights."""
    from awq.models._config import AwqConfig
    from awq.quantize.quantizer import AwqQuantizer
    from awq.quantize.scale import apply_clip, apply_scale
    from transformers import AutoTokenizer

    dtype = compute_dtype(pick_device())
    model = _load_fp(fp_dir, dtype)
    apply_scale(model.model, search["scale"])
    apply_clip(model.model, search["clip"])
    model.quant_config = AwqConfig.from_dict(recipe.autoawq_config())
    if hasattr(model, "modules_to_not_convert"):
        model.quant_config.modules_to_not_convert = model.modules_to_not_convert
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe.servable:
        # AutoAWQ's packer without its calibration set-up (`__init__` runs a calibration forward).
        packer = AwqQuantizer.__new__(AwqQuantizer)
        packer.w_bit, packer.group_size = recipe.w_bit, recipe.q_group_size
        packer.zero_point, packer.version = recipe.zero_point, recipe.version
        packer.modules_to_not_convert = model.quant_config.modules_to_not_convert or []
        packer.modules = model.get_model_layers(model.model)
        packer.pack()
        model.is_quantized = True
        model.model.to(torch.float16)
        model.save_quantized(str(out_dir))
    else:
        model.model.to(torch.float16)
        model.model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(fp_dir).save_pretrained(out_dir)
    # AutoAWQ turns sampling on in the saved generation config; serving samples per request.
    generation = out_dir / "generation_config.json"
    if generation.is_file():
        cfg = json.loads(generation.read_text())
        cfg["do_sample"] = False
        generation.write_text(json.dumps(cfg, indent=2))
    return out_dir
