"""Decode speed of a 7B-shaped Llama on one GPU, FP16 vs AWQ int4, against the bandwidth roofline.

Batch-1 decode reads every weight once per token, so its ceiling is bandwidth / weight bytes;
4-bit weights move ~3.5x fewer bytes than FP16, which is the whole case for AWQ on a GPU. The
model has random weights (no download): Llama-2-7B shapes, built layer by layer on the GPU in
FP16, then each Linear quantized round-to-nearest (w4, g128, zero point) and packed into the
AutoAWQ GEMM format that `awq-serve` artifacts use, served by the gptqmodel kernel that
transformers would pick for such an artifact (Marlin, ExLlamaV2, GEMM, Triton, ...).

    python -m benchmarks.gpu_decode                  # needs CUDA; exits 2 without it
    python -m benchmarks.gpu_decode --dry-run        # tiny model on CPU: shapes and packing

Decode runs gpt-fast style: a static KV cache, one step = one token for the whole batch, and the
step captured in a CUDA graph (the 7 Linears x 32 layers are too many small launches to time
eagerly at batch 1); the eager loop is timed too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
W_BIT = 4
# AutoAWQ packs 8 nibbles per int32 in this interleaved order (awq/modules/linear/gemm.py).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Peak DRAM bandwidth from the vendors' data sheets, GB/s, for reference next to the measurement.
SPEC_BANDWIDTH_GBPS: dict[str, float] = {
    "H100 SXM (HBM3)": 3350.0,
    "H100 PCIe (HBM2e)": 2000.0,
    "H100 NVL": 3900.0,
    "H200": 4800.0,
    "RTX 4090": 1008.0,
    "A100 80GB SXM": 2039.0,
}
# Substrings of torch.cuda.get_device_name() for the rows above, most specific first.
DEVICE_NAME_KEYS: tuple[tuple[str, str], ...] = (
    ("H100 NVL", "H100 NVL"),
    ("H100 PCIe", "H100 PCIe (HBM2e)"),
    ("H100", "H100 SXM (HBM3)"),
    ("H200", "H200"),
    ("4090", "RTX 4090"),
    ("A100-SXM4-80GB", "A100 80GB SXM"),
)


class NoCudaError(RuntimeError):
    """No CUDA device: the real benchmark cannot run (use --dry-run to check the code paths)."""


@dataclass(frozen=True)
class Shape:
    """Decoder dimensions; LLAMA_7B is Llama-2-7B."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of one block's Linears."""
        h, i = self.hidden, self.intermediate
        attn = [(n, h, h) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        return [*attn, ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]


LLAMA_7B = Shape(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000)
TINY = Shape(hidden=256, intermediate=512, layers=2, heads=4, vocab=1024)


# ---------------------------------------------------------------------------------------------
# Bytes and rooflines (pure arithmetic)


def awq_linear_bytes(in_features: int, out_features: int, group_size: int) -> int:
    """int4 weights + fp16 scales + int4 zeros of one AWQ GEMM Linear."""
    groups = in_features // group_size
    return in_features * out_features // 2 + groups * out_features * 2 + groups * out_features // 2


def weight_bytes_per_step(shape: Shape, group_size: int | None, batch: int) -> int:
    """Bytes of weights one decode step must read; group_size None = FP16 Linears.

    Norms and the (unquantized, as in AutoAWQ) lm_head count in full; the embedding only for
    the `batch` rows it gathers.
    """
    linear = sum(
        i * o * 2 if group_size is None else awq_linear_bytes(i, o, group_size)
        for _, i, o in shape.linears()
    )
    norms = (2 * shape.layers + 1) * shape.hidden * 2
    return shape.layers * linear + norms + shape.vocab * shape.hidden * 2 + batch * shape.hidden * 2


def kv_bytes_per_step(shape: Shape, batch: int, context: float) -> int:
    """FP16 K and V one step must read at `context` cached tokens per sequence."""
    return int(shape.layers * 2 * batch * context * shape.hidden * 2)


def roofline_tok_s(bytes_per_step: int, bandwidth_gbps: float, batch: int) -> float:
    """Tokens/s if a step took exactly its bytes / bandwidth (compute is free at these batches)."""
    return batch * bandwidth_gbps * 1e9 / bytes_per_step


def spec_for(device_name: str) -> tuple[str, float] | None:
    """The data-sheet bandwidth row matching a CUDA device name, if known."""
    for key, row in DEVICE_NAME_KEYS:
        if key in device_name:
            return row, SPEC_BANDWIDTH_GBPS[row]
    return None


# ---------------------------------------------------------------------------------------------
# AWQ packing (vectorized AutoAWQ GEMM format)


def rtn_int4(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest w4 with zero point, AutoAWQ's formula (quantization.quant_math).

    weight: (out, in). Returns ints (out, in) in 0..15, zeros (out, in/g), scales (out, in/g),
    and the dequantized weight (out, in) that the packed form represents exactly.
    """
    from quantization.quant_math import pseudo_quantize

    dequant, scales, zeros = pseudo_quantize(weight.float(), W_BIT, group_size, zero_point=True)
    assert zeros is not None
    s = scales.repeat_interleave(group_size, dim=1)  # (out, in)
    z = zeros.repeat_interleave(group_size, dim=1)
    ints = torch.round(dequant / s + z).clamp_(0, 2**W_BIT - 1).to(torch.int32)
    return ints, zeros.to(torch.int32), scales, dequant


def pack_int4_columns(ints: torch.Tensor) -> torch.Tensor:
    """(rows, cols) ints in 0..15 -> (rows, cols/8) int32, nibble i = column AWQ_PACK_ORDER[i]."""
    rows, cols = ints.shape
    nibbles = ints.reshape(rows, cols // 8, 8)[:, :, list(AWQ_PACK_ORDER)].to(torch.int64)
    shifts = torch.arange(0, 32, W_BIT, device=ints.device, dtype=torch.int64)
    packed = (nibbles << shifts).sum(dim=-1)  # (rows, cols/8), < 2**32
    # Reinterpret as signed int32 (the top nibble sets the sign bit), as AutoAWQ's `|=` does.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


@dataclass
class PackedAwq:
    """One Linear in AutoAWQ GEMM layout: qweight (in, out/8), qzeros (in/g, out/8), scales."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor  # (in/g, out) fp16
    dequant: torch.Tensor  # (out, in): what the packed weights mean, for checks


def pack_awq_gemm(weight: torch.Tensor, group_size: int) -> PackedAwq:
    """Quantize an (out, in) weight and pack it as AutoAWQ's WQLinear_GEMM.from_linear does."""
    ints, zeros, scales, dequant = rtn_int4(weight, group_size)
    return PackedAwq(
        qweight=pack_int4_columns(ints.t().contiguous()),  # (in, out/8)
        qzeros=pack_int4_columns(zeros.t().contiguous()),  # (in/g, out/8)
        scales=scales.t().contiguous().to(torch.float16),  # (in/g, out)
        dequant=dequant.to(weight.dtype),
    )


# ---------------------------------------------------------------------------------------------
# gptqmodel kernels


@dataclass
class KernelChoice:
    """The AWQ Linear class used, and why the ones before it were passed over."""

    cls: type[nn.Module]
    rejected: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.cls.__name__


def kernel_candidates(device: torch.device, backend: str, group_size: int) -> list[type[nn.Module]]:
    """gptqmodel's AWQ GEMM kernels valid here, best first (what transformers would pick)."""
    from gptqmodel.models._const import DEVICE
    from gptqmodel.quantization import FORMAT, METHOD
    from gptqmodel.utils.backend import BACKEND
    from gptqmodel.utils.importer import get_kernel_for_backend, select_quant_linear

    if backend != "auto":
        return [get_kernel_for_backend(BACKEND(backend), METHOD.AWQ, FORMAT.GEMM)]
    found = select_quant_linear(
        bits=W_BIT,
        group_size=group_size,
        desc_act=False,
        sym=False,  # zero point
        device=DEVICE.CUDA if device.type == "cuda" else DEVICE.CPU,
        backend=BACKEND.AUTO,
        format=FORMAT.GEMM,
        quant_method=METHOD.AWQ,
        pack=False,
        pack_dtype=torch.int32,
        dtype=torch.float16,
        multi_select=True,
    )
    return list(found) if isinstance(found, list) else [found]


def awq_linear(
    cls: type[nn.Module], packed: PackedAwq, in_features: int, out_features: int, group_size: int
) -> nn.Module:
    """A gptqmodel AWQ Linear holding `packed` (post_init, which repacks for the kernel, later)."""
    from gptqmodel.utils.backend import BACKEND

    backends = getattr(cls, "SUPPORTS_BACKENDS", None) or [BACKEND.AUTO]
    module = cls(
        bits=W_BIT,
        group_size=group_size,
        sym=False,
        desc_act=False,
        in_features=in_features,
        out_features=out_features,
        bias=False,
        pack_dtype=torch.int32,
        register_buffers=True,
        dtype=torch.float16,
        backend=backends[0],
    ).to(packed.qweight.device)
    for name in ("qweight", "qzeros", "scales"):
        # copy_ checks shapes: a layout mismatch fails here, not as garbage output.
        getattr(module, name).copy_(getattr(packed, name))
    return module


def post_init(model: nn.Module, max_input_length: int) -> None:
    """gptqmodel's own post-load step (scratch space, Marlin/ExLlama repacking), as in HF."""
    from gptqmodel.utils.model import gptqmodel_post_init

    gptqmodel_post_init(model, use_act_order=False, max_input_length=max_input_length)


def check_kernel(cls: type[nn.Module], device: torch.device, hidden: int, group_size: int) -> float:
    """Max relative error of the kernel against x @ dequant(W).T at batch 1 and 16."""
    torch.manual_seed(0)
    weight = torch.randn(hidden, hidden, device=device, dtype=torch.float16) * 0.02
    packed = pack_awq_gemm(weight, group_size)
    holder = nn.Module()
    holder.linear = awq_linear(cls, packed, hidden, hidden, group_size)
    post_init(holder, max_input_length=64)
    worst = 0.0
    for rows in (1, 16):
        x = torch.randn(rows, 1, hidden, device=device, dtype=torch.float16)
        with torch.inference_mode():
            got = holder.linear(x).float()
        want = x.float() @ packed.dequant.float().t()
        worst = max(worst, ((got - want).norm() / want.norm()).item())
    return worst


def choose_kernel(device: torch.device, backend: str, hidden: int, group_size: int) -> KernelChoice:
    """The first candidate that builds, repacks and matches the reference on this device."""
    rejected = []
    for cls in kernel_candidates(device, backend, group_size):
        try:
            error = check_kernel(cls, device, hidden, group_size)
        except Exception as exc:  # a kernel whose extension cannot build here: try the next
            rejected.append(f"{cls.__name__}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if error < 2e-2:
            return KernelChoice(cls=cls, rejected=rejected)
        rejected.append(f"{cls.__name__}: wrong results (relative error {error:.3g})")
    raise RuntimeError("no gptqmodel AWQ kernel works here:\n  " + "\n  ".join(rejected))


# ---------------------------------------------------------------------------------------------
# The model (gpt-fast style: static KV cache, one token per sequence per step)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
        return norm.to(x.dtype) * self.weight


def random_linear(
    in_features: int, out_features: int, device: torch.device, dtype: torch.dtype
) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
    nn.init.normal_(linear.weight, std=0.02)
    return linear


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Block(nn.Module):
    """One Llama decoder layer with its own K/V cache (batch, heads, max_len, head_dim)."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = shape
        self.attention_norm = RMSNorm(shape.hidden, device, dtype)
        self.ffn_norm = RMSNorm(shape.hidden, device, dtype)
        for name, i, o in shape.linears():
            setattr(self, name, random_linear(i, o, device, dtype))
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        assert self.k_cache is not None and self.v_cache is not None
        b, s = x.shape[0], self.shape
        h = self.attention_norm(x)  # (batch, 1, hidden)
        q, k, v = (
            getattr(self, n)(h).view(b, 1, s.heads, s.head_dim).transpose(1, 2)
            for n in ("q_proj", "k_proj", "v_proj")
        )  # (batch, heads, 1, head_dim)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # index_copy_ with a device index: the write position lives on the GPU (graph-safe).
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        attn = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, 1, s.hidden))
        h = self.ffn_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DecodeModel(nn.Module):
    """Embedding, blocks, norm, lm_head; `step_` decodes one greedy token per sequence in place."""

    def __init__(self, shape: Shape, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.shape = shape
        self.embed = nn.Embedding(shape.vocab, shape.hidden, device=device, dtype=dtype)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList()
        for _ in range(shape.layers):
            # One layer at a time straight on the device: no CPU copy of 13 GB of weights.
            self.blocks.append(Block(shape, device, dtype))
        self.norm = RMSNorm(shape.hidden, device, dtype)
        self.lm_head = random_linear(shape.hidden, shape.vocab, device, dtype)
        self.max_len = 0

    def setup_cache(self, batch: int, max_len: int) -> None:
        """Allocate each block's K/V and the RoPE table for `max_len` positions."""
        s, p = self.shape, self.lm_head.weight
        for block in self.blocks:
            shape = (batch, s.heads, max_len, s.head_dim)
            block.k_cache = torch.zeros(shape, device=p.device, dtype=p.dtype)
            block.v_cache = torch.zeros(shape, device=p.device, dtype=p.dtype)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, s.head_dim, 2, device=p.device) / s.head_dim)
        angles = torch.outer(torch.arange(max_len, device=p.device).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (max_len, head_dim)
        self.cos, self.sin = angles.cos().to(p.dtype), angles.sin().to(p.dtype)
        self.positions = torch.arange(max_len, device=p.device)
        self.max_len = max_len

    def free_cache(self) -> None:
        for block in self.blocks:
            block.k_cache = block.v_cache = None

    def step_(self, tokens: torch.Tensor, pos: torch.Tensor) -> None:
        """tokens (batch, 1) <- greedy next tokens; pos (1,) += 1. No host sync: graphable."""
        x = self.embed(tokens)  # (batch, 1, hidden)
        cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)  # (1, head_dim)
        mask = (self.positions <= pos).view(1, 1, 1, self.max_len)
        for block in self.blocks:
            x = block(x, pos, cos, sin, mask)
        logits = self.lm_head(self.norm(x))  # (batch, 1, vocab)
        tokens.copy_(logits.argmax(dim=-1))
        pos.add_(1)


def quantize_blocks_(
    model: DecodeModel, kernel: type[nn.Module], group_size: int, max_len: int
) -> None:
    """Swap each block Linear for its AWQ form, one by one so FP16 memory is freed as we go."""
    for block in model.blocks:
        for name, i, o in model.shape.linears():
            packed = pack_awq_gemm(getattr(block, name).weight.data, group_size)
            setattr(block, name, awq_linear(kernel, packed, i, o, group_size))
            del packed
    post_init(model, max_input_length=max_len)


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class DecodeResult:
    """One (model, batch) measurement."""

    model: str
    batch: int
    steps: int
    eager_tok_s: float
    graph_tok_s: float | None
    graph_error: str | None
    weight_bytes: int
    kv_bytes: int
    roofline_tok_s: float
    roofline_kv_tok_s: float

    @property
    def best_tok_s(self) -> float:
        return self.graph_tok_s or self.eager_tok_s


def timed(run: Callable[[], None], device: torch.device) -> float:
    """Seconds `run` took, with the device synchronized around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def capture_step(model: DecodeModel, tokens: torch.Tensor, pos: torch.Tensor) -> Any:
    """A CUDA graph of one decode step (warmed up on a side stream first, as torch requires)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):  # lets lazy kernels (Triton autotune, workspaces) settle outside capture
            model.step_(tokens, pos)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        model.step_(tokens, pos)
    return graph


