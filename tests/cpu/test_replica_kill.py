"""SIGKILL of the model replica under 12 streams: every cut stream ends at once with an SSE error
event (no hang, no silent disconnect), and Serve brings a replica back; the time until a new
request succeeds again is printed."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving import CHAT, health_detail, serve_app
from tests.streams import open_stream, wait_all, wait_until

pytestmark = pytest.mark.slow  # starts Ray Serve with the demo model

STREAMS = 12
MAX_TOKENS = 256  # still decoding when the replica dies
CUT_S = 30  # generous: a dead actor reaches the router's stream within a second or two
RECOVER_S = 240  # Serve notices the death, starts a replica, which loads the model


@pytest.fixture(scope="module")
def base_url(registry_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with serve_app(registry_root, audit_path=audit) as url:
        yield url


def replica_pid(base_url: str, other_than: int | None = None) -> int:
    """The model replica's pid as /health's detail reports it (polled: it lags a replacement)."""

    def fetch() -> dict:
        return httpx.get(base_url + "/health?detail=1", timeout=30).json()

    def new(m: dict) -> bool:
        return m.get("pid") is not None and m["pid"] != other_than

    return health_detail(fetch, CHAT, new)["pid"]


def answers(base_url: str) -> bool:
    body = {"model": CHAT, "prompt": "Hello", "max_tokens": 4}
    try:
        return httpx.post(base_url + "/v1/completions", json=body, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigkill_mid_stream_ends_every_stream_with_an_error_event_then_recovers(base_url) -> None:
    pid = replica_pid(base_url)
    streams = [open_stream(base_url, MAX_TOKENS) for _ in range(STREAMS)]
    wait_all(streams, lambda s: s.started, 120)
    assert not any(s.ended.is_set() for s in streams), "streams must be mid-way at the kill"
    os.kill(pid, signal.SIGKILL)  # the pid our own app reported
    killed = time.monotonic()

    wait_all(streams, lambda s: s.ended, CUT_S)
    cut_s = max(s.ended_at or killed for s in streams) - killed
    wait_until(lambda: answers(base_url), RECOVER_S, "a new request to succeed")
    print(f"all {STREAMS} streams ended {cut_s:.2f}s after SIGKILL; "
          f"a new request succeeded {time.monotonic() - killed:.1f}s after it")  # fmt: skip

    for s in streams:
        assert s.status == 200 and s.transport_error is None, s.summary()
        assert s.error is not None and s.error["code"] == "replica_died", s.summary()
        assert not s.done and s.finish_reason is None, s.summary()
    replica_pid(base_url, other_than=pid)  # the replacement is another process
