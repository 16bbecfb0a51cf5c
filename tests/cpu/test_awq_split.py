"""AWQ in two steps: one search (scales and clips as tensors) packed into several layouts."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from quantization import steps
from quantization.autoawq_patches import scale_search_sequences
from quantization.awq import SEARCH_FILE, load_search, quantize_kwargs
from quantization.recipes import CalibrationSpec, QuantRecipe, load_recipe

RECIPE = QuantRecipe(
    name="t", q_group_size=64, calibration=CalibrationSpec(n_samples=4, seq_len=32)
)
PACKED = ("qweight", "qzeros", "scales")


def test_only_layouts_a_server_we_run_can_load_are_publishable() -> None:
    assert load_recipe("w4-g64").publishable
    assert "vLLM" in load_recipe("w4-g64").loaders
    gemv = load_recipe("w4-g128-gemv")
    assert gemv.servable and not gemv.publishable
    assert "vLLM" not in gemv.loaders
    assert not load_recipe("w3-g64").publishable and load_recipe("w3-g64").loaders == ()


def test_one_search_is_packed_as_gemm_and_gemv_without_searching_again(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    cache, recipe = tmp_path / "cache", RECIPE
    fp_dir, prepared = steps.prepare(str(tiny_llama_dir), cache)
    gemm_dir, gemm = steps.awq(fp_dir, prepared, recipe, cache)
    gemv_dir, gemv = steps.awq(fp_dir, prepared, recipe.model_copy(update={"version": "gemv"}),
                               cache)  # fmt: skip

    assert gemm["reused"] is False
    assert gemv["search_dir"] == gemm["search_dir"] and gemv["seconds"] == gemm["seconds"]
    assert gemv_dir != gemm_dir and gemv["content"] != gemm["content"]
    found = load_search(Path(gemm["search_dir"]) / SEARCH_FILE)
    # Per decoder layer (2): input_layernorm->qkv, post_attention_layernorm->gate/up, up->down
    # scales (v->o is skipped with grouped KV heads); v, o, gate, up, down clips (not q/k).
    assert len(found["scale"]) == 2 * 3 and len(found["clip"]) == 2 * 5
    prev, names, scales = found["scale"][0]
    assert prev == "model.layers.0.input_layernorm"
    assert names[0] == "model.layers.0.self_attn.q_proj" and scales.shape == (128,)
    name, max_val = found["clip"][0]
    assert name.startswith("model.layers.0.") and max_val.shape[1:] == (128 // 64, 1)
    assert all(torch.isfinite(t).all() for *_, t in found["scale"] + found["clip"])

    # Same search, same integers and scales: both layouts dequantize to the very same weights,
    # and every tensor that is not packed (embeddings, norms) is byte for byte the same.
    gemm_t, gemv_t = _tensors(gemm_dir), _tensors(gemv_dir)
    linears = _packed_linears(gemm_t)
    assert len(linears) == 2 * 7 and _packed_linears(gemv_t) == linears
    for name in linears:
        w_gemm = _dequantize(gemm_t, name, "gemm", recipe.q_group_size)
        w_gemv = _dequantize(gemv_t, name, "gemv", recipe.q_group_size)
        assert w_gemm.shape == w_gemv.shape and torch.equal(w_gemm, w_gemv), name
        assert torch.isfinite(w_gemm).all() and w_gemm.abs().max() > 0, name
    plain = {k for k in gemm_t if k.rsplit(".", 1)[-1] not in PACKED}
    assert plain and plain == {k for k in gemv_t if k.rsplit(".", 1)[-1] not in PACKED}
    assert all(torch.equal(gemm_t[k], gemv_t[k]) for k in plain)


def test_search_then_apply_and_pack_equals_autoawqs_one_shot_quantize(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """The split changes nothing: AutoAWQ's one-shot `quantize` (search, apply and pack layer by
    layer) on the same calibration blocks gives bit-identical packed tensors. Each layer's search
    reads the FP outputs of the layer before (AutoAWQ never feeds quantized outputs forward), so
    applying all the searched scales and clips to a fresh FP copy afterwards is the same
    arithmetic."""
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    cache = tmp_path / "cache"
    fp_dir, prepared = steps.prepare(str(tiny_llama_dir), cache)
    split_dir, _ = steps.awq(fp_dir, prepared, RECIPE, cache)

    one_shot = AutoAWQForCausalLM.from_pretrained(str(fp_dir), torch_dtype=torch.float32,
                                                  device_map=None, safetensors=True)  # fmt: skip
    blocks = steps.calibration_blocks(fp_dir, RECIPE)
    with scale_search_sequences(RECIPE.calibration.scale_search_sequences):
        one_shot.quantize(**quantize_kwargs(AutoTokenizer.from_pretrained(fp_dir), RECIPE, blocks))
    expected = {k: v.half() if v.is_floating_point() else v
                for k, v in one_shot.model.state_dict().items()}  # fmt: skip

    split = _tensors(split_dir)
    assert len(_packed_linears(split)) == 2 * 7
    assert set(split) <= set(expected)  # the one-shot model also holds the tied head
    different = [k for k, v in split.items() if not torch.equal(v, expected[k])]
    assert different == []


def _tensors(artifact: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(artifact.glob("*.safetensors")) for k, v in load_file(f).items()}


def _packed_linears(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight"))


def _dequantize(
    tensors: dict[str, torch.Tensor], name: str, layout: str, group: int
) -> torch.Tensor:
    """(out, in) weights of a packed 4-bit Linear. GEMM: (in, out/8) words in AutoAWQ's
    interleaved nibble order, scales (in/group, out). GEMV: (out, in/8) words in plain order,
    zeros and scales (out, groups padded)."""
    from awq.utils.packing_utils import dequantize_gemm

    qweight, qzeros, scales = (tensors[f"{name}.{k}"] for k in PACKED)
    if layout == "gemm":
        return dequantize_gemm(qweight, qzeros, scales, 4, group).t()
    nibbles = torch.arange(0, 32, 4)

    def unpack(words: torch.Tensor) -> torch.Tensor:
        return ((words[:, :, None] >> nibbles) & 15).flatten(1)

    ints = unpack(qweight)
    groups = ints.shape[1] // group
    zeros = unpack(qzeros)[:, :groups].repeat_interleave(group, 1)
    return (ints - zeros) * scales[:, :groups].repeat_interleave(group, 1)
