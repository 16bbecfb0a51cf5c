"""Schema fuzzing of the inference paths with Schemathesis: no generated request may get a 5xx.

The app's own `/openapi.json` is the source, request bodies as the app documents them (the
pydantic models of deployments/gateway/schemas.py). Two adjustments keep the fuzzing on the
engine: `model` is limited to the served names (a random name is a 404 that never reaches a
replica), and generation lengths are capped (`--max-tokens-cap`) so thousands of cases finish on
a CPU.

tests/cpu/test_schema_fuzz.py runs a short fixed-seed version in CI; this script is the long run:

    python -m benchmarks.fuzz --examples 500 --modes positive,negative
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from benchmarks.load import ensure_loopback

INFERENCE = ("/v1/chat/completions", "/v1/completions", "/generate")
# The first of these a body schema has becomes required, so no case falls back to the default
# length (hundreds of tokens on a CPU); all of them are capped.
LENGTH_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")
DEFAULT_SEED = 20261202


def inference_document(
    doc: dict[str, Any], models: Sequence[str], max_tokens_cap: int | None
) -> dict[str, Any]:
    """The inference paths of `doc`, with `model` and lengths bounded; their request bodies
    must be documented (ValueError if not: there would be nothing to fuzz)."""
    doc = copy.deepcopy(doc)
    missing = set(INFERENCE) - set(doc.get("paths", {}))
    if missing:
        raise ValueError(f"the OpenAPI document lacks inference paths {sorted(missing)}")
    undocumented = [p for p in INFERENCE if "requestBody" not in doc["paths"][p].get("post", {})]
    if undocumented:
        raise ValueError(f"the OpenAPI document has no request body for {undocumented}")
    doc["paths"] = {p: ops for p, ops in doc["paths"].items() if p in INFERENCE}
    components = doc.get("components", {}).get("schemas", {})
    for schema in components.values():
        _bound(schema, models, max_tokens_cap)
    return doc


def _bound(schema: dict[str, Any], models: Sequence[str], max_tokens_cap: int | None) -> None:
    props = schema.get("properties")
    if not isinstance(props, dict):
        return
    if "model" in props:
        props["model"] = {"enum": list(models)}
    lengths = [f for f in LENGTH_FIELDS if f in props]
    if max_tokens_cap is None or not lengths:
        return
    for name in lengths:
        props[name] = {"type": "integer", "minimum": 1, "maximum": max_tokens_cap}
    required = schema.setdefault("required", [])
    if lengths[0] not in required:
        required.append(lengths[0])


@dataclass(frozen=True)
class Failure:
    """A generated request that got a 5xx or no answer, with its body to reproduce it."""

    operation: str
    outcome: str
    body: str


def load_schema(base_url: str, max_tokens_cap: int | None = 16, timeout_s: float = 30.0):
    """The Schemathesis schema of the running app's inference paths, adjusted as above."""
    import schemathesis

    doc = httpx.get(base_url + "/openapi.json", timeout=timeout_s).json()
    served = [m["id"] for m in httpx.get(base_url + "/v1/models", timeout=timeout_s).json()["data"]]
    return schemathesis.openapi.from_dict(inference_document(doc, served, max_tokens_cap))


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def fuzz_operation(
    operation,
    base_url: str,
    examples: int,
    seed: int = DEFAULT_SEED,
    modes: Sequence[str] = ("positive",),
    timeout_s: float = 60.0,
) -> list[Failure]:
    """Send `examples` generated requests; every 5xx or transport error is a Failure.

    All examples run (failures are collected, not raised) and nothing is shrunk: a case that
    breaks the engine would make shrinking hammer a dead replica.
    """
    from schemathesis import GenerationMode
    from schemathesis.core import NotSet

    strategy = st.one_of(*(operation.as_strategy(GenerationMode(m)) for m in modes))
    failures: list[Failure] = []
    label = f"{operation.method.upper()} {operation.path}"

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=strategy)
    def run(case) -> None:
        # Not case.as_curl_command(): it masks fields named like secrets, max_tokens included.
        # Negative mode may send raw bytes, which json cannot write: repr() them.
        body = "" if isinstance(case.body, NotSet) else json.dumps(case.body, default=repr)[:2000]
        try:
            response = case.call(base_url=base_url, timeout=timeout_s)
        except Exception as e:  # a reset or timeout is as bad as a 5xx
            failures.append(Failure(label, type(e).__name__, body))
            return
        if response.status_code >= 500:
            failures.append(Failure(label, f"{response.status_code} {response.text[:200]}", body))

    run()
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="Server root (loopback only).")
    p.add_argument("--examples", type=int, default=500, help="Generated requests per operation.")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--modes", default="positive,negative", help="positive and/or negative.")
    p.add_argument(
        "--max-tokens-cap", type=int, default=16, help="Cap on generated lengths; 0 = none."
    )
    args = p.parse_args(argv)
    ensure_loopback(args.url)
    schema = load_schema(args.url, args.max_tokens_cap or None)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    failures: list[Failure] = []
    for operation in operations(schema):
        found = fuzz_operation(operation, args.url, args.examples, args.seed, modes)
        print(f"{operation.method.upper()} {operation.path}: {args.examples} examples, "
              f"{len(found)} failures", flush=True)  # fmt: skip
        failures.extend(found)
    for f in failures:
        print(f"FAIL {f.operation}: {f.outcome}\n  body: {f.body}")
    print(f"VERDICT {'PASS' if not failures else 'FAIL'}: {len(failures)} requests got a 5xx")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