def measure_decode(
    model: DecodeModel,
    label: str,
    batch: int,
    context: int,
    steps: int,
    group_size: int | None,
    bandwidth_gbps: float,
    use_graph: bool,
) -> DecodeResult:
    """Eager and CUDA-graph tokens/s of `steps` decode steps starting at `context` cached tokens."""
    device = model.lm_head.weight.device  # the lm_head stays FP16, as AutoAWQ leaves it
    warmup = 3
    model.setup_cache(batch, context + steps + warmup + 1)
    tokens = torch.randint(0, model.shape.vocab, (batch, 1), device=device)
    pos = torch.tensor([context], device=device)

    def eager() -> None:
        with torch.inference_mode():
            for _ in range(steps):
                model.step_(tokens, pos)

    with torch.inference_mode():
        for _ in range(warmup):
            model.step_(tokens, pos)
    pos.fill_(context)
    eager_s = timed(eager, device)

    graph_tok_s, graph_error = None, None
    if use_graph:
        try:
            graph = capture_step(model, tokens, pos)
            pos.fill_(context)
            graph_s = timed(lambda: [graph.replay() for _ in range(steps)], device)
            graph_tok_s = batch * steps / graph_s
            del graph
        except Exception as exc:  # a kernel that cannot be captured still has its eager figure
            graph_error = f"{type(exc).__name__}: {str(exc)[:200]}"
    model.free_cache()

    weights = weight_bytes_per_step(model.shape, group_size, batch)
    kv = kv_bytes_per_step(model.shape, batch, context + steps / 2)
    return DecodeResult(
        model=label,
        batch=batch,
        steps=steps,
        eager_tok_s=batch * steps / eager_s,
        graph_tok_s=graph_tok_s,
        graph_error=graph_error,
        weight_bytes=weights,
        kv_bytes=kv,
        roofline_tok_s=roofline_tok_s(weights, bandwidth_gbps, batch),
        roofline_kv_tok_s=roofline_tok_s(weights + kv, bandwidth_gbps, batch),
    )


