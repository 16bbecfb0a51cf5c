"""The pipeline's pure steps: each takes paths and config, writes into a folder, returns data.

No Ray here; `pipeline.py` runs these as Ray tasks. Every step writes into a temp folder that is
renamed into the step cache only when complete, so an interrupted step leaves nothing reusable
and a finished one is reused when its inputs hash the same (resume). Temp folders are named by host
and process, so those of a killed process are found and removed (`remove_dead_temps`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantization.cache_keys import source_revision, step_key, tree_digest
from quantization.owner import owned_temp_dir, sweep_dead
from quantization.recipes import QuantRecipe
from quantization.served import DEFAULT_CHAT_PROBES, ServedPathCheck

DEMO_SOURCE = "demo"
DONE = ".done.json"
# `.tmp-<step>-<host>-<pid>-<mkdtemp suffix>` (see `owner`).
TEMP_PREFIX = ".tmp-"


class PipelineError(RuntimeError):
    """A job failure with a message the user can act on."""


def cached_step(
    cache_root: Path, step: str, key: str, run: Callable[[Path], dict]
) -> tuple[Path, dict]:
    """Run `run(tmp_dir)` unless `<cache>/<step>-<key>` is complete; returns (folder, result)."""
    final = cache_root / f"{step}-{key}"
    marker = final / DONE
    if marker.is_file():
        return final, {**json.loads(marker.read_text()), "reused": True}
    cache_root.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(cache_root)
    tmp = owned_temp_dir(cache_root, f"{TEMP_PREFIX}{step}-")
    try:
        result = run(tmp)
        (tmp / DONE).write_text(json.dumps(result, indent=2, default=str))
        if marker.is_file():
            # A parallel job finished the same step first and may be reading it: keep that one.
            return final, {**json.loads(marker.read_text()), "reused": True}
        shutil.rmtree(final, ignore_errors=True)  # an incomplete folder from an older version
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, {**result, "reused": False}


def remove_dead_temps(cache_root: Path) -> list[Path]:
    """Remove temp folders that processes of this host, now gone (killed jobs), left behind."""
    return sweep_dead(cache_root, TEMP_PREFIX)


PREPARE_CODE = ("quantization.steps", "quantization.demo_model")
AWQ_CODE = ("quantization.awq", "quantization.autoawq_patches", "quantization.quant_math",
            "quantization.calibration")  # fmt: skip
EVAL_CODE = ("quantization.evaluate", "quantization.calibration", "quantization.quant_math")


def prepare_key(source: str) -> tuple[str, str]:
    """(cache key, source revision): the key changes when the source's content does."""
    revision = source_revision(source, DEMO_SOURCE)
    return step_key("prepare", PREPARE_CODE, source=source, revision=revision), revision


def prepare(source: str, cache: Path) -> tuple[Path, dict]:
    """Step 1, cached by the source's content: a float16 HF folder of the source model."""
    key, revision = prepare_key(source)

    def run(out: Path) -> dict:
        return {**prepare_source(source, out), "source_revision": revision,
                "content": tree_digest(out)}  # fmt: skip

    return cached_step(cache, "prepare", key, run)


def awq(fp_dir: Path, prepared: dict, recipe: QuantRecipe, cache: Path) -> tuple[Path, dict]:
    """Step 2 in two cached parts: the search (scales and clips as tensors, keyed by the FP16
    content, the search inputs, code and libraries) and apply+pack (keyed by the search and the
    packing). Another packing of the same search reuses the search."""
    search_inputs = recipe.awq_inputs(packing=False)
    key = step_key("search", AWQ_CODE, fp=prepared["content"], recipe=search_inputs)

    def search(out: Path) -> dict:
        return {**run_search(fp_dir, recipe, out), "content": tree_digest(out)}

    search_dir, found = cached_step(cache, "search", key, search)
    key = step_key("awq", AWQ_CODE, search=found["content"], recipe=recipe.awq_inputs())

    def pack(out: Path) -> dict:
        from quantization.awq import SEARCH_FILE, apply_and_pack, load_search

        apply_and_pack(fp_dir, load_search(search_dir / SEARCH_FILE), recipe, out)
        return {"content": tree_digest(out), "search_dir": str(search_dir)}

    folder, packed = cached_step(cache, "awq", key, pack)
    return folder, {**found, **packed, "reused": found["reused"] and packed["reused"]}


def evaluate_cached(
    fp_dir: Path, prepared: dict, awq_dir: Path, awq_result: dict, recipe: QuantRecipe,
    cache: Path,
) -> dict:  # fmt: skip
    """Step 3, cached by both models' content, the evaluation inputs, code and libraries."""
    key = step_key("eval", EVAL_CODE, fp=prepared["content"], awq=awq_result["content"],
                   recipe=recipe.eval_inputs())  # fmt: skip
    return cached_step(cache, "eval", key, lambda out: evaluate(fp_dir, awq_dir, recipe))[1]


