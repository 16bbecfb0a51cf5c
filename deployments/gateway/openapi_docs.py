"""The OpenAPI document's request and error bodies.

The inference routes read raw bytes (request_parsing.py refuses NaN, deep nesting and lone
surrogates before validation), so FastAPI cannot infer their bodies. These put the pydantic
models' JSON schemas back into `/openapi.json` as each route's `requestBody`, with the models in
`components.schemas`, the way vLLM documents its bodies: a generated client or a schema fuzzer
reads the real contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from deployments.gateway.schemas import ErrorResponse

REF = "#/components/schemas/{model}"

ERROR_STATUSES = {
    400: "Invalid request: the body, a field or a value (the error names it).",
    401: "Missing or bad API key.",
    403: "The key may not use this model.",
    404: "Unknown model.",
    413: "Body over the size cap.",
    429: "Rate, token or concurrency limit; see Retry-After.",
    503: "No capacity or no replica; see Retry-After.",
    504: "Request deadline passed.",
}


def error_responses(statuses: Sequence[int] = tuple(ERROR_STATUSES)) -> dict[int | str, Any]:
    """`responses=` for a route: the OpenAI error body for each status."""
    return {s: {"model": ErrorResponse, "description": ERROR_STATUSES[s]} for s in statuses}


def json_body(model: type[BaseModel], streams: bool = False) -> dict[str, Any]:
    """`openapi_extra=` for a route that parses `model` from its raw body itself."""
    extra: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
        }
    }
    if streams:  # `stream: true` answers with server-sent events instead of one JSON object
        extra["responses"] = {
            "200": {
                "description": "The completion: JSON, or SSE `data:` chunks ending "
                "`data: [DONE]` when `stream` is true.",
                "content": {"application/json": {}, "text/event-stream": {}},
            }
        }
    return extra


def document_bodies(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """Add `models` (and the models they use) to the app's `components.schemas`."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()  # FastAPI's own document, cached on the app
            _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
