"""Malformed and extreme requests that must never get a 5xx nor take a replica down.

Shared by the hostile-input test (tests/cpu/test_hostile_input.py), which sends each once to the
real app, and the soak script (benchmarks/soak.py), which mixes them into normal traffic. Bodies
are raw bytes so invalid JSON, deep nesting, NaN, lone surrogates and huge integers reach the
server exactly as written. Requests that could run are kept to a few tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MODEL = "smollm2-135m-instruct"
CHAT, COMPLETIONS, GENERATE = "/v1/chat/completions", "/v1/completions", "/generate"
MODELS, HEALTH = "/v1/models", "/health"
USER = {"role": "user", "content": "Say hi."}
INT64_OVERFLOW = 9223372036854775808  # 2**63: one past torch's int64
UINT64_OVERFLOW = 18446744073709551616  # 2**64: past any seed a generator takes


@dataclass(frozen=True)
class HostileCase:
    """One request. `invalid`: the answer must be a 4xx; otherwise any status below 500.

    `mentions`: a feature the server may implement or refuse; a 400 must then name it.
    """

    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    invalid: bool = True
    mentions: str | None = None

    def request_headers(self) -> dict[str, str]:
        base = {"Content-Type": "application/json"} if self.body is not None else {}
        return {**base, **self.headers}


def body(obj: Any) -> bytes:
    """JSON as Python writes it: NaN and Infinity stay (as json.loads accepts them)."""
    return json.dumps(obj).encode()


def chat(**fields: Any) -> bytes:
    return body({"model": MODEL, "messages": [USER], "max_tokens": 4, **fields})


def completion(**fields: Any) -> bytes:
    return body({"model": MODEL, "prompt": "Hello", "max_tokens": 4, **fields})


def generate(**fields: Any) -> bytes:
    return body({"prompt": "Hello", "max_new_tokens": 4, **fields})


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def _post(name: str, path: str, raw: bytes, **kw: Any) -> HostileCase:
    return HostileCase(name, "POST", path, raw, **kw)


# Kept last: today these kill or wedge the engine, so everything before them measures the rest.
ENGINE_KILLERS = [
    _post("completions-top-k-int64-overflow", COMPLETIONS, completion(top_k=INT64_OVERFLOW)),
    _post("chat-top-k-int64-overflow", CHAT, chat(top_k=INT64_OVERFLOW)),
    _post("generate-top-k-int64-overflow", GENERATE, generate(top_k=INT64_OVERFLOW)),
    _post("chat-top-k-float-1e20", CHAT, b'{"model":"%s","messages":[{"role":"user",'
          b'"content":"hi"}],"max_tokens":4,"top_k":1e20}' % MODEL.encode()),
    _post("chat-seed-uint64-overflow", CHAT, chat(seed=UINT64_OVERFLOW)),
    _post("completions-seed-uint64-overflow", COMPLETIONS, completion(seed=UINT64_OVERFLOW)),
    _post("chat-seed-negative-int64-overflow", CHAT, chat(seed=-INT64_OVERFLOW - 1)),
]  # fmt: skip

CASES: list[HostileCase] = [
    # ---- not JSON, or not an object ----
    _post("chat-invalid-json", CHAT, b"{not json"),
    _post("chat-empty-body", CHAT, b""),
    _post("chat-top-level-array", CHAT, b"[]"),
    _post("chat-top-level-string", CHAT, b'"hello"'),
    _post("chat-top-level-null", CHAT, b"null"),
    _post("chat-invalid-utf8", CHAT, b'{"model": "\xff\xfe", "messages": []}'),
    # RFC 8259 lets a parser ignore a BOM: accepting it is fine, failing on it is not.
    _post("chat-utf8-bom", CHAT, b"\xef\xbb\xbf" + chat(), invalid=False),
    _post("chat-truncated-json", CHAT, chat()[:-7]),
    # ---- nesting ----
    _post("chat-array-nested-5000", CHAT, nested(5000)),
    _post("chat-object-nested-3000", CHAT, nested_object(3000)),
    _post("chat-content-nested-5000", CHAT,
          b'{"model":"%s","messages":[{"role":"user","content":%s}]}'
          % (MODEL.encode(), nested(5000))),
    _post("completions-prompt-object-nested-3000", COMPLETIONS,
          b'{"model":"%s","prompt":%s}' % (MODEL.encode(), nested_object(3000))),
    _post("generate-array-nested-5000", GENERATE, nested(5000)),
    # ---- content parts ----
    _post("chat-content-part-text-is-int", CHAT,
          chat(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}])),
    _post("chat-content-part-text-is-list", CHAT,
          chat(messages=[{"role": "user", "content": [{"type": "text", "text": ["a"]}]}])),
    _post("chat-content-part-not-object", CHAT,
          chat(messages=[{"role": "user", "content": ["hi", 3]}])),
    _post("chat-content-part-image-only", CHAT,
          chat(messages=[{"role": "user", "content": [
              {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]),
          invalid=False),
    # ---- unicode ----
    _post("chat-lone-high-surrogate", CHAT,
          b'{"model":"%s","messages":[{"role":"user","content":"\\ud800"}],"max_tokens":4}'
          % MODEL.encode(), invalid=False),
    _post("chat-lone-low-surrogate-in-model", CHAT,
          b'{"model":"x\\udfff","messages":[{"role":"user","content":"hi"}]}'),
    _post("completions-lone-surrogate-prompt", COMPLETIONS,
          b'{"model":"%s","prompt":"a\\ud800b","max_tokens":4}' % MODEL.encode(),
          invalid=False),
    _post("chat-nul-bytes-in-content", CHAT,
          chat(messages=[{"role": "user", "content": "a\u0000b\u0000"}]), invalid=False),
    # ---- non-finite and huge numbers ----
    _post("chat-temperature-nan", CHAT, chat(temperature=float("nan"))),
    _post("chat-top-p-infinity", CHAT, chat(top_p=float("inf"))),
    _post("chat-max-tokens-negative-infinity", CHAT, chat(max_tokens=float("-inf"))),
    _post("chat-presence-penalty-nan", CHAT, chat(presence_penalty=float("nan")),
          invalid=False, mentions="presence_penalty"),
    _post("generate-temperature-nan", GENERATE, generate(temperature=float("nan"))),
    _post("chat-max-tokens-1e400", CHAT,
          b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":1e400}'
          % MODEL.encode()),
    _post("chat-max-tokens-huge-int", CHAT, chat(max_tokens=10**30)),
    _post("generate-max-new-tokens-huge", GENERATE, generate(max_new_tokens=10**6)),
    _post("chat-seed-fractional", CHAT, chat(seed=1.5)),
    _post("chat-top-k-negative", CHAT, chat(top_k=-1)),
    # ---- unsupported OpenAI features: a 400 naming them, or implemented ----
    _post("chat-n-2", CHAT, chat(n=2), mentions="n"),
    _post("chat-logprobs", CHAT, chat(logprobs=True, top_logprobs=5), invalid=False,
          mentions="logprobs"),
    _post("chat-tools", CHAT, chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}}}]), invalid=False, mentions="tools"),
    _post("chat-response-format-json", CHAT, chat(response_format={"type": "json_object"}),
          invalid=False, mentions="response_format"),
    _post("completions-best-of-5", COMPLETIONS, completion(best_of=5), invalid=False,
          mentions="best_of"),
    # ignore_eos is a benchmark switch: refused for anonymous clients by default.
    _post("chat-anonymous-ignore-eos", CHAT, chat(ignore_eos=True), mentions="ignore_eos"),
    # ---- size ----
    _post("chat-stop-list-10000", CHAT, chat(stop=["x"] * 10_000)),
    _post("chat-stop-one-huge-string", CHAT, chat(stop="s" * 200_000), invalid=False),
    _post("chat-model-name-900kb", CHAT, chat(model="m" * 900_000)),
    _post("chat-user-900kb", CHAT, chat(user="u" * 900_000)),
    _post("chat-20000-messages", CHAT, chat(messages=[USER] * 20_000)),
    _post("chat-body-over-limit", CHAT, chat(messages=[{"role": "user",
          "content": "x" * 1_100_000}])),
    _post("completions-prompt-over-context", COMPLETIONS, completion(prompt="word " * 20_000)),
    # ---- wrong types ----
    _post("chat-messages-is-string", CHAT, chat(messages="hello")),
    _post("chat-messages-null-entry", CHAT, chat(messages=[None])),
    _post("chat-model-is-int", CHAT, chat(model=123)),
    _post("chat-model-missing", CHAT, body({"messages": [USER]})),
    _post("chat-role-is-int", CHAT, chat(messages=[{"role": 5, "content": "hi"}])),
    _post("chat-content-is-object", CHAT, chat(messages=[{"role": "user", "content": {}}])),
    _post("chat-temperature-is-string", CHAT, chat(temperature="hot")),
    _post("chat-stream-is-list", CHAT, chat(stream=[1])),
    _post("chat-stream-options-is-string", CHAT, chat(stream=True, stream_options="x")),
    _post("chat-stop-is-int", CHAT, chat(stop=5)),
    _post("chat-stop-empty-string", CHAT, chat(stop=[""])),
    _post("completions-prompt-token-ids", COMPLETIONS, completion(prompt=[1, 2, 3])),
    _post("completions-prompt-two", COMPLETIONS, completion(prompt=["a", "b"])),
    _post("completions-prompt-empty", COMPLETIONS, completion(prompt="")),
    _post("completions-prompt-null", COMPLETIONS, completion(prompt=None)),
    _post("generate-unknown-field", GENERATE, generate(evil=True)),
    _post("generate-prompt-is-list", GENERATE, generate(prompt=["a"])),
    _post("generate-use-chat-template-object", GENERATE, generate(use_chat_template={})),
    # ---- wrong methods, paths, headers ----
    HostileCase("models-post", "POST", MODELS, b"{}"),
    HostileCase("health-delete", "DELETE", HEALTH),
    HostileCase("chat-get", "GET", CHAT),
    HostileCase("generate-put", "PUT", GENERATE, b"{}"),
    HostileCase("unknown-path-traversal", "GET", "/v1/../../etc/passwd"),
    HostileCase("unknown-path-nul", "GET", "/v1/models%00"),
    HostileCase("models-garbage-query", "GET", MODELS + "?limit=%ff%fe&limit=-1",
                invalid=False),
    HostileCase("health-huge-authorization", "GET", HEALTH,
                headers={"Authorization": "Bearer " + "k" * 6000}, invalid=False),
    HostileCase("models-huge-request-id", "GET", MODELS,
                headers={"X-Request-Id": "r" * 6000}, invalid=False),
    _post("chat-content-type-text-plain", CHAT, chat(), headers={"Content-Type": "text/plain"},
          invalid=False),
    *ENGINE_KILLERS,
]  # fmt: skip

assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"
