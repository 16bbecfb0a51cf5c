"""Quality of a quantized model against its FP16 source on held-out text.

Perplexity alone can hide a broken chat model (a few flipped argmaxes barely move it), so each
candidate is also compared token by token with the reference: KL divergence of the next-token
distributions and top-1 agreement.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from quantization.quant_math import pseudo_quantize

MODEL_FILE_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class ModelQuality:
    """Figures of one model on the evaluation blocks; KL/top-1 are against the reference."""

    name: str
    perplexity: float
    kl_vs_reference: float
    top1_agreement: float
    size_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Totals:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0


def weights_size_bytes(model_dir: Path) -> int:
    """Bytes of the weight files in a model folder."""
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.suffix in MODEL_FILE_SUFFIXES)


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers inside decoder blocks: the ones AWQ and RTN quantize (not lm_head)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in f".{name}"
    }


@torch.no_grad()
def rtn_copy(model: nn.Module, w_bit: int, group_size: int, zero_point: bool) -> nn.Module:
    """Round-to-nearest baseline: a copy whose decoder Linear weights are quantize-dequantized."""
    rtn = copy.deepcopy(model)
    for linear in decoder_linears(rtn).values():
        linear.weight.data = pseudo_quantize(linear.weight.data, w_bit, group_size, zero_point)[0]
    return rtn


def _logprobs(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch.to(model.device)).logits[:, :-1]  # (batch, seq-1, vocab)
    return F.log_softmax(logits.float().cpu(), dim=-1)


@torch.no_grad()
def compare_models(
    reference: nn.Module,
    candidates: dict[str, nn.Module],
    blocks: torch.Tensor,
    batch_size: int = 4,
    reference_name: str = "fp16",
    progress: Callable | None = tqdm,
) -> dict[str, ModelQuality]:
    """Perplexity of the reference and every candidate, and each candidate's KL/top-1 vs it.

    `blocks` is (n_blocks, block_len) token ids; every next token after the first is scored.
    """
    totals = {name: _Totals() for name in [reference_name, *candidates]}
    batches = list(torch.split(blocks, batch_size))
    iterator = progress(batches, desc="eval", unit="batch") if progress else batches
    for batch in iterator:
        targets = batch[:, 1:].reshape(-1)
        ref = _logprobs(reference, batch).reshape(-1, reference.config.vocab_size)
        ref_top1 = ref.argmax(-1)
        t = totals[reference_name]
        t.nll += F.nll_loss(ref, targets, reduction="sum").item()
        t.agree += targets.numel()
        t.count += targets.numel()
        for name, model in candidates.items():
            cand = _logprobs(model, batch).reshape(-1, reference.config.vocab_size)
            t = totals[name]
            t.nll += F.nll_loss(cand, targets, reduction="sum").item()
            t.kl += F.kl_div(cand, ref, log_target=True, reduction="sum").item()
            t.agree += (cand.argmax(-1) == ref_top1).sum().item()
            t.count += targets.numel()
    return {
        name: ModelQuality(
            name=name,
            perplexity=float(torch.exp(torch.tensor(t.nll / t.count))),
            kl_vs_reference=t.kl / t.count,
            top1_agreement=t.agree / t.count,
        )
        for name, t in totals.items()
    }
