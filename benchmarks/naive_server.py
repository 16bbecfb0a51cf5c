"""The seeds' design as a baseline: one FastAPI process, one model, one request at a time.

`model.generate` runs in a thread with a `TextIteratorStreamer`; an asyncio.Lock lets exactly
one request decode while the others wait in line. No batching, so concurrent clients queue up:
this is what `benchmarks.compare` measures awq-serve's continuous batching against. The
OpenAI request/response shapes are awq-serve's own (deployments.gateway.schemas and
openai_format), so the comparison measures the serving design, not the JSON.

    python -m benchmarks.naive_server --model-dir models/smollm2-135m-instruct/w4-g64-1 --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from deployments.engine.prompts import chat_prompt_ids
from deployments.errors import ApiError
from deployments.gateway import openai_format as fmt
from deployments.gateway.schemas import ChatCompletionRequest
from deployments.protocol import Finished, Usage

DEFAULT_MAX_TOKENS = 256


@dataclass
class Generation:
    """One request's decode: text chunks as they stream, then the token counts."""

    prompt_tokens: int
    completion_tokens: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)


class CancelOnEvent:
    """A transformers StoppingCriteria that ends `generate` once the client has gone away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> bool:
        return self.event.is_set()


class NaiveModel:
    """A transformers model and tokenizer behind a lock: strictly one generation at a time."""

    def __init__(self, model_dir: Path, name: str, threads: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        # float32 on CPU: fp16 matmuls are many times slower there; an AWQ folder dispatches
        # its Linears to gptqmodel's CPU kernel whatever the activation dtype.
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, device_map="cpu"
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.name = name
        self.lock = asyncio.Lock()

    def generate_kwargs(self, req: ChatCompletionRequest, gen: Generation) -> dict[str, Any]:
        """`generate` arguments for one request; ignore_eos is min_new_tokens = max_tokens."""
        from transformers import StoppingCriteriaList

        max_tokens = req.resolved_max_tokens(DEFAULT_MAX_TOKENS)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "do_sample": req.temperature > 0,
            # Saved AWQ configs carry use_cache=False (from calibration); decoding needs it.
            "use_cache": True,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            "stopping_criteria": StoppingCriteriaList([CancelOnEvent(gen.cancel)]),
        }
        if req.temperature > 0:
            kwargs.update(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or None)
        if req.ignore_eos:
            kwargs["min_new_tokens"] = max_tokens
        return kwargs

    async def stream(self, req: ChatCompletionRequest, gen: Generation) -> AsyncIterator[str]:
        """Yield text chunks of one generation; waits for the lock first (the naive queue)."""
        from transformers import TextIteratorStreamer

        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = chat_prompt_ids(self.tokenizer, messages)
        gen.prompt_tokens = len(ids)
        async with self.lock:
            streamer = TextIteratorStreamer(
                self.tokenizer, skip_prompt=True, skip_special_tokens=True
            )
            inputs = torch.tensor([ids])
            result: dict[str, torch.Tensor] = {}

            def run() -> None:
                with torch.inference_mode():
                    result["out"] = self.model.generate(
                        inputs,
                        attention_mask=torch.ones_like(inputs),
                        streamer=streamer,
                        **self.generate_kwargs(req, gen),
                    )

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            try:
                chunks = iter(streamer)
                while (text := await asyncio.to_thread(next, chunks, None)) is not None:
                    if text:
                        yield text
            finally:
                # A client that left must not keep the model busy, and the lock is released
                # only after generate returned: one generation at a time, strictly.
                gen.cancel.set()
                await asyncio.to_thread(thread.join)
            if "out" in result:
                gen.completion_tokens = int(result["out"].shape[1]) - len(ids)


def parse_chat(raw: bytes) -> ChatCompletionRequest:
    """Validate a chat request body; errors become the OpenAI 400 body."""
    try:
        return ChatCompletionRequest.model_validate(json.loads(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, first["msg"], param=param) from exc


def final_event(gen: Generation, max_tokens: int) -> Finished:
    """The replica's final event, which openai_format turns into usage and finish_reason."""
    reason = "length" if gen.completion_tokens >= max_tokens else "stop"
    return Finished(reason, Usage(gen.prompt_tokens, gen.completion_tokens))


async def sse_stream(
    served: NaiveModel, req: ChatCompletionRequest, gen: Generation, rid: str
) -> AsyncIterator[bytes]:
    """The chat stream: role chunk, text chunks, finish chunk, optional usage, [DONE]."""
    yield fmt.sse(fmt.chunk("chat", rid, served.name, None, role=True))
    async for text in served.stream(req, gen):
        yield fmt.sse(fmt.chunk("chat", rid, served.name, text))
    final = final_event(gen, req.resolved_max_tokens(DEFAULT_MAX_TOKENS))
    yield fmt.sse(fmt.chunk("chat", rid, served.name, None, fmt.FINISH_REASONS[final.reason]))
    if req.stream_options and req.stream_options.include_usage:
        yield fmt.sse(fmt.usage_chunk("chat", rid, served.name, final))
    yield fmt.sse("[DONE]")


def build_app(served: NaiveModel) -> FastAPI:
    """The HTTP API: /v1/models, /v1/chat/completions (JSON or SSE), /health."""
    app = FastAPI(title="naive one-at-a-time server (benchmark baseline)")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": served.name, "object": "model", "owned_by": "naive-server"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req = parse_chat(await request.body())
        if req.model != served.name:
            raise ApiError(404, f"The model '{req.model}' does not exist.", param="model")
        rid, gen = uuid.uuid4().hex, Generation(prompt_tokens=0)
        if req.stream:
            return StreamingResponse(
                sse_stream(served, req, gen, rid), media_type="text/event-stream"
            )
        text = "".join([t async for t in served.stream(req, gen)])
        final = final_event(gen, req.resolved_max_tokens(DEFAULT_MAX_TOKENS))
        return JSONResponse(fmt.full_response("chat", rid, served.name, text, final))

    return app


def ensure_loopback_host(host: str) -> str:
    """Bind only to this machine: the baseline has no auth and must not face a network."""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"--host {host!r} is not a loopback address (use 127.0.0.1)")
    return host


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.naive_server",
        description="One-request-at-a-time OpenAI-compatible server (benchmark baseline).",
    )
    p.add_argument("--model-dir", type=Path, required=True, help="HF model folder (AWQ or FP)")
    p.add_argument("--model-name", help="name served in /v1/models (default: folder name)")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host = ensure_loopback_host(args.host)
    except ValueError as exc:
        parser.error(str(exc))
    served = NaiveModel(args.model_dir, args.model_name or args.model_dir.name, args.threads)
    uvicorn.run(build_app(served), host=host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
