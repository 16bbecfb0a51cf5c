"""Hostile input over HTTP against the real app: every answer is < 500 in the OpenAI error shape,
and afterwards the same replica process still serves and still knows the capital of France.

The cases live in benchmarks/hostile_cases.py (the soak script mixes the same ones into traffic).
Tests run in file order: the duplicate-request-id streams first, then the cases (those that
today kill the engine last, so the earlier ones report on their own), then the survival check.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.hostile_cases import CASES, HostileCase
from deployments.app import deployment_name
from tests.serving import CHAT, health_detail, serve_app

pytestmark = pytest.mark.slow  # starts Ray Serve with the demo model

PARIS = {"role": "user", "content": "What is the capital of France?"}
TIMEOUT_S = 60  # per request: a wedged engine fails its case instead of hanging the suite


@dataclass(frozen=True)
class Server:
    url: str
    replicas_at_start: dict[str, Any]


def replica_identity(url: str) -> dict[str, Any]:
    """What identifies the chat model's replica process(es) now.

    `pids`: Ray's actor table (GCS, needs no dashboard), alive replica actors of the model's
    deployment; `dead`: how many of them have died so far (a restart leaves one). `health`: the
    replica's own `/health` entry: `pid` once the replica reports it, else `node_id` and
    `memory_mb` as a weaker check.
    """
    from ray._private import state

    deployment = deployment_name(CHAT)
    actors = [
        a
        for a in state.actors().values()
        if a["ActorClassName"].startswith("ServeReplica:") and deployment in a["ActorClassName"]
    ]
    health = health_detail(lambda: httpx.get(url + "/health?detail=1", timeout=30).json(), CHAT)
    return {
        "pids": sorted(a["Pid"] for a in actors if a["State"] == "ALIVE"),
        "dead": sum(a["State"] == "DEAD" for a in actors),
        "health": health,
    }


@pytest.fixture(scope="module")
def server(registry_root: Path, tmp_path_factory: pytest.TempPathFactory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    # The shipped config: anonymous clients, ignore_eos refused.
    with serve_app(registry_root, audit_path=audit, allow_ignore_eos=False) as url:
        yield Server(url, replica_identity(url))


def send(url: str, case: HostileCase) -> httpx.Response:
    return httpx.request(
        case.method,
        url + case.path,
        content=case.body,
        headers=case.request_headers(),
        timeout=TIMEOUT_S,
    )


def assert_openai_error(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        pytest.fail(f"{r.status_code} without a JSON body: {r.text[:300]!r}")
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"].strip(), err
    return err


def test_there_are_at_least_40_distinct_cases() -> None:
    assert len({c.name for c in CASES}) >= 40
    assert {c.path for c in CASES} >= {
        "/v1/chat/completions",
        "/v1/completions",
        "/generate",
        "/v1/models",
        "/health",
    }


def stream_chat(request_id: str, max_tokens: int) -> dict[str, Any]:
    return {
        "url": "/v1/chat/completions",
        "headers": {"X-Request-Id": request_id},
        "json": {
            "model": CHAT,
            "messages": [{"role": "user", "content": "Count from 1 to 100, one per line."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        },
    }


async def read_stream(client: httpx.AsyncClient, request: dict, stop_after: int | None = None):
    """(status, data lines): the whole stream, or only `stop_after` lines, then disconnect."""
    lines: list[str] = []
    async with client.stream("POST", **request) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if stop_after is not None and len(lines) >= stop_after:
                    break
    return r.status_code, lines


def finished_normally(lines: list[str]) -> bool:
    if not lines or lines[-1] != "[DONE]":
        return False
    events = [json.loads(line) for line in lines[:-1]]
    reasons = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")]
    return not any("error" in e for e in events) and reasons[-1] in {"stop", "length"}


def test_concurrent_streams_with_the_same_request_id_both_complete(server: Server) -> None:
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as client:
            return await asyncio.gather(
                read_stream(client, stream_chat("dup-id-1", 24)),
                read_stream(client, stream_chat("dup-id-1", 24)),
            )

    for status, lines in asyncio.run(run()):
        assert status == 200
        assert finished_normally(lines), lines[-3:]


def test_a_disconnected_stream_does_not_cancel_another_with_the_same_request_id(
    server: Server,
) -> None:
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT_S) as client:
            survivor = asyncio.create_task(read_stream(client, stream_chat("dup-id-2", 48)))
            await read_stream(client, stream_chat("dup-id-2", 48), stop_after=3)
            return await survivor

    status, lines = asyncio.run(run())
    assert status == 200
    assert finished_normally(lines), lines[-3:]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_request_gets_a_client_error_never_a_5xx(server: Server, case: HostileCase) -> None:
    r = send(server.url, case)
    assert r.status_code < 500, f"{case.name}: {r.status_code} {r.text[:300]!r}"
    if case.invalid:
        assert r.status_code >= 400, f"{case.name}: accepted ({r.status_code}) {r.text[:200]!r}"
    if r.status_code >= 400:
        err = assert_openai_error(r)
        if case.mentions and r.status_code == 400:
            assert re.search(rf"\b{re.escape(case.mentions)}\b", err["message"]), err


def test_same_replica_process_still_serves_and_knows_paris(server: Server) -> None:
    """Run last (file order): nothing above may have restarted or killed the replica."""
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": CHAT, "messages": [PARIS], "max_tokens": 32, "temperature": 0},
        timeout=TIMEOUT_S,
    )
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]
    now, start = replica_identity(server.url), server.replicas_at_start
    assert now["pids"] == start["pids"], "a replica process was replaced"
    assert now["dead"] == start["dead"] == 0, "a replica process died"
    assert now["health"]["healthy"] is True
    if "pid" in start["health"]:
        assert now["health"]["pid"] == start["health"]["pid"]
    else:
        # TODO(lead): drop this branch once ModelServer.info() reports "pid".
        assert now["health"]["node_id"] == start["health"]["node_id"]
        assert now["health"]["memory_mb"] > 0.5 * start["health"]["memory_mb"]
