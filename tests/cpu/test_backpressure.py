"""Overload, deadlines and disconnects on the real app: JSON errors, never a hang."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving import CHAT, audit_records, health_detail, serve_app
from tests.streams import wait_until

pytestmark = pytest.mark.slow  # starts Ray Serve with the demo model

LONG = {
    "model": CHAT,
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "temperature": 0,
    "ignore_eos": True,
}


DEADLINE_S = 10  # the app's request_timeout_s


@pytest.fixture(scope="module")
def audit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def base_url(registry_root: Path, audit: Path):
    with serve_app(
        registry_root,
        audit_path=audit,
        request_timeout_s=DEADLINE_S,
        model_overrides={"max_ongoing_requests": 2, "max_queued_requests": 1},
    ) as url:
        yield url


def detail(base_url: str) -> Callable[[], dict[str, Any]]:
    return lambda: httpx.get(base_url + "/health?detail=1", timeout=30).json()


def running(base_url: str) -> int | None:
    # The detail's queue depth is as the router last polled it (every few seconds); None until
    # a poll has reached the replica (the first ones can land while it is loading or full).
    return detail(base_url)()["models"][CHAT].get("running")


def wait_idle(base_url: str, deadline_s: float = 30) -> None:
    """Until the detail shows no sequence running; fails on the deadline."""
    health_detail(detail(base_url), CHAT, lambda m: m.get("running") == 0, deadline_s)


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
    wait_idle(base_url)


def test_request_over_the_deadline_gets_504_json_and_frees_its_slot(base_url: str) -> None:
    r = httpx.post(base_url + "/v1/chat/completions", json={**LONG, "max_tokens": 1800}, timeout=60)
    assert r.status_code == 504
    assert r.json()["error"]["type"] == "timeout"
    wait_idle(base_url)


def test_client_disconnect_stops_generation_within_seconds(base_url: str, audit: Path) -> None:
    body = {**LONG, "max_tokens": 1800, "stream": True}
    seen_running = False
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        # Keep reading while /health's detail (polled every few seconds) catches up.
        for i, _ in enumerate(r.iter_lines()):
            if i % 8 == 0 and running(base_url) == 1:
                seen_running = True
                break
    disconnected = time.time()
    assert seen_running, "the stream never showed as running"
    # The disconnect ended it (499), not the app's deadline (504), and within seconds of the
    # disconnect: the audit line is written when the request ends. (How long the client read
    # first depends on the detail's poll period, so the request's own latency says nothing.)
    wait_until(lambda: audit_records(audit).get(request_id) is not None, 30, "the audit line")
    record = audit_records(audit).get(request_id)
    assert record["status"] == 499, record
    ended = datetime.fromisoformat(record["time"]).timestamp()
    assert ended - disconnected < 5, (ended - disconnected, record)
    wait_idle(base_url)