def measure_bandwidth_gbps(device: torch.device, mib: int = 1024, iters: int = 20) -> float:
    """Device-to-device copy rate: bytes read + written per second, in GB/s."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = timed(lambda: [dst.copy_(src) for _ in range(iters)], device)
    return 2 * src.numel() * iters / seconds / 1e9


# ---------------------------------------------------------------------------------------------
# Report


def format_report(
    results: Sequence[DecodeResult], device_name: str, bandwidth_gbps: float, kernel: str
) -> str:
    """Markdown table of tokens/s vs roofline, the AWQ speedups, and the spec bandwidths."""
    spec = spec_for(device_name)
    spec_text = f"spec {spec[1] / 1e3:.2f} TB/s ({spec[0]})" if spec else "no spec on file"
    lines = [
        f"{device_name}: measured copy bandwidth {bandwidth_gbps / 1e3:.2f} TB/s, {spec_text}. "
        f"AWQ kernel: {kernel}.",
        "",
        "| model | batch | eager tok/s | graph tok/s | ms/step | roofline tok/s (weights) | "
        "% of roofline | roofline incl. KV | weights GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        graph = f"{r.graph_tok_s:.1f}" if r.graph_tok_s else f"- ({r.graph_error or 'off'})"
        lines.append(
            f"| {r.model} | {r.batch} | {r.eager_tok_s:.1f} | {graph} | "
            f"{1e3 * r.batch / r.best_tok_s:.2f} | {r.roofline_tok_s:.1f} | "
            f"{100 * r.best_tok_s / r.roofline_tok_s:.0f}% | {r.roofline_kv_tok_s:.1f} | "
            f"{r.weight_bytes / 1e9:.2f} |"
        )
    by_key = {(r.model, r.batch): r for r in results}
    for batch in sorted({r.batch for r in results}):
        fp, awq = by_key.get(("FP16", batch)), by_key.get(("AWQ", batch))
        if fp and awq:
            lines.append(
                f"\nbatch {batch}: AWQ {awq.best_tok_s / fp.best_tok_s:.2f}x FP16 "
                f"(bytes ratio {fp.weight_bytes / awq.weight_bytes:.2f}x)"
            )
    lines.append(
        "\nData-sheet bandwidth: "
        + ", ".join(f"{k} {v / 1e3:.2f} TB/s" for k, v in SPEC_BANDWIDTH_GBPS.items())
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Dry run (CPU): shapes, packing parity with AutoAWQ, kernel path, a few decode steps


def check_packing_matches_autoawq(group_size: int = 64) -> None:
    """Our vectorized packer must give AutoAWQ's from_linear bytes exactly."""
    from awq.modules.linear.gemm import WQLinear_GEMM

    torch.manual_seed(0)
    weight = torch.randn(128, 256) * 0.02  # (out, in)
    ours = pack_awq_gemm(weight, group_size)
    _, zeros, scales, dequant = rtn_int4(weight, group_size)
    linear = nn.Linear(256, 128, bias=False)
    linear.weight.data = dequant.clone()
    ref = WQLinear_GEMM.from_linear(
        linear, W_BIT, group_size, scales=scales.t().contiguous(), zeros=zeros.t().contiguous()
    )
    for name in ("qweight", "qzeros"):
        if not torch.equal(getattr(ours, name), getattr(ref, name)):
            raise AssertionError(f"{name} differs from AutoAWQ's WQLinear_GEMM.from_linear")
    if not torch.equal(ours.scales, ref.scales):
        raise AssertionError("scales differ from AutoAWQ's WQLinear_GEMM.from_linear")


