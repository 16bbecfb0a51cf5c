"""The document the schema fuzzer runs on: the app's own OpenAPI, with `model` and lengths bounded.

The fuzz run itself is in test_serving_e2e.py (it shares that module's app); `python -m
benchmarks.fuzz` is the long run.
"""

from __future__ import annotations

import pytest

from benchmarks.fuzz import INFERENCE


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
