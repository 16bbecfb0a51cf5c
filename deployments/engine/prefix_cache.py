"""Automatic prefix caching: prompts that start alike (a system prompt, a chat template, few-shot
examples) reuse the keys and values already computed for that start instead of prefilling it again.

As in vLLM, the unit is a full block of `block_tokens` tokens, named by a hash chained over every
token before it, so a block is only ever reused after the very same prefix. Blocks live in an LRU
store of their own (copied out of a slot after its prefill, copied into a new slot on a hit), which
fits the engine's slot KV layout: a slot stays one contiguous run of positions.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def block_keys(ids: Sequence[int], block_tokens: int) -> list[bytes]:
    """Chained digests of each full block of `ids`: key i names tokens 0 .. (i+1)*block - 1."""
    keys: list[bytes] = []
    parent = b""
    for start in range(0, len(ids) - block_tokens + 1, block_tokens):
        block = ids[start : start + block_tokens]
        digest = hashlib.sha256(parent + b"".join(t.to_bytes(4, "little") for t in block))
        parent = digest.digest()
        keys.append(parent)
    return keys


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which served from the cache
    blocks: int = 0


class PrefixCache:
    """LRU store of per-block KV, (layers, 2, kv_heads, block_tokens, head_dim) each."""

    def __init__(self, block_tokens: int, max_blocks: int) -> None:
        self.block_tokens = block_tokens
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.stats = PrefixCacheStats()

    def lookup(self, ids: Sequence[int]) -> list[bytes]:
        """Keys of the longest cached run of leading blocks, always leaving one token to compute
        (the last prompt position's logits are needed to sample)."""
        usable = block_keys(ids[:-1], self.block_tokens) if self.max_blocks else []
        hit: list[bytes] = []
        for key in usable:
            if key not in self._blocks:
                break
            self._blocks.move_to_end(key)
            hit.append(key)
        self.stats.queries += len(ids)
        self.stats.hits += len(hit) * self.block_tokens
        return hit

    def load(
        self, keys: list[bytes], k: list[torch.Tensor], v: list[torch.Tensor], slot: int
    ) -> int:
        """Copy cached blocks into positions 0.. of `slot`; returns the tokens placed."""
        b = self.block_tokens
        for n, key in enumerate(keys):
            block = self._blocks[key]
            for layer, (kc, vc) in enumerate(zip(k, v, strict=True)):
                kc[slot, :, n * b : (n + 1) * b] = block[layer, 0]
                vc[slot, :, n * b : (n + 1) * b] = block[layer, 1]
        return len(keys) * b

    def store(
        self, ids: Sequence[int], k: list[torch.Tensor], v: list[torch.Tensor], slot: int
    ) -> None:
        """Keep the full blocks of a just-prefilled prompt that are not cached yet."""
        if not self.max_blocks:
            return
        b = self.block_tokens
        for n, key in enumerate(block_keys(ids, b)):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            span = slice(n * b, (n + 1) * b)
            pairs = zip(k, v, strict=True)
            self._blocks[key] = torch.stack(
                [torch.stack([kc[slot, :, span], vc[slot, :, span]]) for kc, vc in pairs]
            )
            if len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
        self.stats.blocks = len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()
        self.stats = PrefixCacheStats()
