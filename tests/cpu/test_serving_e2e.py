"""End to end: the real app (`serve.run`) on the real demo AWQ model, over HTTP.

One app for the module (starting one costs ~15 s). The replica-kill test comes last: it SIGKILLs
the model replica, and Serve's replacement is what any later test would meet.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from benchmarks.fuzz import DEFAULT_SEED, INFERENCE, fuzz_operation, load_schema, operations
from tests.serving import CHAT, health_detail, serve_app
from tests.streams import open_stream, wait_all, wait_until

pytestmark = pytest.mark.slow  # starts Ray Serve with the demo model

PARIS = {"role": "user", "content": "What is the capital of France?"}
FUZZ_EXAMPLES_PER_OPERATION = 30  # fixed seed, bounded: `python -m benchmarks.fuzz` runs longer
KILL_STREAMS = 12
KILL_MAX_TOKENS = 256  # still decoding when the replica dies
CUT_S = 30  # generous: a dead actor reaches the router's stream within a second or two
RECOVER_S = 240  # Serve notices the death, starts a replica, which loads the model


@pytest.fixture(scope="module")
def base_url(registry_root: Path, tmp_path_factory: pytest.TempPathFactory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with serve_app(registry_root, audit_path=audit) as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer(demo_awq_dir: Path):
    return AutoTokenizer.from_pretrained(demo_awq_dir)


def post(base_url: str, path: str, body: dict | str, **kw) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return httpx.post(base_url + path, content=content, headers=headers, timeout=120, **kw)


def test_chat_answer_about_france_mentions_paris_with_correct_usage(base_url, tokenizer) -> None:
    r = post(base_url, "/v1/chat/completions",
             {"model": CHAT, "messages": [PARIS], "max_tokens": 32, "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    answer = body["choices"][0]["message"]["content"]
    assert "Paris" in answer
    prompt_ids = tokenizer.apply_chat_template([PARIS], add_generation_prompt=True)["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["usage"]["completion_tokens"] == len(tokenizer.encode(answer)) + 1  # + <|im_end|>
    assert body["usage"]["total_tokens"] == len(prompt_ids) + body["usage"]["completion_tokens"]
    assert r.headers["x-request-id"]


def test_concurrent_requests_all_succeed(base_url) -> None:
    questions = [
        "What is 3 times 3?",
        "Name a fruit.",
        "Say hello in French.",
        "What color is grass?",
    ]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            return await asyncio.gather(*(
                client.post("/v1/chat/completions", json={
                    "model": CHAT, "messages": [{"role": "user", "content": q}],
                    "max_tokens": 16, "temperature": 0})
                for q in questions * 2))  # fmt: skip

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 8
    texts = [r.json()["choices"][0]["message"]["content"] for r in responses]
    assert all(texts) and texts[:4] == texts[4:], "same greedy prompt, same answer in a batch"


def test_official_openai_client_works_unmodified(base_url) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    assert CHAT in [m.id for m in client.models.list()]
    chat = client.chat.completions.create(model=CHAT, messages=[PARIS], max_tokens=24,
                                          temperature=0)  # fmt: skip
    assert "Paris" in chat.choices[0].message.content
    stream = client.chat.completions.create(model=CHAT, messages=[PARIS], max_tokens=24,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    text = client.completions.create(model=CHAT, prompt="The capital of France is",
                                     max_tokens=8, temperature=0)  # fmt: skip
    assert text.choices[0].text and text.usage.prompt_tokens > 0


def test_stream_is_sse_ending_with_done(base_url) -> None:
    body = {"model": CHAT, "messages": [PARIS], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in {"stop", "length"}


def test_seed_generate_api_returns_text_and_figures(base_url) -> None:
    r = post(base_url, "/generate", {"prompt": "What is the capital of France?",
                                     "max_new_tokens": 24, "temperature": 0})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Paris" in body["generated_text"]
    assert body["tokens_generated"] > 0
    assert body["inference_time"] > 0
    assert body["tokens_per_second"] == pytest.approx(
        body["tokens_generated"] / body["inference_time"], rel=1e-6
    )
    assert body["memory_used"] > 50  # MB of a replica holding a model


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": CHAT}, "messages"),
        ({"model": CHAT, "messages": [PARIS], "max_tokens": -1}, "max_tokens"),
        ({"model": CHAT, "messages": [PARIS], "temperature": 5}, "temperature"),
        ({"model": CHAT, "messages": []}, "messages"),
        ({"model": CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ],
)
def test_bad_chat_input_gets_400_with_openai_error_naming_the_field(base_url, body, param) -> None:
    r = post(base_url, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert param.split(".")[0] in err["message"]


def test_non_json_body_gets_400(base_url) -> None:
    r = post(base_url, "/v1/chat/completions", "{not json")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"


def test_unknown_model_gets_404_naming_served_models(base_url) -> None:
    r = post(base_url, "/v1/chat/completions", {"model": "gpt-9", "messages": [PARIS]})
    assert r.status_code == 404
    assert CHAT in r.json()["error"]["message"]


def test_prompt_longer_than_context_gets_400_with_the_numbers(base_url) -> None:
    long_prompt = "word " * 3000
    r = post(base_url, "/v1/completions", {"model": CHAT, "prompt": long_prompt, "max_tokens": 16})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert "2048" in err["message"]


def test_health_models_and_metrics_endpoints(base_url) -> None:
    health = httpx.get(base_url + "/health", timeout=30)
    assert health.status_code == 200
    assert health.json()["models"][CHAT]["ready"] is True
    health_detail(lambda: httpx.get(base_url + "/health?detail=1", timeout=30).json(), CHAT)
    models = httpx.get(base_url + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [CHAT]
    metrics = httpx.get(base_url + "/metrics", timeout=30).text
    assert 'inference_requests_total{model="' + CHAT in metrics
    assert "inference_latency_seconds_bucket" in metrics


def test_client_request_id_is_echoed(base_url) -> None:
    r = httpx.get(base_url + "/v1/models", headers={"X-Request-Id": "abc-123"}, timeout=30)
    assert r.headers["x-request-id"] == "abc-123"


@pytest.mark.parametrize("path", list(INFERENCE))
def test_schema_fuzzed_requests_never_get_a_server_error(base_url, path: str) -> None:
    """Schemathesis on the app's own /openapi.json (as benchmarks/fuzz.py bounds it)."""
    [op] = [op for op in operations(load_schema(base_url)) if op.path == path]
    failures = fuzz_operation(op, base_url, FUZZ_EXAMPLES_PER_OPERATION, DEFAULT_SEED)
    report = "\n".join(f"{f.outcome}\n  body: {f.body[:300]}" for f in failures)
    assert not failures, f"{len(failures)} of {FUZZ_EXAMPLES_PER_OPERATION} got a 5xx:\n{report}"


# ---- last: kills the model replica ----------------------------------------------------------


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
    streams = [open_stream(base_url, KILL_MAX_TOKENS) for _ in range(KILL_STREAMS)]
    wait_all(streams, lambda s: s.started, 120)
    assert not any(s.ended.is_set() for s in streams), "streams must be mid-way at the kill"
    os.kill(pid, signal.SIGKILL)  # the pid our own app reported
    killed = time.monotonic()

    wait_all(streams, lambda s: s.ended, CUT_S)
    cut_s = max(s.ended_at or killed for s in streams) - killed
    wait_until(lambda: answers(base_url), RECOVER_S, "a new request to succeed")
    print(f"all {KILL_STREAMS} streams ended {cut_s:.2f}s after SIGKILL; "
          f"a new request succeeded {time.monotonic() - killed:.1f}s after it")  # fmt: skip

    for s in streams:
        assert s.status == 200 and s.transport_error is None, s.summary()
        assert s.error is not None and s.error["code"] == "replica_died", s.summary()
        assert not s.done and s.finish_reason is None, s.summary()
    replica_pid(base_url, other_than=pid)  # the replacement is another process
