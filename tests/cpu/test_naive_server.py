"""The naive baseline of benchmarks.compare answers in the OpenAI shape, streamed or not.

It shares the gateway's body builders, so a change to them that it does not follow shows here,
not as a failed benchmark run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from benchmarks.naive_server import NaiveModel, build_app

MODEL = "demo"


@pytest.fixture(scope="module")
def client(demo_awq_dir: Path) -> TestClient:
    return TestClient(build_app(NaiveModel(demo_awq_dir, MODEL, threads=2)))


def chat(**extra: object) -> dict[str, object]:
    question = {"role": "user", "content": "What is the capital of France?"}
    return {"model": MODEL, "messages": [question], "max_tokens": 4, "temperature": 0, **extra}


def test_chat_answer_has_text_usage_and_finish_reason(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4 and body["usage"]["prompt_tokens"] > 0


def test_stream_ends_with_finish_reason_usage_and_done(client: TestClient) -> None:
    body = chat(stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_unknown_model_is_a_404_in_the_openai_shape(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**chat(), "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
