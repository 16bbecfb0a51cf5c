"""Per-request sampling and stop conditions as pure functions."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering of one row of logits."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Next token per row of (batch, vocab) logits, each row with its own parameters."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for i, p in enumerate(params):
        if p.greedy:
            out.append(greedy[i])
            continue
        probs = filter_logits(logits[i], p.temperature, p.top_k, p.top_p).softmax(-1)
        out.append(int(torch.multinomial(probs, 1, generator=generators[i])))
    return out


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@dataclass
class StopChecker:
    """Finds a stop string in the growing text; holds back text that might start one."""

    stop: tuple[str, ...]
    emitted: int = 0
    text: str = field(default="")

    def feed(self, text: str) -> tuple[str, bool]:
        """Given the full decoded text so far, return (new text safe to emit, stopped)."""
        self.text = text
        # The earliest match wins: a later stop string must not let an earlier one through.
        hits = [at for s in self.stop if (at := text.find(s)) != -1]
        if hits:
            at = min(hits)
            delta = text[self.emitted : at]
            self.emitted = at
            return delta, True
        hold = max((len(s) - 1 for s in self.stop), default=0)
        # Text that could still be the start of a stop string stays unsent.
        safe_end = len(text)
        for k in range(min(hold, len(text)), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stop):
                safe_end = len(text) - k
                break
        # A replacement char means a multi-byte character is not complete yet.
        while safe_end > self.emitted and text[safe_end - 1] == "\ufffd":
            safe_end -= 1
        delta = text[self.emitted : max(safe_end, self.emitted)]
        self.emitted = max(safe_end, self.emitted)
        return delta, False

    def flush(self) -> str:
        delta = self.text[self.emitted :].rstrip("\ufffd")
        self.emitted = len(self.text)
        return delta
