"""Streaming clients for the fault tests: each reads one SSE completion in a thread and records
how it ended (finish_reason and [DONE], an SSE error event, or a cut connection)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.serving import CHAT

PROMPT = "Write a long story about a lighthouse keeper."


@dataclass
class Stream:
    status: int | None = None
    events: list[str] = field(default_factory=list)  # the `data:` payloads, in order
    transport_error: str | None = None  # e.g. "Server disconnected without sending a response"
    started: threading.Event = field(default_factory=threading.Event)  # first event read
    ended: threading.Event = field(default_factory=threading.Event)
    ended_at: float | None = None

    def payloads(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self.events if e != "[DONE]"]

    @property
    def done(self) -> bool:
        return self.events[-1:] == ["[DONE]"]

    @property
    def finish_reason(self) -> str | None:
        reasons = [c["choices"][0].get("finish_reason") for c in self.payloads() if "choices" in c]
        return next((r for r in reversed(reasons) if r), None)

    @property
    def error(self) -> dict[str, Any] | None:
        """The SSE error event's `error` object, if the stream ended with one."""
        return next((p["error"] for p in self.payloads() if "error" in p), None)

    def summary(self) -> str:
        return (
            f"status={self.status} events={len(self.events)} reason={self.finish_reason} "
            f"done={self.done} error={self.error} transport={self.transport_error}"
        )


def open_stream(base_url: str, max_tokens: int, headers: dict[str, str] | None = None) -> Stream:
    """Start a streamed completion decoding `max_tokens` tokens (ignore_eos) in a thread."""
    stream = Stream()
    body = {"model": CHAT, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}  # fmt: skip

    def read() -> None:
        try:
            with httpx.stream("POST", base_url + "/v1/completions", json=body,
                              headers=headers, timeout=300) as r:  # fmt: skip
                stream.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        stream.events.append(line[len("data: ") :])
                        stream.started.set()
        except httpx.HTTPError as e:
            stream.transport_error = str(e) or type(e).__name__
        finally:
            stream.ended_at = time.monotonic()
            stream.started.set()
            stream.ended.set()

    threading.Thread(target=read, daemon=True).start()
    return stream


def wait_all(
    streams: list[Stream], what: Callable[[Stream], threading.Event], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    for s in streams:
        assert what(s).wait(max(0.0, deadline - time.monotonic())), (
            f"no event within {timeout_s}s: {s.summary()}"
        )


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until `condition` held; fails the test past `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"timed out after {timeout_s}s: {what}"
        time.sleep(0.5)
    return time.monotonic() - started
