"""The router's gate on real requests (Starlette `Request`s, no server): the IP pays before the
key is checked, anonymous clients meet their concurrency cap and token budget, and `finish`
gives back exactly what a request did not use, once."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.requests import Request

from deployments.config import AppArgs
from deployments.errors import ApiError
from deployments.gateway.admission import CLIENT_CLOSED, Admission, Call, estimate_prompt_tokens
from deployments.gateway.schemas import CompletionRequest
from deployments.metrics import RouterMetrics
from deployments.protocol import Finished, Usage

MODEL = "m"
KEY = "sk-admission-test-0123456789"
ENV_VAR = "AWQ_SERVE_ADMISSION_TEST_KEYS"
PROXY = "10.0.0.5"


def admission(**overrides: Any) -> Admission:
    raw = {"models": [{"name": MODEL, "source": "/nonexistent"}], **overrides}
    args = AppArgs.model_validate(raw)
    return Admission(args, RouterMetrics({MODEL: 0.0}))


def request(
    body: dict[str, Any] | None = None,
    peer: str = "203.0.113.5",
    headers: dict[str, str] | None = None,
    path: str = "/v1/completions",
) -> Request:
    raw = json.dumps(body or {"model": MODEL, "prompt": "Hi", "max_tokens": 8}).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": (peer, 40000),
        "server": ("127.0.0.1", 8000),
        "scheme": "http",
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    r = Request(scope, receive)
    r.state.request_id = "req"
    return r


def begin(gate: Admission, r: Request) -> Call:
    call, _ = asyncio.run(gate.begin(r, CompletionRequest, "completions", lambda _: 16))
    return call


def refused(gate: Admission, r: Request) -> ApiError:
    with pytest.raises(ApiError) as e:
        begin(gate, r)
    return e.value


def done(tokens: int) -> Finished:
    return Finished("stop", Usage(tokens, 0))


# ---- 401s are throttled ------------------------------------------------------------------------
def test_key_guessing_spends_the_ip_budget_and_meets_429_not_endless_401s(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, KEY)
    gate = admission(
        auth={"enabled": True, "env_var": ENV_VAR},
        rate_limit={"requests_per_minute_per_ip": 3},
    )
    guess = {"Authorization": "Bearer sk-wrong"}
    assert [refused(gate, request(headers=guess)).status for _ in range(3)] == [401] * 3
    throttled = refused(gate, request(headers=guess))
    assert throttled.status == 429 and int(throttled.headers["Retry-After"]) >= 1
    assert throttled.body()["error"]["code"] == "rate_limit_exceeded"
    # The right key from the same IP waits too; another IP's guess is still only a 401.
    assert refused(gate, request(headers={"Authorization": f"Bearer {KEY}"})).status == 429
    assert refused(gate, request(headers=guess, peer="198.51.100.1")).status == 401


def test_a_keyed_response_carries_the_tighter_of_the_ip_and_key_limits(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, KEY)
    gate = admission(
        auth={"enabled": True, "env_var": ENV_VAR},
        rate_limit={"requests_per_minute_per_ip": 1000, "requests_per_minute_per_key": 5},
    )
    call = begin(gate, request(headers={"Authorization": f"Bearer {KEY}"}))
    assert call.key_id == "env-1" and call.lease is None  # keys have no anonymous cap
    assert call.headers["x-ratelimit-limit-requests"] == "5"
    assert call.headers["x-ratelimit-remaining-requests"] == "4"


# ---- anonymous concurrency ---------------------------------------------------------------------
def test_anonymous_client_gets_its_cap_then_429_and_a_finished_request_frees_its_slot() -> None:
    gate = admission(client_limits={"max_concurrent_per_client": 2})
    first, _second = begin(gate, request()), begin(gate, request())
    err = refused(gate, request())
    assert err.status == 429 and err.headers["Retry-After"] == "1"
    assert err.body()["error"]["code"] == "concurrency_limit_exceeded"
    assert begin(gate, request(peer="198.51.100.1")).lease is not None  # another client
    gate.finish(first, 200, done(10))
    gate.finish(first, 200, done(10))  # a backstop finishing again gives back nothing more
    assert gate.concurrency.in_flight("203.0.113.5") == 1
    begin(gate, request())
    assert gate.concurrency.in_flight("203.0.113.5") == 2


def test_a_refused_request_holds_no_slot() -> None:
    gate = admission(client_limits={"max_concurrent_per_client": 1})
    bad = request({"model": MODEL, "prompt": "Hi", "max_tokens": -1})
    assert refused(gate, bad).status == 400
    assert gate.concurrency.in_flight("203.0.113.5") == 0
    call = begin(gate, request())
    gate.fail(call, ApiError(503, "replica died", type="server_error"))
    assert gate.concurrency.in_flight("203.0.113.5") == 0


def test_a_forged_forwarded_for_from_an_untrusted_peer_does_not_make_a_new_client() -> None:
    gate = admission(
        client_limits={"max_concurrent_per_client": 1},
        client_identity={"trusted_proxies": ["10.0.0.0/8"]},
    )
    begin(gate, request(headers={"X-Forwarded-For": "192.0.2.1"}))
    forged = refused(gate, request(headers={"X-Forwarded-For": "192.0.2.2"}))
    assert forged.status == 429
    # Through the trusted proxy, the forwarded addresses are two clients with a slot each.
    for client in ("192.0.2.1", "192.0.2.2"):
        call = begin(gate, request(peer=PROXY, headers={"X-Forwarded-For": client}))
        assert call.client_ip == client


# ---- anonymous token budget --------------------------------------------------------------------
def completion(max_tokens: int, prompt: str = "Hi") -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}


def test_anonymous_token_budget_reserves_then_refunds_what_was_not_generated() -> None:
    gate = admission(client_limits={"tokens_per_minute_per_ip": 600})  # refills 10/s
    big = begin(gate, request(completion(500)))
    assert big.reserved_tokens == estimate_prompt_tokens("Hi") + 500
    spent = refused(gate, request(completion(200)))
    assert spent.status == 429 and spent.body()["error"]["type"] == "tokens"
    assert int(spent.headers["Retry-After"]) >= 10  # ~100 tokens short at 10 tokens/s
    assert gate.concurrency.in_flight("203.0.113.5") == 1  # the refused one's slot came back
    gate.finish(big, 200, done(40))  # 461 of the 501 come back
    begin(gate, request(completion(200)))


def test_a_failed_request_gets_all_its_tokens_back_and_a_client_that_left_pays_for_what_ran() -> (
    None
):
    gate = admission(client_limits={"tokens_per_minute_per_ip": 600})
    failed = begin(gate, request(completion(590)))
    gate.fail(failed, ApiError(504, "deadline", type="timeout"))
    left = begin(gate, request(completion(590)))
    assert gate.ip_tokens is not None
    sent = "word " * 400  # ~500 tokens streamed before the client went away
    gate.finish(left, CLIENT_CLOSED, None, sent)
    # What ran (prompt + the text sent) stays spent: ~100 of 600 remain, not 600.
    decision = gate.ip_tokens.reserve("203.0.113.5", 200)
    assert not decision.allowed


def test_keys_are_not_held_to_the_anonymous_token_budget(monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, KEY)
    gate = admission(
        auth={"enabled": True, "env_var": ENV_VAR}, client_limits={"tokens_per_minute_per_ip": 600}
    )
    for _ in range(3):
        begin(gate, request(completion(500), headers={"Authorization": f"Bearer {KEY}"}))


def test_token_budget_below_the_router_replicas_fails_at_deploy_time() -> None:
    with pytest.raises(ValueError, match="tokens_per_minute_per_ip=1 is below router_replicas=2"):
        AppArgs.model_validate(
            {
                "models": [{"name": MODEL, "source": "/x"}],
                "router_replicas": 2,
                "client_limits": {"tokens_per_minute_per_ip": 1},
            }
        )


# ---- the OpenAPI document ----------------------------------------------------------------------
def test_openapi_documents_the_request_bodies_the_routes_parse() -> None:
    from deployments.gateway.router import fastapi_app
    from deployments.gateway.schemas import ChatCompletionRequest, SeedGenerateRequest

    doc = fastapi_app.openapi()
    schemas = doc["components"]["schemas"]
    bodies = {
        "/v1/chat/completions": ChatCompletionRequest,
        "/v1/completions": CompletionRequest,
        "/generate": SeedGenerateRequest,
    }
    for path, model in bodies.items():
        post = doc["paths"][path]["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model.__name__}" and post["requestBody"]["required"]
        expected = model.model_json_schema(ref_template="#/components/schemas/{model}")
        expected.pop("$defs", None)
        assert schemas[model.__name__] == expected
        error = post["responses"]["400"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    chat = schemas["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(chat["required"])
    assert chat["properties"]["model"]["maxLength"] == 256
    assert chat["properties"]["messages"]["items"] == {"$ref": "#/components/schemas/ChatMessage"}
    assert "ChatMessage" in schemas and "TextPart" in schemas
    assert (
        "text/event-stream"
        in doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    )