def served_cached(
    fp_dir: Path, prepared: dict, awq_dir: Path, awq_result: dict, recipe: QuantRecipe,
    check: ServedPathCheck, cache: Path,
) -> dict:  # fmt: skip
    """Step 4, cached by both models' content, the held-out prompts and the check's own key."""
    key = step_key("served", EVAL_CODE, fp=prepared["content"], awq=awq_result["content"],
                   recipe=recipe.eval_inputs(), check=check.key)  # fmt: skip
    run = lambda out: served_path_check(fp_dir, awq_dir, recipe, check)  # noqa: E731
    return cached_step(cache, "served", key, run)[1]


def prepare_source(source: str, out: Path) -> dict:
    """Step 1: a float16 HF folder of the source model (the demo GGUF, a path, or a hub id)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == DEMO_SOURCE:
        from quantization.demo_model import export_demo_fp16

        export_demo_fp16(out)
        return {"source": source}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        raise PipelineError(
            f"cannot load model '{source}': not a local model folder, and the hub is not "
            f"reachable or has no such model ({e}). Give a local path when offline."
        ) from e
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"source": source}


def calibration_blocks(fp_dir: Path, recipe: QuantRecipe) -> Any:
    """The recipe's calibration blocks (n_samples, seq_len), tokenised for `fp_dir`."""
    from transformers import AutoTokenizer

    from quantization.calibration import build_blocks, source_from_spec

    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    cal = recipe.calibration
    return build_blocks(source_from_spec(cal.source), tokenizer, cal.n_samples, cal.seq_len)


def run_search(fp_dir: Path, recipe: QuantRecipe, out: Path) -> dict:
    """Step 2a: calibrate and search AWQ scales and clips; writes them into `out`."""
    from quantization.awq import search_awq

    blocks = calibration_blocks(fp_dir, recipe)
    result = search_awq(fp_dir, out, recipe, blocks)
    return {"seconds": result.seconds, "device": result.device, "calib_tokens": blocks.numel()}


def held_out_blocks(fp_dir: Path, recipe: QuantRecipe) -> tuple[Any, dict]:
    """(blocks (n_blocks, block_len) of held-out text tokenised for `fp_dir`, what was held out).

    The text is the evaluation part of its source with calibration's 13-word sequences removed.
    """
    from transformers import AutoTokenizer

    from quantization.calibration import ListSource, build_blocks, held_out_documents

    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    ev = recipe.evaluation
    held = held_out_documents(ev.source, recipe.calibration.source)
    source = ListSource(held.description, tuple(held.documents))
    return build_blocks(source, tokenizer, ev.n_blocks, ev.block_len), held.summary()


def evaluate(fp_dir: Path, awq_dir: Path, recipe: QuantRecipe) -> dict:
    """Step 3: FP16 vs RTN vs AWQ on held-out text; sizes on disk (the gate is applied after)."""
    from transformers import AutoModelForCausalLM

    from quantization.compute import compute_dtype, pick_device
    from quantization.evaluate import compare_models, rtn_copy, weights_size_bytes

    blocks, held_out = held_out_blocks(fp_dir, recipe)
    device = pick_device().type
    dtype = compute_dtype(device)
    fp = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=dtype, device_map=device)
    rtn = rtn_copy(fp, recipe.w_bit, recipe.q_group_size, recipe.zero_point)
    awq = load_awq_for_eval(awq_dir, recipe, dtype, device)
    results = compare_models(fp, {"rtn": rtn, "awq": awq}, blocks)
    qualities = {k: v.to_dict() for k, v in results.items()}
    qualities["fp16"]["size_bytes"] = weights_size_bytes(fp_dir)
    qualities["awq"]["size_bytes"] = weights_size_bytes(awq_dir)
    return {"qualities": qualities, "eval_tokens": int(blocks.numel()), "held_out": held_out}


def served_path_check(
    fp_dir: Path, awq_dir: Path, recipe: QuantRecipe, check: ServedPathCheck
) -> dict:
    """Step 4: the candidate through the serving engine vs its transformers forward.

    Prompts are held-out blocks cut to different lengths, so packed prefill mixes lengths.
    """
    blocks = held_out_blocks(fp_dir, recipe)[0]
    lengths = [max(8, blocks.shape[1] * k // 4) for k in (4, 3, 2, 1)]
    prompts = [blocks[i % blocks.shape[0], :n].tolist() for i, n in enumerate(lengths)]
    return check(fp_dir, awq_dir, prompts, list(DEFAULT_CHAT_PROBES)).to_dict()


def load_awq_for_eval(awq_dir: Path, recipe: QuantRecipe, dtype, device: str):
    """4-bit: the packed artifact through the serving kernels. 3-bit (no kernels): the AWQ-scaled
    FP weights, quantize-dequantized."""
    from transformers import AutoModelForCausalLM

    from quantization.evaluate import rtn_copy

    model = AutoModelForCausalLM.from_pretrained(awq_dir, dtype=dtype, device_map=device)
    if recipe.servable:
        return model
    return rtn_copy(model, recipe.w_bit, recipe.q_group_size, recipe.zero_point)
