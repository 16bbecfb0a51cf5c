"""Request bodies from raw bytes to validated models; every failure is a 400 naming the field.

Python's `json` accepts what no client should send and what breaks code further on: NaN and
Infinity, nesting deep enough to exhaust the recursion limit, and lone UTF-16 surrogates that
fail later when the text is encoded. They are refused here, once, before validation.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from deployments.errors import ApiError

MAX_DEPTH = 32
M = TypeVar("M", bound=BaseModel)


def _invalid_json(message: str) -> ApiError:
    return ApiError(400, f"The request body is not valid JSON: {message}", code="invalid_json")


class NonFinite(str):
    """What the parser makes of `NaN`/`Infinity`: kept as a marker until the walk below can
    name the field that holds it."""


def check_structure(data: Any, max_depth: int = MAX_DEPTH) -> None:
    """Depth, finite numbers and string sanity, walked iteratively (a recursive walk would fail
    where the attacker wants it to)."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, NonFinite):
            param = path or None
            raise ApiError(
                400,
                f"Invalid '{path}': {node} is not a JSON number (only finite numbers are).",
                param=param,
                code="invalid_value",
            )
        if isinstance(node, dict | list):
            if depth > max_depth:
                raise _invalid_json(f"nested deeper than {max_depth} levels.")
            if isinstance(node, dict):
                stack.extend((k, depth + 1, path) for k in node)
                stack.extend((v, depth + 1, _join(path, k)) for k, v in node.items())
            else:
                stack.extend((v, depth + 1, _join(path, i)) for i, v in enumerate(node))
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise _invalid_json("a string holds an unpaired UTF-16 surrogate.") from None


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw, parse_constant=NonFinite)
    except RecursionError:
        raise _invalid_json(f"nested deeper than {MAX_DEPTH} levels.") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise _invalid_json(str(e)[:200]) from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    check_structure(data)
    return data


def parse_body(raw: bytes, model: type[M]) -> M:
    """Parse and validate a body; errors become 400s naming the offending field."""
    data = parse_json(raw)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        message = str(first["msg"])[:300]
        raise ApiError(400, f"Invalid '{param}': {message}.", param=param, code=code) from None
