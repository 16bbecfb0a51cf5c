"""AWQ in two steps: one search (scales and clips as tensors) packed into several layouts."""

from __future__ import annotations

from pathlib import Path

import torch

from quantization import steps
from quantization.awq import SEARCH_FILE, load_search
from quantization.recipes import CalibrationSpec, QuantRecipe, load_recipe


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
    cache = tmp_path / "cache"
    recipe = QuantRecipe(name="t", q_group_size=64,
                         calibration=CalibrationSpec(n_samples=4, seq_len=32))  # fmt: skip
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
