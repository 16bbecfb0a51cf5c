"""Batched forward passes over a slot KV cache, for continuous batching (no Ray here).

The model is loaded by transformers, so every Linear is whatever kernel the hardware gets (AWQ
artifacts: gptqmodel's aten int4 kernel on CPU, its CUDA kernels on GPU). This module only re-wires
the decoder blocks (gpt-fast style) so sequences of different lengths share one decode step:
sequence i lives in KV slot i, and the running set always occupies slots 0..n-1 (a finished
sequence's slot is refilled by moving the last one down), so each step reads one contiguous view.
"""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deployments.engine.fused_projections import Projection, fuse_projections
from deployments.engine.native_int4 import use_native_int4
from deployments.engine.native_step import NativeUnavailable, exact_16bit_head, native_decoder
from deployments.engine.prefix_cache import PrefixCache
from quantization.compute import compute_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """What differs between supported decoder families."""

    qk_norm: bool = False


# Architecture knowledge as data: model_type -> how its attention block is wired.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(),
    "mistral": ArchSpec(),
    "qwen2": ArchSpec(),
    "qwen3": ArchSpec(qk_norm=True),
}


class UnsupportedArchitecture(ValueError):
    pass


def load_model(model_dir: Path, device: torch.device) -> tuple[nn.Module, object]:
    """Load model and tokenizer; fp16 on GPU, fp32 on CPU (fp16 matmuls are slow on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = compute_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, device_map=str(device), attn_implementation="sdpa"
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def lm_head_dtype(requested: str, model_dtype: torch.dtype) -> torch.dtype:
    """`auto` is the model's dtype. bf16 on an fp32 CPU model halves the bytes of the largest
    decode matmul (6.3 -> 3.3 ms at batch 16, both prepacked) and moves held-out perplexity only
    17.268 -> 17.286, but bf16 logits are coarse (steps of 0.06 near 15): greedy top-1 changed on
    2% of tokens, and identical prompts in one batch could get different greedy answers. So it
    is opt-in."""
    return model_dtype if requested == "auto" else getattr(torch, requested)


def output_projection(
    head: nn.Linear, dtype: torch.dtype, device: torch.device, batch_hint: int
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The lm_head as a function of hidden states, in `dtype`.

    On CPU in fp32, a weight that fp16 or bf16 holds exactly (a checkpoint saved in 16 bits) is
    stored in 16 bits and multiplied in fp32 by the native kernel (`exact_16bit_head`): the same
    logits up to summation order, half the bytes a token reads. Otherwise its weight is
    reordered once into oneDNN's blocked layout (what inductor's CPU weight prepacking does): at
    batch 16 the 49152 x 576 head takes 6.3 ms in fp32 and 3.3 ms in bf16, against 20.4 and
    5.6 ms for F.linear on the plain layout. Falls back to F.linear where oneDNN is missing.
    """
    weight = head.weight.detach().to(dtype)
    bias = None if head.bias is None else head.bias.detach().to(dtype)
    if device.type == "cpu" and dtype == torch.float32 and bias is None:
        try:
            return exact_16bit_head(weight)
        except NativeUnavailable as e:
            log.info("%s; the lm_head stays fp32", e)
    plain = partial(F.linear, weight=weight, bias=bias)
    fallback = (lambda h: plain(h.to(dtype))), f"linear {str(dtype).removeprefix('torch.')}"
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return fallback
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        probe = torch.zeros(1, weight.shape[1], dtype=dtype)
        linear = torch.ops.mkldnn._linear_pointwise
        torch.testing.assert_close(linear(probe, packed, bias, "none", [], ""), plain(probe))
    except (RuntimeError, AssertionError):  # a torch build without the op, or a layout change
        return fallback
    packed_name = f"onednn prepacked {str(dtype).removeprefix('torch.')}"
    return (lambda h: linear(h.to(dtype), packed, bias, "none", [], "")), packed_name


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A decoder's RMSNorm module as one fused op (eight small ops in HF's eager forward, ~400 a
    decode step on a 30-layer model)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, and sin with its first half negated: what `apply_rope` takes, made once a forward."""
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (..., heads, head_dim); cos and signed_sin (`rope_tables`) broadcast
    over the heads.

    HF's x * cos + rotate_half(x) * sin bit for bit, with rotate_half(x) = (-x2, x1) taken as
    the halves swapped times a sign folded into sin ((-a) * b == a * (-b) exactly): one copy and
    three products instead of split, neg and cat, and q and k of a layer go through together.
    """
    hd = x.shape[-1]
    swapped = x.unflatten(-1, (2, hd // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * signed_sin


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.zeros`, but on CPU over an anonymous memory mapping, which the kernel fills with
    zero pages as they are first touched: a KV cache sized for every slot then costs no start-up
    time and no resident memory until sequences reach it. `torch.zeros` writes every byte up
    front: 1.5 GB (32 demo slots of 2048 tokens) took 0.8-5.1 s on a 2-core host (measured).
    Zeros, not `torch.empty`: a decode reads a slot's keys up to its bucket, past its length,
    and a masked NaN would still poison the weighted sum."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    pages = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)  # keeps `pages` alive


class SlotKVCache:
    """Per-layer K/V tensors (slots, kv_heads, max_len, head_dim) and each slot's length."""

    def __init__(
        self,
        n_layers: int,
        slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (slots, kv_heads, max_len, head_dim)
        self.k = [zeroed(shape, dtype, device) for _ in range(n_layers)]
        self.v = [zeroed(shape, dtype, device) for _ in range(n_layers)]
        self.lengths = [0] * slots
        self.max_len = max_len
        # Read after every step (the KV-bytes gauge): computed once, not summed over the layers.
        self.bytes_per_token = sum(t[0, :, 0].numel() * t.element_size() for t in self.k + self.v)

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def bytes_in_use(self) -> int:
        return self.bytes_per_token * sum(self.lengths)

    def flat_index(self, slot: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Row of each (token, kv head) in a layer's cache viewed as (-1, head_dim); slot and
        pos are (batch, seq). The same for every layer, so a forward computes it once."""
        b, s = slot.shape
        head = torch.arange(self.k[0].shape[1], device=slot.device).view(1, -1, 1)
        kv = head.shape[1]
        return ((slot.view(b, 1, s) * kv + head) * self.max_len + pos.view(b, 1, s)).reshape(-1)

    @staticmethod
    def write(cache: torch.Tensor, index: torch.Tensor, new: torch.Tensor) -> None:
        """Store `new` (batch, kv_heads, seq, head_dim) at `flat_index` rows. A flat
        `index_copy_` is several times faster on CPU than advanced-index assignment."""
        hd = new.shape[-1]
        cache.view(-1, hd).index_copy_(0, index, new.reshape(-1, hd))

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into `dst` (used to keep the running set contiguous)."""
        self._copy_slots([src], [dst])
        self.lengths[dst], self.lengths[src] = self.lengths[src], 0

    def permute(self, perm: list[int]) -> None:
        """Slot i takes what slot perm[i] holds, for i < len(perm); only moved slots copy."""
        moved = [i for i, j in enumerate(perm) if i != j]
        if moved:
            self._copy_slots([perm[i] for i in moved], moved)
            self.lengths[: len(perm)] = [self.lengths[j] for j in perm]

    def _copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Every layer's K/V of slots `src` into slots `dst`, up to the longest one's length.
        The select copies before the write, so the two lists may share slots."""
        n = max(self.lengths[j] for j in src)
        to = torch.tensor(dst, device=self.k[0].device)
        source = torch.tensor(src, device=to.device)
        for t in self.k + self.v:
            live = t[:, :, :n]
            live.index_copy_(0, to, live.index_select(0, source))


# Batch invariance: a token's attention must not depend on its batch-mates. CPU SDPA sums a
# row's keys in an order that depends on how many keys the call has (even masked ones: 45 vs 48
# keys moved outputs by 1.2e-7, measured) and a causal call's query blocking on how many queries
# it has, so every query is computed in a call shaped by its own position only: queries in
# aligned tiles of QUERY_TILE rows (decode: one row), keys rounded up to KEY_BUCKET.
QUERY_TILE = 16
KEY_BUCKET = 128


@dataclass(frozen=True)
class AttentionGroup:
    """Query tiles that share one key count, attended in one SDPA call."""

    rows: torch.Tensor  # (tiles * tile_rows,) token of each query row; `tokens` = padding
    slots: torch.Tensor | slice  # KV slot of each tile
    keys: int  # keys read per tile (a bucket: a function of the tile's position alone)
    mask: torch.Tensor  # (tiles, 1, tile_rows, keys) True where a key is visible


@dataclass(frozen=True)
class StepLayout:
    """Where one forward's tokens (batch, seq) live and how their attention is computed."""

    slot: torch.Tensor  # (batch, seq) KV slot of each token
    pos: torch.Tensor  # (batch, seq) position of each token in its sequence
    groups: list[AttentionGroup]
    tile_rows: int  # query rows per tile
    last: torch.Tensor  # flat (batch * seq) index of each token whose logits are wanted


def key_bucket(needed: int, max_len: int) -> int:
    """Keys a call reads for queries that need `needed`: rounded up, so it depends on the
    position alone and a handful of calls cover a whole batch."""
    return min(-(-needed // KEY_BUCKET) * KEY_BUCKET, max_len)


def plan_attention(
    slots: list[int],
    positions: list[int],
    tile_rows: int,
    max_len: int,
    device: torch.device,
    invariant: bool = True,
) -> list[AttentionGroup]:
    """Group the tokens (flat order, one slot and position each) into aligned query tiles and
    the tiles by key bucket. A tile holds the tokens of one slot whose positions fall in
    [t * tile_rows, (t + 1) * tile_rows); rows of a tile with no token are padding.

    `invariant=False` gives every tile the keys the batch's furthest tile needs: one SDPA call a
    layer, but a row's float sums then depend on its batch-mates' lengths."""
    tiles: dict[tuple[int, int], list[int]] = {}
    for token, (slot, pos) in enumerate(zip(slots, positions, strict=True)):
        tiles.setdefault((slot, pos // tile_rows), [-1] * tile_rows)[pos % tile_rows] = token
    widest = min((max(positions) // tile_rows + 1) * tile_rows, max_len)
    by_keys: dict[int, list[tuple[int, int, list[int]]]] = {}
    for (slot, tile), rows in tiles.items():
        first = tile * tile_rows
        keys = key_bucket(first + tile_rows, max_len) if invariant else widest
        by_keys.setdefault(keys, []).append((slot, first, rows))
    pad = len(slots)
    groups = []
    for keys, members in by_keys.items():
        rows = [pad if t < 0 else t for _, _, r in members for t in r]
        slot_ids = [slot for slot, _, _ in members]
        contiguous = slot_ids == list(range(slot_ids[0], slot_ids[0] + len(slot_ids)))
        query_pos = torch.tensor([[first + j for j in range(tile_rows)] for _, first, _ in members])
        mask = torch.arange(keys).view(1, 1, keys) <= query_pos.unsqueeze(-1)
        groups.append(
            AttentionGroup(
                rows=torch.tensor(rows, device=device),
                slots=slice(slot_ids[0], slot_ids[-1] + 1)
                if contiguous
                else torch.tensor(slot_ids, device=device),
                keys=keys,
                mask=mask.unsqueeze(1).to(device),
            )
        )
    return groups


@dataclass(frozen=True)
class DecodeGroup:
    """Decode rows that read the same number of cached keys, attended in one SDPA call."""

    rows: torch.Tensor | slice  # batch rows (= KV slots) of the group; a slice when contiguous
    keys: int
    mask: torch.Tensor  # (count, 1, 1, keys) 0 where a key is visible, -inf elsewhere


def slot_order(buckets: list[int]) -> list[int]:
    """A permutation that sorts slots by key bucket, moving only slots out of place: new slot
    i takes old slot perm[i]. Sorted slots make each decode group a contiguous run of slots,
    read as a view of the KV cache instead of a gathered copy."""
    target = sorted(buckets)
    perm = list(range(len(buckets)))
    misplaced = [i for i, (b, t) in enumerate(zip(buckets, target, strict=True)) if b != t]
    holders: dict[int, list[int]] = {}
    for i in misplaced:
        holders.setdefault(buckets[i], []).append(i)
    for i in misplaced:
        perm[i] = holders[target[i]].pop()
    return perm


def take_rows(x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
    """x's rows (dim 0): a view for a slice, else `index_select` (see `cached_keys`)."""
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def decode_plan(
    pos: torch.Tensor,
    order: torch.Tensor,
    groups: tuple[tuple[int, int], ...],
    dtype: torch.dtype,
    contiguous: bool = False,
) -> list[DecodeGroup]:
    """A decode step's attention groups from device tensors alone (no host sync): pos (rows, 1),
    order (rows,) the rows sorted by group, groups ((keys, count), ...) in that order.
    `contiguous`: order is 0..rows-1 (slots sorted by bucket), so each group is a slice.

    The masks are additive, made once a step: SDPA turns a boolean mask into exactly this with
    one `where` per call, i.e. per layer."""
    plan, start = [], 0
    for keys, count in groups:
        rows = slice(start, start + count) if contiguous else order[start : start + count]
        visible = torch.arange(keys, device=pos.device).view(1, 1, 1, keys)
        visible = visible <= take_rows(pos, rows).view(count, 1, 1, 1)
        mask = torch.zeros(visible.shape, dtype=dtype, device=pos.device)
        plan.append(DecodeGroup(rows, keys, mask.masked_fill_(~visible, float("-inf"))))
        start += count
    return plan


def cached_keys(cache: torch.Tensor, slots: torch.Tensor | slice, keys: int) -> torch.Tensor:
    """The first `keys` cached positions of the given slots: (slots, kv_heads, keys, hd); a view
    for a slice of slots, a copy for a tensor of them.

    `index_select` on the sliced view, not `cache[slots, :, :keys]`: the same copy, but advanced
    indexing takes a generic per-element path, 158 vs 23 us at 128 keys and 909 vs 80 us at 512
    for 8 of 32 demo slots (measured), twice a layer in every step whose rows span key buckets.
    """
    return take_rows(cache[:, :, :keys], slots)


def one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention of one query a row: q (rows, heads, 1, hd), k and v (rows, kv_heads, keys, hd),
    mask additive (rows, 1, 1, keys).

    On CPU as two batched matmuls and a softmax, with each KV head's query heads as the rows of
    one matmul (GQA without repeating K/V): SDPA's CPU flash kernel is blocked for long query
    tiles and took 194 us a layer at 16 decode rows against 88 us this way (measured). Each
    (row, KV head) is its own small matmul of a fixed shape, so a row's result does not depend on
    its batch-mates (`tests/cpu/test_batch_invariance.py`). Elsewhere SDPA (GPU kernels)."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
        )
    rows, heads, _, hd = q.shape
    kv = k.shape[1]
    scores = torch.matmul(q.view(rows, kv, heads // kv, hd), k.transpose(-1, -2))
    probs = scores.mul_(hd**-0.5).add_(mask).softmax(-1)
    return torch.matmul(probs, v).view(rows, heads, 1, hd)


class CapturedStep:
    """A decode step captured as one CUDA graph over its bucket's preallocated buffers: the host
    issues one launch a step instead of ~30 layers of small kernels (vLLM and TensorRT-LLM do
    the same). Called with those same buffers, freshly filled."""

    def __init__(
        self, step: Callable[..., torch.Tensor], buffers: torch.Tensor, warmup: int = 2
    ) -> None:
        rows = buffers.shape[1]
        self.args = (buffers[0].view(rows, 1), buffers[1].view(rows, 1), buffers[2])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: lazy inits, autotuning
            for _ in range(warmup):
                step(*self.args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = step(*self.args)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        assert ids.data_ptr() == self.args[0].data_ptr(), "a captured step reads its own buffers"
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites `out`


def step_mode(requested: str, device: torch.device) -> str:
    """How decode steps run: `native` (CPU: the step as one C++ call, `native_step.py`);
    `eager`; `compile` (torch.compile, fullgraph, one graph per batch bucket and key layout);
    `cuda_graph` (captured per bucket). `auto` captures on CUDA and runs natively on CPU (the
    runner falls back to eager where the native step cannot be built or does not cover the
    model)."""
    if requested == "auto":
        return "cuda_graph" if device.type == "cuda" else "native"
    if requested == "cuda_graph" and device.type != "cuda":
        raise ValueError("decode_step 'cuda_graph' needs a CUDA device")
    if requested == "native" and device.type != "cpu":
        raise ValueError("decode_step 'native' is a CPU step")
    if requested not in ("native", "eager", "compile", "cuda_graph"):
        raise ValueError(
            f"decode_step must be auto, native, eager, compile or cuda_graph: {requested!r}"
        )
    return requested


class ModelRunner:
    """Prefill one sequence into a slot; decode one token for slots 0..n-1 at once."""

    def __init__(
        self,
        model: nn.Module,
        max_slots: int,
        max_len: int,
        lm_head: str = "auto",
        prefix_cache_mb: float = 0,
        prefix_block_tokens: int = 16,
        batch_invariant: bool = True,
        decode_step: str = "auto",
    ) -> None:
        cfg = model.config
        arch = ARCHITECTURES.get(cfg.model_type)
        if arch is None:
            raise UnsupportedArchitecture(
                f"model type '{cfg.model_type}' is not supported by the batching engine; "
                f"supported: {', '.join(sorted(ARCHITECTURES))}"
            )
        self.model = model
        self.arch = arch
        self.device = model.device
        self.n_heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_len = min(max_len, cfg.max_position_embeddings)
        self.dtype = next(model.parameters()).dtype
        if not self.dtype.is_floating_point:  # packed int weights first; use the embeddings' dtype
            self.dtype = model.get_input_embeddings().weight.dtype
        layers = model.model.layers
        self.batch_invariant = batch_invariant
        fuse = partial(fuse_projections, tile_rows=QUERY_TILE if batch_invariant else None)
        # Per layer, the modules each fused projection reads: qkv, o, gate_up, down.
        groups = [
            (
                [b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj],
                [b.self_attn.o_proj],
                [b.mlp.gate_proj, b.mlp.up_proj],
                [b.mlp.down_proj],
            )
            for b in layers
        ]
        fused = [[fuse(modules) for modules in layer] for layer in groups]
        qkv, o_proj, gate_up, down = zip(*fused, strict=True)
        self.qkv: list[Projection] = list(qkv)
        self.o_proj: list[Projection] = list(o_proj)
        self.gate_up: list[Projection] = list(gate_up)
        self.down: list[Projection] = list(down)
        # Which int4 kernel the projections run (empty for a model without int4 weights).
        self.int4_kernel = (
            use_native_int4(
                [
                    (p, modules)
                    for ps, ms in zip(fused, groups, strict=True)
                    for p, modules in zip(ps, ms, strict=True)
                ]
            )
            if self.device.type == "cpu"
            else ""
        )
        # F.silu itself where the model's activation is SiLU: a module call per layer costs more
        # than the op at decode sizes.
        self.act = F.silu if cfg.hidden_act == "silu" else layers[0].mlp.act_fn
        head_dtype = lm_head_dtype(lm_head, self.dtype)
        self._lm_head, self.lm_head_path = output_projection(
            model.lm_head, head_dtype, self.device, max_slots
        )
        self.cache = SlotKVCache(
            cfg.num_hidden_layers,
            max_slots,
            self.kv_heads,
            self.max_len,
            self.head_dim,
            self.dtype,
            self.device,
        )
        self.step_mode = step_mode(decode_step, self.device)
        self._native = None
        self.native_unavailable = ""  # why `auto` fell back to eager on CPU, if it did
        if self.step_mode == "native":
            try:
                self._native = native_decoder(self)
            except NativeUnavailable as e:
                if decode_step == "native":
                    raise
                self.native_unavailable = str(e)
                log.warning("%s; decoding with the eager step", e)
                self.step_mode = "eager"
        self._slot_ids = torch.arange(max_slots, device=self.device)
        self._buffers: dict[int, torch.Tensor] = {}
        self._graphs: dict[tuple[int, tuple[tuple[int, int], ...]], CapturedStep] = {}
        self._compiled_hidden = (
            torch.compile(self._decode_hidden, fullgraph=True, dynamic=False)
            if self.step_mode == "compile"
            else self._decode_hidden
        )
        block_bytes = self.cache.bytes_per_token * prefix_block_tokens
        self.prefix_cache = PrefixCache(
            prefix_block_tokens, max_blocks=int(prefix_cache_mb * 1e6 // block_bytes)
        )

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def slots(self) -> int:
        return self.cache.slots

    def reset(self, forget_prefixes: bool = False) -> None:
        """Empty every slot (after a warm-up or a failed step); optionally the prefix cache."""
        self.cache.lengths = [0] * self.cache.slots
        if forget_prefixes:
            self.prefix_cache.clear()

    def release(self, slot: int) -> None:
        """Free a slot; its KV is overwritten by the next prefill there."""
        self.cache.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        """Move a sequence's KV from slot `src` to `dst` (keeps running slots 0..n-1)."""
        self.cache.move(src, dst)

    def order_slots(self, n: int) -> list[int] | None:
        """Sort running slots 0..n-1 by the key bucket of their next decode, so each of the
        step's attention groups reads a view of the cache: new slot i holds old slot perm[i]
        (returned, for the caller's own per-slot state), or None when nothing moved. A sequence
        moves when it crosses into the next bucket (every KEY_BUCKET tokens) or arrives out of
        order; with batch invariance off a step has one group and nothing moves, and the native
        step reads each row's own keys wherever its slot is."""
        if not self.batch_invariant or self._native is not None:
            return None
        perm = slot_order([key_bucket(p + 1, self.max_len) for p in self.cache.lengths[:n]])
        if perm == list(range(n)):
            return None
        self.cache.permute(perm)
        return perm

    def _attention(
        self,
        layer: nn.Module,
        i: int,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        at: StepLayout,
        index: torch.Tensor,
    ) -> torch.Tensor:
        b, s, _ = h.shape
        q, kc, vc = self._project_and_cache(layer, i, h, rope, index)  # q: (b, s, heads, hd)
        out = self._cached_attention(q.reshape(b * s, self.n_heads, -1), kc, vc, at)
        return self.o_proj[i](out.view(b, s, -1))

    def _project_and_cache(
        self,
        layer: nn.Module,
        i: int,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        index: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (..., heads, head_dim) with rope, and layer i's K/V cache with the new keys and
        values written at `index`. h is (batch, seq, hidden), or (rows, hidden) in a decode step,
        where (rows, kv_heads) is already the order the cache index expects."""
        nq, nkv, hd = self.n_heads, self.kv_heads, self.head_dim
        qkv = self.qkv[i](h)
        qk = qkv[..., : (nq + nkv) * hd].unflatten(-1, (nq + nkv, hd))
        v = qkv[..., (nq + nkv) * hd :].unflatten(-1, (nkv, hd))
        if self.arch.qk_norm:
            attn = layer.self_attn
            q, k = rms_norm(attn.q_norm, qk[..., :nq, :]), rms_norm(attn.k_norm, qk[..., nq:, :])
            qk = torch.cat((q, k), dim=-2)
        qk = apply_rope(qk, *rope)
        q, k = qk[..., :nq, :], qk[..., nq:, :]
        if h.dim() == 3:  # the cache index runs (batch, kv_heads, seq)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        kc, vc = self.cache.k[i], self.cache.v[i]
        self.cache.write(kc, index, k)
        self.cache.write(vc, index, v)
        return q, kc, vc

    def _cached_attention(
        self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, at: StepLayout
    ) -> torch.Tensor:
        """q: (tokens, heads, head_dim), its keys already written to the cache. Each group of
        query tiles is one SDPA call over its slots' first `keys` cached keys."""
        tokens, heads, hd = q.shape
        padded = torch.cat([q, q.new_zeros(1, heads, hd)])  # row `tokens`: padding queries
        out = q.new_empty(tokens + 1, heads, hd)
        gqa = self.kv_heads != self.n_heads
        for g in at.groups:
            tiles = g.mask.shape[0]
            qg = padded.index_select(0, g.rows).view(tiles, at.tile_rows, heads, hd).transpose(1, 2)
            kg, vg = cached_keys(kc, g.slots, g.keys), cached_keys(vc, g.slots, g.keys)
            if at.tile_rows == 1:  # the decode step's call, so a token is computed alike there
                additive = torch.zeros(g.mask.shape, dtype=q.dtype, device=q.device)
                og = one_query_attention(qg, kg, vg, additive.masked_fill_(~g.mask, float("-inf")))
            else:
                og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, enable_gqa=gqa)
            out.index_copy_(0, g.rows, og.transpose(1, 2).reshape(-1, heads, hd))
        return out[:tokens].reshape(tokens, heads * hd)

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up[i](h)
        half = gate_up.shape[-1] // 2
        return self.down[i](self.act(gate_up[..., :half]) * gate_up[..., half:])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._lm_head(h).float()

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, at: StepLayout) -> torch.Tensor:
        """ids: (batch, seq). Returns float32 logits (tokens wanted, vocab)."""
        inner = self.model.model
        h = inner.embed_tokens(ids)  # (batch, seq, hidden)
        cos, sin = inner.rotary_emb(h, at.pos)  # (batch, seq, head_dim): broadcast over heads
        rope = rope_tables(cos.unsqueeze(-2), sin.unsqueeze(-2))
        index = self.cache.flat_index(at.slot, at.pos)
        for i, layer in enumerate(inner.layers):
            attn_in = rms_norm(layer.input_layernorm, h)
            h = h + self._attention(layer, i, attn_in, rope, at, index)
            h = h + self._mlp(i, rms_norm(layer.post_attention_layernorm, h))
        h = h.reshape(-1, h.shape[-1])[at.last]
        return self._logits(rms_norm(inner.norm, h))

    def prefill(self, first_slot: int, prompts: list[list[int]], chunk: int = 512) -> torch.Tensor:
        """Write prompts into slots first_slot.. and return each one's last-position logits
        (n, vocab).

        Leading blocks found in the prefix cache are copied in, not recomputed. The rest of
        several prompts goes through as one packed row (no padding; each attends to itself and
        its prefix only), so a burst of arrivals costs one forward instead of one each. A prompt
        with more than `chunk` new tokens goes alone, in chunks over its cache, so activations
        stay bounded.
        """
        cached = []
        for row, p in enumerate(prompts):
            hit = self.prefix_cache.lookup(p)
            cached.append(self.prefix_cache.load(hit, self.cache.k, self.cache.v, first_slot + row))
        if len(prompts) == 1 and len(prompts[0]) - cached[0] > chunk:
            logits = self._prefill_chunked(first_slot, prompts[0], cached[0], chunk)
        else:
            logits = self._prefill_packed(first_slot, prompts, cached)
        for row, p in enumerate(prompts):
            self.cache.lengths[first_slot + row] = len(p)
            self.prefix_cache.store(p, self.cache.k, self.cache.v, first_slot + row)
        return logits

    def _prefill_packed(
        self, first_slot: int, prompts: list[list[int]], cached: list[int]
    ) -> torch.Tensor:
        """All prompts' new tokens as one row; each token attends to its own slot only."""
        slots, positions, last = [], [], []
        for row, (p, c) in enumerate(zip(prompts, cached, strict=True)):
            slots += [first_slot + row] * (len(p) - c)
            positions += range(c, len(p))
            last.append(len(positions) - 1)
        new = [t for p, c in zip(prompts, cached, strict=True) for t in p[c:]]
        return self._forward_tokens(new, slots, positions, QUERY_TILE, last)

    def _prefill_chunked(self, slot: int, ids: list[int], start: int, chunk: int) -> torch.Tensor:
        logits = None
        for off in range(start, len(ids), chunk):
            part = ids[off : off + chunk]
            n = len(part)
            logits = self._forward_tokens(
                part, [slot] * n, list(range(off, off + n)), QUERY_TILE, [n - 1]
            )
        return logits

    def _forward_tokens(
        self,
        ids: list[int],
        slots: list[int],
        positions: list[int],
        tile_rows: int,
        last: list[int],
    ) -> torch.Tensor:
        """One forward over tokens given flat (one row), returning the logits at `last`."""
        dev = self.device
        at = StepLayout(
            slot=torch.tensor([slots], device=dev),
            pos=torch.tensor([positions], device=dev),
            groups=plan_attention(
                slots, positions, tile_rows, self.max_len, dev, self.batch_invariant
            ),
            tile_rows=tile_rows,
            last=torch.tensor(last, device=dev),
        )
        return self._forward(torch.tensor([ids], device=dev), at)

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One step for slots 0..len(tokens)-1, each fed its last token. Returns (n, vocab).

        Host work is done here, once a step: the inputs go into the bucket's preallocated
        buffers in one copy, and the step itself (`_decode_step`) is a function of those buffers
        and a static signature, so it can be compiled or captured as a whole."""
        if self._native is not None:
            return self._native_decode(tokens)
        n = len(tokens)
        positions = self.cache.lengths[:n]
        rows = self._decode_bucket(n)
        groups, order = self._decode_groups(positions, rows)
        contiguous = order == list(range(rows))  # slots sorted by bucket (`order_slots`)
        pad = [0] * (rows - n)
        buf = self._decode_buffers(rows)
        buf.copy_(torch.tensor([tokens + pad, positions + pad, order]))
        # inference_mode is cheaper per op, but torch.compile refuses its tensors as inputs.
        grad_off = torch.no_grad if self.step_mode == "compile" else torch.inference_mode
        with grad_off():
            step = self._step_fn(rows, groups, contiguous)
            logits = step(buf[0].view(rows, 1), buf[1].view(rows, 1), buf[2])
        for i in range(n):
            self.cache.lengths[i] += 1
        return logits[:n]

    @torch.inference_mode()
    def _native_decode(self, tokens: list[int]) -> torch.Tensor:
        """`decode` as one C++ call for the decoder: embeddings and rotary tables here (the
        model's own modules, so every rope variant transformers has), the head after."""
        n = len(tokens)
        pos = torch.tensor(self.cache.lengths[:n], device=self.device)
        inner = self.model.model
        h = inner.embed_tokens(torch.tensor(tokens, device=self.device))
        cos, sin = inner.rotary_emb(h, pos.view(n, 1))
        hidden = self._native.step(h, cos.view(n, -1), sin.view(n, -1), self._slot_ids[:n], pos)
        for i in range(n):
            self.cache.lengths[i] += 1
        return self._logits(hidden)

    def _decode_bucket(self, n: int) -> int:
        """Rows a step of n sequences runs with: n when eager; the next power of two (at most
        the slot count) when the step is compiled or captured, so a handful of static shapes
        serve every batch size. Padding rows use free slots n.. (their KV is overwritten by the
        next prefill there)."""
        if self.step_mode in ("eager", "native"):
            return n
        return min(1 << (n - 1).bit_length(), self.slots)

    def _decode_groups(
        self, positions: list[int], rows: int
    ) -> tuple[tuple[tuple[int, int], ...], list[int]]:
        """Rows grouped by the keys they read: ((keys, count), ...) and the rows in group order.

        The same key buckets as `plan_attention` with one-row tiles, so a decoded token's
        attention is the call it would get alone; without batch invariance every row reads the
        furthest one's keys (rounded up to a bucket when the step is compiled or captured, so
        its shape stays static)."""
        if self.batch_invariant:
            keys = [key_bucket(p + 1, self.max_len) for p in positions]
        elif self.step_mode == "eager":  # exactly the keys needed, as `plan_attention` reads
            keys = [max(positions) + 1] * len(positions)
        else:
            keys = [key_bucket(max(positions) + 1, self.max_len)] * len(positions)
        # Padding rows (position 0, slots n..) join the widest group, which sorts last, so
        # slots sorted by bucket stay contiguous with them.
        keys += [max(keys)] * (rows - len(positions))
        order = sorted(range(rows), key=keys.__getitem__)
        counts: dict[int, int] = {}
        for i in order:
            counts[keys[i]] = counts.get(keys[i], 0) + 1
        return tuple(counts.items()), order

    def _decode_buffers(self, rows: int) -> torch.Tensor:
        """(3, rows) int64 on the device: token ids, positions, row order of the groups."""
        buf = self._buffers.get(rows)
        if buf is None:
            buf = self._buffers[rows] = torch.zeros(3, rows, dtype=torch.long, device=self.device)
        return buf

    def _step_fn(
        self, rows: int, groups: tuple[tuple[int, int], ...], contiguous: bool = False
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The step for one static signature: eager, compiled, or a captured CUDA graph."""
        step = partial(self._decode_step, groups=groups, contiguous=contiguous)
        if self.step_mode == "eager":
            return step
        if self.step_mode == "compile":
            return partial(step, compiled=True)
        key = (rows, groups, contiguous)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = CapturedStep(step, self._decode_buffers(rows))
        return graph

    def _decode_step(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        order: torch.Tensor,
        groups: tuple[tuple[int, int], ...],
        compiled: bool = False,
        contiguous: bool = False,
    ) -> torch.Tensor:
        """ids, pos: (rows, 1), row i in slot i; order: (rows,) rows by group. Returns float32
        logits (rows, vocab). Static shapes for a given (rows, groups), no host synchronisation
        and no data-dependent Python: capture-ready.

        `compiled` runs the decoder compiled and the head eagerly: the CPU lm_head's prepacked
        oneDNN weight is opaque to inductor (it lowers that op only for weights it froze itself),
        and one call is no host overhead."""
        hidden = self._compiled_hidden if compiled else self._decode_hidden
        return self._logits(hidden(ids, pos, order, groups, contiguous))

    def _decode_hidden(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        order: torch.Tensor,
        groups: tuple[tuple[int, int], ...],
        contiguous: bool = False,
    ) -> torch.Tensor:
        """The decoder of `_decode_step`: final normed hidden states (rows, hidden). Activations
        stay 2-D (rows, hidden), so no step reshapes them around the matmuls."""
        inner = self.model.model
        rows = ids.shape[0]
        h = inner.embed_tokens(ids).view(rows, -1)
        rope = rope_tables(*inner.rotary_emb(h, pos))  # (rows, 1, head_dim): broadcast over heads
        index = self.cache.flat_index(self._slot_ids[:rows].view(rows, 1), pos)
        plan = decode_plan(pos, order, groups, self.dtype, contiguous)
        for i, layer in enumerate(inner.layers):
            attn_in = rms_norm(layer.input_layernorm, h)
            h = h + self._decode_attention(layer, i, attn_in, rope, index, plan)
            h = h + self._mlp(i, rms_norm(layer.post_attention_layernorm, h))
        return rms_norm(inner.norm, h)

    def _decode_attention(
        self,
        layer: nn.Module,
        i: int,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        index: torch.Tensor,
        plan: list[DecodeGroup],
    ) -> torch.Tensor:
        """`_attention` for one new token a row: h (rows, hidden)."""
        rows = h.shape[0]
        q, kc, vc = self._project_and_cache(layer, i, h, rope, index)  # q: (rows, heads, hd)
        q = q.unsqueeze(2)  # (rows, heads, 1, hd): one query each
        parts = [
            one_query_attention(
                take_rows(q, g.rows),
                cached_keys(kc, g.rows, g.keys),
                cached_keys(vc, g.rows, g.keys),
                g.mask,
            )
            for g in plan
        ]
        if len(parts) == 1:  # one group is every row, in order: a slice 0..rows
            out = parts[0]
        elif all(isinstance(g.rows, slice) for g in plan):  # slices in row order
            out = torch.cat(parts)
        else:
            out = q.new_empty(q.shape)
            for g, part in zip(plan, parts, strict=True):
                out.index_copy_(0, g.rows, part)
        return self.o_proj[i](out.view(rows, -1))