def dry_run(args: argparse.Namespace) -> int:
    """The whole path on a tiny model on CPU; no timing claims."""
    device, shape, group = torch.device("cpu"), TINY, 128
    check_packing_matches_autoawq()
    print("packing: identical to AutoAWQ WQLinear_GEMM.from_linear (qweight, qzeros, scales)")
    choice = choose_kernel(device, args.kernel, shape.hidden, group)
    print(f"kernel: {choice.name}" + "".join(f"\n  passed over {r}" for r in choice.rejected))
    bandwidth = measure_bandwidth_gbps(device, mib=256, iters=5)
    torch.manual_seed(0)
    model = DecodeModel(shape, device, torch.float16)
    results = [measure_decode(model, "FP16", 2, 8, 4, None, bandwidth, use_graph=False)]
    quantize_blocks_(model, choice.cls, group, max_len=64)
    kinds = {type(getattr(model.blocks[0], n)).__name__ for n in LINEARS}
    print(f"blocks quantized: {kinds}")
    results.append(measure_decode(model, "AWQ", 2, 8, 4, group, bandwidth, use_graph=False))
    print(
        format_report(
            results, "CPU dry run (tiny model, timings meaningless)", bandwidth, choice.name
        )
    )
    big = {g: weight_bytes_per_step(LLAMA_7B, g, 1) / 1e9 for g in (None, 128)}
    print(f"7B weights per step: FP16 {big[None]:.2f} GB, AWQ g128 {big[128]:.2f} GB")
    return 0


