"""Overload, deadlines and disconnects on the real app: JSON errors, never a hang."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving import CHAT, serve_app

pytestmark = pytest.mark.slow  # starts Ray Serve with the demo model

LONG = {
    "model": CHAT,
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "temperature": 0,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def base_url(registry_root: Path, tmp_path_factory: pytest.TempPathFactory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with serve_app(
        registry_root,
        audit_path=audit,
        request_timeout_s=10,
        model_overrides={"max_ongoing_requests": 2, "max_queued_requests": 1},
    ) as url:
        yield url


def detail(base_url: str) -> Callable[[], dict[str, Any]]:
    return lambda: httpx.get(base_url + "/health?detail=1", timeout=30).json()


def running(base_url: str) -> int | None:
    # The detail's queue depth is as the router last polled it (every few seconds); None until
    # a poll has reached the replica (the first ones can land while it is loading or full).
    return detail(base_url)()["models"][CHAT].get("running")


def wait_idle(base_url: str, deadline_s: float = 30) -> int | None:
    end = time.monotonic() + deadline_s
    while (n := running(base_url)) != 0 and time.monotonic() < end:
        time.sleep(0.2)
    return n


def test_overload_gets_503_with_retry_after_and_nothing_hangs(base_url: str) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post("/v1/chat/completions", json={**LONG, "max_tokens": 8})
                    for _ in range(8)
                )
            )

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "overloaded"
    assert wait_idle(base_url) == 0


def test_request_over_the_deadline_gets_504_json_and_frees_its_slot(base_url: str) -> None:
    r = httpx.post(base_url + "/v1/chat/completions", json={**LONG, "max_tokens": 1800}, timeout=60)
    assert r.status_code == 504
    assert r.json()["error"]["type"] == "timeout"
    assert wait_idle(base_url) == 0


def test_client_disconnect_stops_generation_within_seconds(base_url: str) -> None:
    body = {**LONG, "max_tokens": 1800, "stream": True}
    seen_running = False
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        # Keep reading while /health's detail (polled each second) catches up with the stream.
        for i, _ in enumerate(r.iter_lines()):
            if i % 8 == 0 and running(base_url) == 1:
                seen_running = True
                break
    assert seen_running, "the stream never showed as running"
    # Well before the app's 10 s request deadline would end it: the disconnect did.
    assert wait_idle(base_url, deadline_s=5) == 0
