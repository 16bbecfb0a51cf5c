"""Batched forward passes over a slot KV cache, for continuous batching (no Ray here).

The model is loaded by transformers, so every Linear is whatever kernel the hardware gets (AWQ
artifacts: gptqmodel's aten int4 kernel on CPU, its CUDA kernels on GPU). This module only re-wires
the decoder blocks (gpt-fast style) so sequences of different lengths share one decode step:
sequence i lives in KV slot i, and the running set always occupies slots 0..n-1 (a finished
sequence's slot is refilled by moving the last one down), so each step reads one contiguous view.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


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


def pick_device(requested: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without it is an error, not a fallback."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA device is visible")
    return torch.device(requested)


def load_model(model_dir: Path, device: torch.device) -> tuple[nn.Module, object]:
    """Load model and tokenizer; fp16 on GPU, fp32 on CPU (fp16 matmuls are slow on CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, device_map=str(device), attn_implementation="sdpa"
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos/sin: (batch, seq, head_dim)."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


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
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = [0] * slots
        self.max_len = max_len

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def bytes_in_use(self) -> int:
        per_token = sum(t[0, :, 0].numel() * t.element_size() for t in self.k + self.v)
        return per_token * sum(self.lengths)

    def write(
        self, cache: torch.Tensor, first_slot: int, pos: torch.Tensor, new: torch.Tensor
    ) -> None:
        """Store `new` (batch, kv_heads, seq, head_dim) at positions `pos` (batch, seq) of slots
        first_slot.. . A flat `index_copy_` is several times faster on CPU than advanced-index
        assignment with per-row positions."""
        b, kv, s, hd = new.shape
        slot = torch.arange(first_slot, first_slot + b, device=new.device).view(b, 1, 1)
        head = torch.arange(kv, device=new.device).view(1, kv, 1)
        flat = ((slot * kv + head) * self.max_len + pos.view(b, 1, s)).reshape(-1)
        cache.view(-1, hd).index_copy_(0, flat, new.reshape(-1, hd))

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into `dst` (used to keep the running set contiguous)."""
        n = self.lengths[src]
        for t in self.k + self.v:
            t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0


class ModelRunner:
    """Prefill one sequence into a slot; decode one token for slots 0..n-1 at once."""

    def __init__(self, model: nn.Module, max_slots: int, max_len: int) -> None:
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
        self.cache = SlotKVCache(
            cfg.num_hidden_layers,
            max_slots,
            self.kv_heads,
            self.max_len,
            self.head_dim,
            self.dtype,
            self.device,
        )

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def _attention(
        self,
        layer: nn.Module,
        i: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: slice,
        pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        attn = layer.self_attn
        b, s, _ = h.shape
        q = attn.q_proj(h).view(b, s, self.n_heads, self.head_dim)
        k = attn.k_proj(h).view(b, s, self.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.arch.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (b, heads, s, head_dim)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (b, kv_heads, s, head_dim)
        kc, vc = self.cache.k[i], self.cache.v[i]
        self.cache.write(kc, slots.start, pos, k)
        self.cache.write(vc, slots.start, pos, v)
        span = mask.shape[-1]
        out = F.scaled_dot_product_attention(
            q,
            kc[slots, :, :span],
            vc[slots, :, :span],
            attn_mask=mask,
            enable_gqa=self.kv_heads != self.n_heads,
        )
        return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    @torch.inference_mode()
    def _forward(
        self,
        ids: torch.Tensor,
        slots: slice,
        pos: torch.Tensor,
        mask: torch.Tensor,
        last_only: bool,
    ) -> torch.Tensor:
        """ids/pos: (batch, seq); mask: (batch, 1, seq, span) bool. Returns float32 logits."""
        inner = self.model.model
        h = inner.embed_tokens(ids)  # (batch, seq, hidden)
        cos, sin = inner.rotary_emb(h, pos)
        for i, layer in enumerate(inner.layers):
            h = h + self._attention(layer, i, layer.input_layernorm(h), cos, sin, slots, pos, mask)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if last_only:
            h = h[:, -1:]
        return self.model.lm_head(inner.norm(h)).float()  # (batch, seq', vocab)

    def prefill(self, slot: int, ids: list[int], chunk: int = 512) -> torch.Tensor:
        """Write a prompt's K/V into `slot` (in chunks) and return the last position's logits."""
        start = self.cache.lengths[slot]
        logits = None
        for off in range(0, len(ids), chunk):
            part = torch.tensor([ids[off : off + chunk]], device=self.device)  # (1, n)
            n = part.shape[1]
            pos = torch.arange(start + off, start + off + n, device=self.device).unsqueeze(0)
            span = start + off + n
            keys = torch.arange(span, device=self.device)
            mask = (keys.unsqueeze(0) <= pos[0].unsqueeze(1)).view(1, 1, n, span)
            logits = self._forward(part, slice(slot, slot + 1), pos, mask, last_only=True)
        self.cache.lengths[slot] = start + len(ids)
        return logits[0, -1]

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One step for slots 0..len(tokens)-1, each fed its last token. Returns (n, vocab)."""
        n = len(tokens)
        lengths = torch.tensor(self.cache.lengths[:n], device=self.device)
        pos = lengths.unsqueeze(1)  # (n, 1)
        span = int(lengths.max()) + 1
        keys = torch.arange(span, device=self.device)
        mask = (keys.unsqueeze(0) <= lengths.unsqueeze(1)).view(n, 1, 1, span)
        ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
        logits = self._forward(ids, slice(0, n), pos, mask, last_only=False)
        for i in range(n):
            self.cache.lengths[i] += 1
        return logits[:, -1]
