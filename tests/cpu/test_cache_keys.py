"""Step caches are keyed by content: an updated source is prepared again, not silently reused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from quantization import steps
from quantization.cache_keys import code_digest, step_key


def test_changed_source_folder_reruns_prepare_even_with_same_names_sizes_and_mtimes(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    source, cache = tmp_path / "model", tmp_path / "cache"
    shutil.copytree(tiny_llama_dir, source)
    first, result = steps.prepare(str(source), cache)
    assert result["reused"] is False
    assert steps.prepare(str(source), cache)[1]["reused"] is True

    # New weights of the same shapes (same file size), with the old file's mtime put back.
    weights = source / "model.safetensors"
    stat = weights.stat()
    torch.manual_seed(123)
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig.from_pretrained(source)).to(torch.float16).save_pretrained(other)
    shutil.copyfile(other / "model.safetensors", weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size

    second, again = steps.prepare(str(source), cache)
    assert again["reused"] is False
    assert second != first
    assert again["source_revision"] != result["source_revision"]
    embed = "model.embed_tokens.weight"
    new, old = load_file(second / "model.safetensors"), load_file(first / "model.safetensors")
    assert not torch.equal(new[embed], old[embed])


def test_step_key_changes_with_code_and_inputs() -> None:
    base = step_key("awq", ("quantization.awq",), recipe={"w_bit": 4})
    assert base == step_key("awq", ("quantization.awq",), recipe={"w_bit": 4})
    assert base != step_key("awq", ("quantization.awq",), recipe={"w_bit": 3})
    assert base != step_key(
        "awq", ("quantization.awq", "quantization.quant_math"), recipe={"w_bit": 4}
    )
    assert code_digest("quantization.awq") != code_digest("quantization.quant_math")
