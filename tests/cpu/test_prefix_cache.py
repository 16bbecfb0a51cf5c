"""Prefix cache bookkeeping: block naming, lookup limits, LRU eviction (pure, no model)."""

from __future__ import annotations

import torch

from deployments.engine.prefix_cache import PrefixCache, block_keys

LAYERS, KV, HD, SLOTS, MAX_LEN = 2, 1, 4, 3, 64


def kv() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shape = (SLOTS, KV, MAX_LEN, HD)
    return [torch.randn(shape) for _ in range(LAYERS)], [torch.randn(shape) for _ in range(LAYERS)]


def test_block_keys_name_a_block_by_everything_before_it() -> None:
    a = block_keys(list(range(40)), 8)
    assert len(a) == 5
    assert block_keys([*list(range(40)), 7, 7], 8) == a  # a partial block gets no key
    changed = block_keys([99, *list(range(1, 40))], 8)
    assert all(x != y for x, y in zip(a, changed, strict=True))  # an early token changes all


def test_lookup_copies_the_shared_blocks_and_leaves_a_token_to_compute() -> None:
    k, v = kv()
    cache = PrefixCache(block_tokens=8, max_blocks=16)
    prompt = list(range(24))
    cache.store(prompt, k, v, slot=0)
    # Same 24 tokens: only 2 of 3 blocks are usable, the last position must be computed.
    assert len(cache.lookup(prompt)) == 2
    other = [*range(16), 500, 501, 502]  # shares the first two blocks
    hit = cache.lookup(other)
    placed = cache.load(hit, k, v, slot=2)
    assert placed == 16
    for layer in range(LAYERS):
        torch.testing.assert_close(k[layer][2, :, :16], k[layer][0, :, :16])
        torch.testing.assert_close(v[layer][2, :, :16], v[layer][0, :, :16])
    assert cache.stats.hits == 32


def test_least_recently_used_blocks_are_evicted_first() -> None:
    k, v = kv()
    cache = PrefixCache(block_tokens=8, max_blocks=2)
    first, second = [*list(range(8)), 0], [*list(range(100, 108)), 0]
    cache.store(first, k, v, slot=0)
    cache.store(second, k, v, slot=1)
    cache.lookup(first)  # touch: `second` is now the oldest
    cache.store([*list(range(200, 208)), 0], k, v, slot=2)
    assert len(cache.lookup(first)) == 1
    assert cache.lookup(second) == []
    assert cache.stats.blocks == 2


def test_a_zero_budget_turns_caching_off() -> None:
    k, v = kv()
    cache = PrefixCache(block_tokens=8, max_blocks=0)
    cache.store(list(range(17)), k, v, slot=0)
    assert cache.lookup(list(range(17))) == []
