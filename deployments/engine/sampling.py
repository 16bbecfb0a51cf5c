"""Next-token sampling for a batch of rows, each with its own parameters."""

from __future__ import annotations

import torch

from deployments.protocol import SamplingParams


def filter_logits(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor,
    top_p: float | torch.Tensor,
) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering.

    `logits` is one row (vocab,) or a batch (rows, vocab); each parameter is a scalar or one value
    per row. Batched, so a step with 16 sampled rows costs a few tensor ops, not 16 vocab sorts.
    """
    one_row = logits.dim() == 1
    x = logits.unsqueeze(0) if one_row else logits
    rows = x.shape[0]
    t = torch.as_tensor(temperature, dtype=x.dtype).reshape(-1, 1).expand(rows, 1)
    k = torch.as_tensor(top_k).reshape(-1).expand(rows)
    p = torch.as_tensor(top_p, dtype=x.dtype).reshape(-1).expand(rows)
    x = _top_p(_top_k(x / t, k), p)
    return x[0] if one_row else x


def _top_k(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    vocab = x.shape[-1]
    active = (k > 0) & (k < vocab)
    if not active.any():
        return x
    largest = int(k[active].max())
    values = torch.topk(x, largest, dim=-1).values
    kth = values.gather(1, (k.clamp(1, largest) - 1).unsqueeze(1))
    kth = kth.masked_fill(~active.unsqueeze(1), float("-inf"))
    return x.masked_fill(x < kth, float("-inf"))


# Nucleus candidates looked at first: a top-p set is almost always far smaller than the vocab, so
# a partial top-k replaces a full sort; rows whose nucleus is larger get the full sort.
NUCLEUS_CANDIDATES = 1024


def _top_p(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    active = p < 1.0
    if not active.any():
        return x
    probs = x.softmax(-1)
    candidates = min(NUCLEUS_CANDIDATES, x.shape[-1])
    values, order = torch.topk(probs, candidates, dim=-1)  # descending
    if bool((values.sum(-1) < p)[active].any()):
        values, order = torch.sort(probs, dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token); ties are
    # cut by rank, as a sort-based nucleus does.
    keep = (values.cumsum(-1) - values) < p.unsqueeze(1)
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, keep)
    return x.masked_fill(~(kept | ~active.unsqueeze(1)), float("-inf"))


def sample_next(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Next token per row of (batch, vocab) logits, each row with its own parameters."""
    out = logits.argmax(-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    chosen = [params[i] for i in rows]
    probs = filter_logits(
        logits[rows],
        torch.tensor([p.temperature for p in chosen]),
        torch.tensor([p.top_k for p in chosen]),
        torch.tensor([p.top_p for p in chosen]),
    ).softmax(-1)
    # Inverse-CDF draw: one uniform per row against the row's cumulative probabilities, for all
    # rows in one pass. A seeded row draws from its own generator, so its tokens do not depend on
    # which requests share the batch.
    uniform = torch.rand(len(rows), 1)
    for j, i in enumerate(rows):
        if generators[i] is not None:
            uniform[j] = torch.rand(1, generator=generators[i])
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_max(cdf.shape[-1] - 1)
    for j, token in zip(rows, picked.squeeze(1).tolist(), strict=True):
        out[j] = token
    return out


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g
