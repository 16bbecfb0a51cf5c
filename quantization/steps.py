"""The pipeline's pure steps: each takes paths and config, writes into a folder, returns data.

No Ray here; `pipeline.py` runs these as Ray tasks. Every step writes into a temp folder that is
renamed into the step cache only when complete, so an interrupted step leaves nothing reusable
and a finished one is reused when its inputs hash the same (resume). Temp folders are named by host
and process, so those of a killed process are found and removed (`remove_dead_temps`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantization.recipes import QuantRecipe

DEMO_SOURCE = "demo"
DONE = ".done.json"
# `.tmp-<step>-<host>-<pid>-<mkdtemp suffix>`; the suffix has no "-".
_TEMP = re.compile(r"\.tmp-[^-]+-(?P<host>.+)-(?P<pid>\d+)-[^-]*")


class PipelineError(RuntimeError):
    """A job failure with a message the user can act on."""


def fingerprint(**parts: Any) -> str:
    """Stable key of a step's inputs (paths are keyed by name, size and mtime of their files)."""

    def norm(v: Any) -> Any:
        if isinstance(v, Path) and v.is_dir():
            return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(v.iterdir())]
        if isinstance(v, Path):
            return str(v)
        return v

    blob = json.dumps({k: norm(v) for k, v in sorted(parts.items())}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    prefix = f".tmp-{step}-{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=cache_root))
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
    host, removed = socket.gethostname(), []
    for tmp in cache_root.glob(".tmp-*"):
        owner = _TEMP.fullmatch(tmp.name)
        if owner and owner["host"] == host and not _alive(int(owner["pid"])):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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


def run_awq(fp_dir: Path, recipe: QuantRecipe, out: Path) -> dict:
    """Step 2: calibrate and quantize; writes the artifact into `out`."""
    from transformers import AutoTokenizer

    from quantization.awq import quantize_awq
    from quantization.calibration import build_blocks, source_from_spec

    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    cal = recipe.calibration
    blocks = build_blocks(source_from_spec(cal.source), tokenizer, cal.n_samples, cal.seq_len)
    result = quantize_awq(fp_dir, out, recipe, blocks)
    return {"seconds": result.seconds, "device": result.device, "calib_tokens": blocks.numel()}


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)


def gate(recipe: QuantRecipe, qualities: dict[str, dict]) -> GateResult:
    """Apply the recipe's thresholds to the evaluation; reasons say which failed and by how much."""
    fp, rtn, awq = qualities["fp16"], qualities["rtn"], qualities["awq"]
    g = recipe.gate
    reasons = []
    rise_pct = (awq["perplexity"] / fp["perplexity"] - 1) * 100
    if rise_pct > g.max_ppl_increase_pct:
        reasons.append(
            f"AWQ perplexity rose {rise_pct:.1f}% over FP16 (max {g.max_ppl_increase_pct}%)"
        )
    rtn_rise = rtn["perplexity"] - fp["perplexity"]
    awq_rise = awq["perplexity"] - fp["perplexity"]
    if rtn_rise > 0 and awq_rise > g.max_increase_vs_rtn * rtn_rise:
        reasons.append(
            f"AWQ's perplexity rise {awq_rise:.3f} is over "
            f"{g.max_increase_vs_rtn}x RTN's {rtn_rise:.3f}"
        )
    if awq["top1_agreement"] < g.min_top1_agreement:
        reasons.append(
            f"top-1 agreement {awq['top1_agreement']:.3f} is under {g.min_top1_agreement}"
        )
    return GateResult(not reasons, reasons)


def evaluate(fp_dir: Path, awq_dir: Path, recipe: QuantRecipe) -> dict:
    """Step 3: FP16 vs RTN vs AWQ on held-out text; sizes on disk; the gate's verdict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantization.calibration import build_blocks, source_from_spec
    from quantization.evaluate import compare_models, rtn_copy, weights_size_bytes

    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    ev = recipe.evaluation
    blocks = build_blocks(source_from_spec(ev.source, "evaluation"), tokenizer, ev.n_blocks,
                          ev.block_len)  # fmt: skip
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fp = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=dtype, device_map=device)
    rtn = rtn_copy(fp, recipe.w_bit, recipe.q_group_size, recipe.zero_point)
    awq = load_awq_for_eval(awq_dir, recipe, dtype, device)
    results = compare_models(fp, {"rtn": rtn, "awq": awq}, blocks)
    qualities = {k: v.to_dict() for k, v in results.items()}
    qualities["fp16"]["size_bytes"] = weights_size_bytes(fp_dir)
    qualities["awq"]["size_bytes"] = weights_size_bytes(awq_dir)
    verdict = gate(recipe, qualities)
    return {
        "qualities": qualities,
        "eval_tokens": int(blocks.numel()),
        "gate": asdict(verdict),
    }


def load_awq_for_eval(awq_dir: Path, recipe: QuantRecipe, dtype, device: str):
    """4-bit: the packed artifact through the serving kernels. 3-bit (no kernels): the AWQ-scaled
    FP weights, quantize-dequantized."""
    from transformers import AutoModelForCausalLM

    from quantization.evaluate import rtn_copy

    model = AutoModelForCausalLM.from_pretrained(awq_dir, dtype=dtype, device_map=device)
    if recipe.servable:
        return model
    return rtn_copy(model, recipe.w_bit, recipe.q_group_size, recipe.zero_point)
