"""Abuse limits and health over HTTP, on the real app: anonymous concurrency and token limits,
throttled 401s, client identity behind a trusted proxy, and `/health` while the model is busy.

One app. Auth is on, but `/v1/completions` is a public path, so it serves anonymous clients while
`/v1/chat/completions` needs a key. Each test is its own client: requests leave from 127.0.0.2,
the configured trusted proxy, with the client's address in X-Forwarded-For (127.0.0.1 is not
used for that: Serve's own HTTP server believes X-Forwarded-For from loopback 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.serving import CHAT, audit_records, health_detail, serve_app

pytestmark = pytest.mark.slow  # starts Ray Serve with the demo model

PROXY, STRANGER = "127.0.0.2", "127.0.0.3"
ENV_VAR = "AWQ_SERVE_CLIENT_LIMITS_TEST_KEYS"
KEY = "sk-client-limits-test-0123456789"
CAP = 2  # anonymous requests in flight per client
TOKENS_PER_MINUTE = 300  # per anonymous IP: refills 5 tokens/s
REQUESTS_PER_MINUTE = 10  # per IP, keyed or not


@dataclass(frozen=True)
class App:
    url: str
    audit: Path

    def client(self, source: str = PROXY, **headers: str) -> httpx.Client:
        """A client whose connections leave from `source` (any 127.x address is loopback)."""
        transport = httpx.HTTPTransport(local_address=source)
        return httpx.Client(base_url=self.url, transport=transport, headers=headers, timeout=120)

    def as_client(self, ip: str) -> httpx.Client:
        """Requests from client `ip`, as the trusted proxy forwards them."""
        return self.client(PROXY, **{"X-Forwarded-For": ip})

    def audited_ip(self, request_id: str) -> str:
        record = audit_records(self.audit).get(request_id)
        assert record is not None, f"no audit line for {request_id}"
        return record["client_ip"]


@pytest.fixture(scope="module")
def app(registry_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VAR, KEY)  # before Ray starts: its workers inherit the environment
        with serve_app(
            registry_root,
            audit,
            auth={"enabled": True, "env_var": ENV_VAR,
                  "public_paths": ["/health", "/metrics", "/v1/completions"]},
            rate_limit={"requests_per_minute_per_ip": REQUESTS_PER_MINUTE,
                        "requests_per_minute_per_key": 100_000},
            client_limits={"max_concurrent_per_client": CAP,
                           "tokens_per_minute_per_ip": TOKENS_PER_MINUTE},
            client_identity={"trusted_proxies": [f"{PROXY}/32"]},
        ) as url:  # fmt: skip
            yield App(url, audit)


def completion(max_tokens: int, stream: bool = True, **fields) -> dict:
    return {"model": CHAT, "prompt": "Count to one hundred:", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream, **fields}  # fmt: skip


def read_to_end(response: httpx.Response) -> str:
    return "".join(response.iter_text())


# ---- anonymous limits ------------------------------------------------------------------------
def test_the_request_past_the_concurrency_cap_gets_429_while_the_others_finish(app) -> None:
    with app.as_client("198.51.100.10") as client, contextlib.ExitStack() as streams:
        opened = [
            streams.enter_context(client.stream("POST", "/v1/completions", json=completion(64)))
            for _ in range(CAP)
        ]
        assert [r.status_code for r in opened] == [200] * CAP
        over = client.post("/v1/completions", json=completion(1, stream=False))
        assert over.status_code == 429, over.text
        assert int(over.headers["Retry-After"]) >= 1
        assert over.json()["error"]["code"] == "concurrency_limit_exceeded"
        for r in opened:
            assert read_to_end(r).rstrip().endswith("data: [DONE]")
        # Both slots came back when their streams ended.
        assert client.post("/v1/completions", json=completion(1, stream=False)).status_code == 200


def test_a_client_that_disconnects_mid_stream_gets_its_slot_back(app) -> None:
    client = app.as_client("198.51.100.11")
    with client, client.stream("POST", "/v1/completions", json=completion(100)) as held:
        with client.stream("POST", "/v1/completions", json=completion(100)) as dropped:
            assert (held.status_code, dropped.status_code) == (200, 200)
            next(dropped.iter_lines())
        # `dropped` is closed mid-stream: Serve cancels it and its slot is released.
        for _ in range(6):
            r = client.post("/v1/completions", json=completion(1, stream=False))
            if r.status_code == 200:
                break
            assert r.json()["error"]["code"] == "concurrency_limit_exceeded"
            time.sleep(2)
        assert r.status_code == 200, r.text


def test_the_token_budget_refunds_unused_tokens_and_refuses_once_spent(app) -> None:
    with app.as_client("198.51.100.12") as client:
        # Reserves 291 of 300; stops at the first space, so nearly all of it comes back.
        short = client.post("/v1/completions", json=completion(290, stream=False, ignore_eos=False,
                                                               stop=[" ", "\n"]))  # fmt: skip
        assert short.status_code == 200, short.text
        assert short.json()["usage"]["total_tokens"] < 40
        # Only the refund makes room for this (the refill is 5 tokens/s).
        with client.stream("POST", "/v1/completions", json=completion(250)) as long:
            assert long.status_code == 200
            spent = client.post("/v1/completions", json=completion(100, stream=False))
            assert spent.status_code == 429, spent.text
            assert int(spent.headers["Retry-After"]) >= 1
            assert spent.json()["error"]["type"] == "tokens"
            assert spent.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_MINUTE)
            long.close()


def test_key_guessing_is_throttled_after_the_ip_budget_is_spent(app) -> None:
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    with app.as_client("198.51.100.13") as client:
        codes = [
            client.post("/v1/chat/completions", json=body,
                        headers={"Authorization": f"Bearer sk-guess-{i}"}).status_code
            for i in range(REQUESTS_PER_MINUTE)
        ]  # fmt: skip
        assert codes == [401] * REQUESTS_PER_MINUTE
        throttled = client.post("/v1/chat/completions", json=body,
                                headers={"Authorization": "Bearer sk-guess-last"})  # fmt: skip
        assert throttled.status_code == 429
        assert int(throttled.headers["Retry-After"]) >= 1


# ---- client identity -----------------------------------------------------------------------------
def test_forwarded_for_counts_only_from_the_trusted_proxy(app) -> None:
    ids = {}
    for source, forwarded in ((PROXY, "192.0.2.44"), (STRANGER, "192.0.2.45")):
        ids[source] = uuid.uuid4().hex
        with app.client(source, **{"X-Forwarded-For": forwarded}) as client:
            r = client.post("/v1/completions", json=completion(1, stream=False),
                            headers={"X-Request-Id": ids[source]})  # fmt: skip
            assert r.status_code == 200, r.text
    assert app.audited_ip(ids[PROXY]) == "192.0.2.44"
    assert app.audited_ip(ids[STRANGER]) == STRANGER  # its forged header was not believed


def test_a_forged_forwarded_for_does_not_buy_an_untrusted_client_more_slots(app) -> None:
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(app.client(STRANGER, **{"X-Forwarded-For": f"192.0.2.{i}"}))
                   for i in range(CAP + 1)]  # fmt: skip
        opened = [stack.enter_context(c.stream("POST", "/v1/completions", json=completion(64)))
                  for c in clients[:CAP]]  # fmt: skip
        assert [r.status_code for r in opened] == [200] * CAP
        over = clients[CAP].post("/v1/completions", json=completion(1, stream=False))
        assert over.status_code == 429
        assert over.json()["error"]["code"] == "concurrency_limit_exceeded"


# ---- health ----------------------------------------------------------------------------------
def test_health_answers_200_at_once_while_16_streams_decode(app) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Count to one hundred."}],
            "max_tokens": 256, "ignore_eos": True, "stream": True}  # fmt: skip
    with contextlib.ExitStack() as stack:
        streams = []
        for i in range(16):  # one forwarded client each: 16 requests would spend one IP's budget
            client = stack.enter_context(app.as_client(f"203.0.113.{i + 1}"))
            r = stack.enter_context(client.stream("POST", "/v1/chat/completions", json=body,
                                                  headers=auth))  # fmt: skip
            assert r.status_code == 200
            streams.append(r)
        for r in streams:
            next(r.iter_lines())  # every one is decoding
        with app.as_client("203.0.113.100") as probe:
            for _ in range(3):
                started = time.monotonic()
                health = probe.get("/health", timeout=30)
                elapsed = time.monotonic() - started
                assert health.status_code == 200, health.text
                assert health.json()["models"][CHAT] == {"ready": True, "replicas": 1}
                # The old /health waited on the replica's queue with a 5 s timeout.
                assert elapsed < 2, f"/health took {elapsed:.1f} s under load"
                time.sleep(0.5)
            detail = probe.get("/health?detail=1", headers=auth).json()["models"][CHAT]
            assert detail["ready"] is True and "source" in detail


def test_the_health_detail_needs_a_key_when_auth_is_on(app) -> None:
    with app.as_client("203.0.113.101") as client:
        public = client.get("/health")
        assert public.status_code == 200 and set(public.json()["models"][CHAT]) == {
            "ready",
            "replicas",
        }
        assert client.get("/health?detail=1").status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        entry = health_detail(lambda: client.get("/health?detail=1", headers=auth).json(), CHAT)
        assert entry["source"].startswith(CHAT + ":") and entry["memory_mb"] > 0
        bad = client.get("/health?detail=maybe", headers=auth)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "detail"


# ---- the OpenAPI document ----------------------------------------------------------------------
def test_the_served_openapi_document_has_the_request_bodies(app) -> None:
    from deployments.gateway.router import fastapi_app

    with app.client() as client:
        doc = client.get("/openapi.json").json()
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/v1/completions", "CompletionRequest"),
                        ("/generate", "SeedGenerateRequest")):  # fmt: skip
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{model}"}
    assert doc["components"]["schemas"] == fastapi_app.openapi()["components"]["schemas"]