# ---------------------------------------------------------------------------------------------
# CLI


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise NoCudaError(
            "no CUDA device visible (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}): the GPU decode "
            "benchmark needs one. Run it on a GPU machine, or use --dry-run to check shapes and "
            "packing on CPU."
        )
    return torch.device("cuda")


def run(args: argparse.Namespace) -> int:
    device = require_cuda()
    name = torch.cuda.get_device_name(device)
    bandwidth = measure_bandwidth_gbps(device)
    print(f"{name}: device-to-device copy {bandwidth / 1e3:.2f} TB/s", flush=True)
    choice = choose_kernel(device, args.kernel, LLAMA_7B.hidden, args.group_size)
    print(f"AWQ kernel: {choice.name}", flush=True)
    for reason in choice.rejected:
        print(f"  passed over {reason}")

    torch.manual_seed(0)
    started = time.perf_counter()
    model = DecodeModel(LLAMA_7B, device, torch.float16)
    print(f"built FP16 model in {time.perf_counter() - started:.1f} s", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    for label, group in (("FP16", None), ("AWQ", args.group_size)):
        if label == "AWQ":
            max_len = args.context + args.steps + 8
            quantize_blocks_(model, choice.cls, args.group_size, max_len)
            torch.cuda.empty_cache()
        for batch in batches:
            result = measure_decode(
                model, label, batch, args.context, args.steps, group, bandwidth, not args.no_graph
            )
            print(f"{label} batch {batch}: {result.best_tok_s:.1f} tok/s", flush=True)
            results.append(result)
    report = format_report(results, name, bandwidth, choice.name)
    print("\n" + report)
    write_json(results, name, bandwidth, choice, args)
    return 0


def write_json(
    results: Sequence[DecodeResult],
    device_name: str,
    bandwidth_gbps: float,
    choice: KernelChoice,
    args: argparse.Namespace,
) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-gpu-decode.json"
    payload = {
        "device": device_name,
        "bandwidth_gbps": bandwidth_gbps,
        "spec": spec_for(device_name),
        "shape": asdict(LLAMA_7B),
        "group_size": args.group_size,
        "kernel": choice.name,
        "kernels_passed_over": choice.rejected,
        "torch": torch.__version__,
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_decode",
        description="Decode tokens/s of a random 7B-shaped Llama, FP16 vs AWQ, vs the roofline.",
    )
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=128, help="decode steps timed per run")
    p.add_argument("--context", type=int, default=128, help="cached tokens before the first step")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument(
        "--kernel",
        default="auto",
        help="gptqmodel backend (awq_marlin, awq_exllama_v2, awq_gemm, awq_gemm_triton, "
        "awq_torch, ...) or auto: the first that works, in gptqmodel's order",
    )
    p.add_argument("--no-graph", action="store_true", help="time the eager loop only")
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU: check code paths")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    try:
        return run(args)
    except NoCudaError as exc:
        print(f"gpu_decode: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
