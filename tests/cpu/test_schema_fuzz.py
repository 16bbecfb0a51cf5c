"""Schema fuzzing (Schemathesis) of the real app's inference paths: no generated request gets a 5xx.

Fixed seed and a bounded number of examples so CI is repeatable and short; `python -m
benchmarks.fuzz` is the long run. The document is the app's own `/openapi.json`, request bodies as
it documents them, adjusted as benchmarks/fuzz.py describes (`model` and lengths bounded).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.fuzz import DEFAULT_SEED, INFERENCE, fuzz_operation, load_schema, operations
from tests.serving import serve_app

pytestmark = pytest.mark.slow  # starts Ray Serve with the demo model

EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def app(registry_root: Path, tmp_path_factory: pytest.TempPathFactory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with serve_app(registry_root, audit_path=audit) as url:
        yield url, {op.path: op for op in operations(load_schema(url))}


@pytest.mark.parametrize("path", list(INFERENCE))
def test_generated_requests_never_get_a_server_error(app, path: str) -> None:
    url, ops = app
    failures = fuzz_operation(ops[path], url, EXAMPLES_PER_OPERATION, DEFAULT_SEED)
    report = "\n".join(f"{f.outcome}\n  body: {f.body[:300]}" for f in failures)
    assert not failures, f"{len(failures)} of {EXAMPLES_PER_OPERATION} got a 5xx:\n{report}"


def test_fuzz_document_bounds_model_and_lengths_of_the_apps_own_document() -> None:
    from benchmarks.fuzz import inference_document
    from deployments.gateway.router import fastapi_app

    doc = fastapi_app.openapi()
    out = inference_document(doc, ["m1"], max_tokens_cap=8)
    assert set(out["paths"]) == set(INFERENCE)
    schemas = out["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert chat["properties"]["model"] == {"enum": ["m1"]}
    assert chat["properties"]["max_tokens"]["maximum"] == 8
    assert "max_tokens" in chat["required"]
    assert "max_new_tokens" in schemas["SeedGenerateRequest"]["required"]
    original = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert original["properties"]["model"] != {"enum": ["m1"]}, "input left unchanged"


def test_fuzz_document_refuses_a_document_without_request_bodies() -> None:
    from benchmarks.fuzz import inference_document

    doc = {"paths": {p: {"post": {"responses": {"200": {"description": "ok"}}}} for p in INFERENCE}}
    with pytest.raises(ValueError, match="no request body"):
        inference_document(doc, ["m1"], max_tokens_cap=None)
