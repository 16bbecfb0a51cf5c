"""One sequence's output text: detokenize, find stop strings, group pieces for streaming.

Pure text work, no torch: the engine feeds token ids and gets back the pieces to send.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


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


class TextStream:
    """Tokens in, text pieces out. `interval` tokens are grouped into one piece after the first
    (vLLM's stream_interval): each piece crosses two Ray hops and an SSE write."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]) -> None:
        self.decode = decode
        self.tokens: list[int] = []
        self.stop = StopChecker(stop)
        self.unsent = ""
        self.unsent_tokens = 0
        # Incremental detokenization (vLLM's and TGI's): decoding all tokens after each one costs
        # O(length) a token (352 us at 2,048 tokens with the demo tokenizer, per sequence and
        # step). Only tokens from `_prefix` on are decoded; the text of tokens[:_read] is settled.
        self._prefix = self._read = 0
        self._settled = ""  # decode(tokens[:_read])
        self._prefix_text = ""  # decode(tokens[_prefix:_read])

    def text(self) -> str:
        """The decoded text of all tokens so far, from a window of the last few.

        The window starts one settled stretch back, so a tokenizer that treats a sequence's first
        token specially (a leading space dropped) does so alike in both decodes it compares.
        Text is settled only at a whole character, never inside a multi-byte one."""
        window = self.decode(self.tokens[self._prefix :])
        if not window.startswith(self._prefix_text):  # a tokenizer this does not fit: all of it
            return self.decode(self.tokens)
        text = self._settled + window[len(self._prefix_text) :]
        if not text.endswith("\ufffd"):
            self._settled, self._prefix, self._read = text, self._read, len(self.tokens)
            self._prefix_text = self.decode(self.tokens[self._prefix : self._read])
        return text

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string was reached (the text ends before it)."""
        self.tokens.append(token)
        delta, stopped = self.stop.feed(self.text())
        self.unsent += delta
        self.unsent_tokens += 1
        return stopped

    def ready(self, interval: int) -> str:
        """The piece to send now ("" to keep buffering); the first token is never held."""
        if self.unsent and (len(self.tokens) == 1 or self.unsent_tokens >= interval):
            piece, self.unsent, self.unsent_tokens = self.unsent, "", 0
            return piece
        return ""

    def rest(self, stopped: bool) -> str:
        """Everything not sent yet, at the end of the generation."""
        tail = "" if stopped else self.stop.flush()
        piece, self.unsent = self.unsent + tail, ""
        return piece
