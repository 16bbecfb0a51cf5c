"""The ingress: OpenAI-compatible API plus the seed API, with auth, limits, audit and routing.

Holds no model and imports neither torch nor transformers: it validates, authenticates,
rate-limits, picks a variant, and relays the replica's event stream as JSON or SSE.
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import openai_format as fmt
from deployments.audit import AuditLog, AuditRecord
from deployments.auth import KeyStore
from deployments.config import AppArgs
from deployments.errors import ApiError, ModelNotFoundError, OverloadedError
from deployments.metrics import RouterMetrics
from deployments.rate_limit import RateLimiter
from deployments.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
    SamplingFields,
)
from deployments.traffic import TrafficSplit, choose_variant

log = logging.getLogger("awq_serve.router")

REQUEST_ID_HEADER = "X-Request-Id"
# A replica that dies before answering is retried on another; after output started it is not.
ATTEMPTS = 3

fastapi_app = FastAPI(title="awq-serve", description="OpenAI-compatible AWQ model server")


@fastapi_app.middleware("http")
async def request_id_middleware(request: Request, call_next):
    # Serve's proxy already echoes the client's X-Request-Id (or makes one) on every response;
    # reuse its id so logs, audit lines and the header agree.
    from ray.serve.context import _get_serve_request_context

    request_id = _get_serve_request_context().request_id or request.headers.get(
        REQUEST_ID_HEADER, uuid.uuid4().hex
    )
    request.state.request_id = request_id[:128]
    return await call_next(request)


@fastapi_app.exception_handler(ApiError)
async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@fastapi_app.exception_handler(StarletteHTTPException)
async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = ApiError(exc.status_code, str(exc.detail), code="not_found")
    return JSONResponse(err.body(), status_code=exc.status_code)


def parse_json(raw: bytes, model: type[BaseModel]) -> Any:
    """Parse and validate a body; errors become 400s naming the offending field."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from e
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        code = "missing_required_parameter" if first["type"] == "missing" else "invalid_value"
        raise ApiError(400, f"Invalid '{param}': {first['msg']}.", param=param, code=code) from e


def sampling_params(req: SamplingFields, default_max_tokens: int) -> dict[str, Any]:
    return {
        "max_tokens": req.resolved_max_tokens(default_max_tokens),
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "seed": req.seed,
        "stop": tuple(req.stop or ()),
        "ignore_eos": req.ignore_eos,
    }


@dataclass
class Call:
    """One request's context as it moves through the router."""

    request_id: str
    started: float
    client_ip: str
    endpoint: str
    key_id: str | None = None
    model: str = "-"
    variant: str = "-"
    status: int = 200
    final: dict[str, Any] | None = None


@serve.ingress(fastapi_app)
class Router:
    def __init__(self, args: dict[str, Any] | AppArgs, handles: dict[str, DeploymentHandle]):
        self.args = AppArgs.model_validate(args) if isinstance(args, dict) else args
        self.handles = handles
        self.models = {m.name: m for m in self.args.models}
        self.splits: dict[str, TrafficSplit] = {a.name: a.split for a in self.args.aliases}
        self.keys = KeyStore.from_config(self.args.auth)
        self.limiter = RateLimiter(self.args.rate_limit)
        self.audit = AuditLog(self.args.audit) if self.args.audit.enabled else None
        self.metrics = RouterMetrics()
        logging.getLogger("awq_serve").setLevel(self.args.log_level.upper())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live traffic-split changes (canary weights, rollout, rollback) without restarts."""
        for name, variants in (user_config.get("splits") or {}).items():
            if name not in self.splits:
                raise ValueError(f"unknown alias '{name}'; aliases: {sorted(self.splits)}")
            split = TrafficSplit(variants=variants)
            unknown = set(split.variants) - set(self.handles)
            if unknown:
                raise ValueError(f"alias '{name}' names unknown variants {sorted(unknown)}")
            self.splits[name] = split

    # ---- request gate ----------------------------------------------------------------------
    async def _begin(self, request: Request, schema: type[BaseModel], endpoint: str):
        call = Call(
            request_id=request.state.request_id,
            started=time.perf_counter(),
            client_ip=request.client.host if request.client else "-",
            endpoint=endpoint,
        )
        record = None
        if self.keys.requires_auth(request.url.path):
            record = self.keys.authenticate(request.headers.get("authorization"))
            call.key_id = record.key_id
        decision = self.limiter.check_request(
            call.client_ip, call.key_id, record.requests_per_minute if record else None
        )
        decision.raise_if_denied()
        raw = await request.body()
        if len(raw) > self.args.max_body_bytes:
            raise ApiError(
                413,
                f"Request body over {self.args.max_body_bytes} bytes.",
                code="request_too_large",
            )
        req = parse_json(raw, schema)
        call.model = getattr(req, "model", None) or self.args.default_model
        if record is not None:
            self.keys.authorize(record, call.model)
        return call, req

    def _variant(self, call: Call, sticky: str | None) -> str:
        if call.model in self.splits:
            return choose_variant(self.splits[call.model], sticky or call.key_id)
        if call.model in self.handles:
            return call.model
        raise ModelNotFoundError(call.model, [*self.models, *self.splits])

    def _finish(self, call: Call, status: int, final: dict[str, Any] | None) -> None:
        latency = time.perf_counter() - call.started
        self.metrics.observe(call.model, call.variant, status, latency, final)
        if self.audit is None:
            return
        self.audit.write(
            AuditRecord(
                request_id=call.request_id,
                key_id=call.key_id,
                client_ip=call.client_ip,
                model=call.model,
                variant=call.variant,
                endpoint=call.endpoint,
                status=status,
                prompt_tokens=(final or {}).get("prompt_tokens", 0),
                completion_tokens=(final or {}).get("completion_tokens", 0),
                latency_ms=latency * 1000,
            )
        )

    # ---- relaying the replica stream -------------------------------------------------------
    async def _open(self, call: Call, body: dict[str, Any], sticky: str | None):
        """Start the replica stream; returns (generator, first event). Retries dead replicas."""
        last: Exception | None = None
        for _ in range(ATTEMPTS):
            call.variant = self._variant(call, sticky)
            gen = self.handles[call.variant].options(stream=True).generate.remote(body)
            try:
                async with asyncio.timeout(self.args.request_timeout_s):
                    first = await gen.__anext__()
            except BackPressureError as e:
                raise OverloadedError() from e
            except TimeoutError as e:
                gen.cancel()
                raise ApiError(
                    504, "Timed out waiting for a replica.", type="timeout", code="timeout"
                ) from e
            except RayActorError as e:
                last = e
                log.warning("replica died before answering %s; retrying", call.request_id)
                continue
            if "error" in first:
                e = first["error"]
                raise ApiError(
                    e["status"],
                    e["message"],
                    type=e["type"],
                    param=e["param"],
                    code=e["code"],
                    headers=e.get("headers"),
                )
            return gen
        raise ApiError(
            503,
            f"No replica could take the request ({last}).",
            type="server_error",
            code="replica_unavailable",
            headers={"Retry-After": "1"},
        )

    async def _collect(self, call: Call, gen) -> tuple[str, dict[str, Any]]:
        parts: list[str] = []
        try:
            async with asyncio.timeout(self.args.request_timeout_s):
                async for event in gen:
                    parts.append(event["text"])
                    if "finish_reason" in event:
                        final = event
                        break
                else:
                    raise ApiError(502, "The replica ended the stream early.", type="server_error")
        except TimeoutError as e:
            gen.cancel()
            raise ApiError(
                504,
                f"Request exceeded {self.args.request_timeout_s}s.",
                type="timeout",
                code="timeout",
            ) from e
        except RayActorError as e:
            raise ApiError(
                503,
                "The replica serving this request died; retry.",
                type="server_error",
                code="replica_died",
                headers={"Retry-After": "1"},
            ) from e
        if "error" in final:
            e = final["error"]
            raise ApiError(
                e["status"], e["message"], type=e["type"], code=e["code"], headers=e.get("headers")
            )
        return "".join(parts), final

    async def _run(
        self, call: Call, body: dict, sticky: str | None, stream: bool, include_usage: bool
    ) -> Response:
        try:
            gen = await self._open(call, body, sticky)
        except ApiError as e:
            self._finish(call, e.status, None)
            raise
        if stream:
            return StreamingResponse(
                self._sse(call, gen, body["kind"], include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            text, final = await self._collect(call, gen)
        except ApiError as e:
            self._finish(call, e.status, None)
            raise
        self._finish(call, 200, final)
        return JSONResponse(
            fmt.full_response(body["kind"], call.request_id, call.model, text, final)
        )

    async def _sse(self, call: Call, gen, kind: str, include_usage: bool) -> AsyncIterator[bytes]:
        final: dict[str, Any] | None = None
        status = 200
        try:
            if kind == "chat":
                yield fmt.sse(fmt.chunk(kind, call.request_id, call.model, None, role=True))
            async for event in gen:
                if "finish_reason" in event:
                    final = event
                    if "error" in event:
                        status = event["error"]["status"]
                        yield fmt.sse(
                            {
                                "error": {
                                    k: event["error"][k]
                                    for k in ("message", "type", "param", "code")
                                }
                            }
                        )
                        break
                    if event["text"]:
                        yield fmt.sse(fmt.chunk(kind, call.request_id, call.model, event["text"]))
                    reason = fmt.FINISH_REASONS[event["finish_reason"]]
                    yield fmt.sse(fmt.chunk(kind, call.request_id, call.model, None, reason))
                    if include_usage:
                        yield fmt.sse(fmt.usage_chunk(kind, call.request_id, call.model, event))
                    break
                yield fmt.sse(fmt.chunk(kind, call.request_id, call.model, event["text"]))
            yield fmt.sse("[DONE]")
        except RayActorError:
            status = 503
            yield fmt.sse(
                {
                    "error": {
                        "message": "The replica died mid-stream; retry.",
                        "type": "server_error",
                        "param": None,
                        "code": "replica_died",
                    }
                }
            )
        finally:
            if final is None:  # client disconnected or replica died: stop the generation
                gen.cancel()
                status = status if status != 200 else 499
            self._finish(call, status, final if status == 200 else None)

    # ---- routes ----------------------------------------------------------------------------
    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        call, req = await self._begin(request, ChatCompletionRequest, "chat")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        default = self._default_max_tokens(call)
        body = {
            "request_id": call.request_id,
            "kind": "chat",
            "messages": messages,
            "params": sampling_params(req, default),
        }
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return await self._run(call, body, req.user, req.stream, usage)

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        call, req = await self._begin(request, CompletionRequest, "completions")
        default = self._default_max_tokens(call)
        body = {
            "request_id": call.request_id,
            "kind": "completion",
            "prompt": req.prompt_text(),
            "params": sampling_params(req, default),
        }
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return await self._run(call, body, req.user, req.stream, usage)

    @fastapi_app.post("/generate")
    async def generate(self, request: Request) -> GenerateResponse:
        call, req = await self._begin(request, GenerateRequest, "generate")
        params = {
            "max_tokens": req.max_new_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
        }
        body: dict[str, Any] = {"request_id": call.request_id, "params": params}
        if req.use_chat_template:
            body.update(kind="chat", messages=[{"role": "user", "content": req.prompt}])
        else:
            body.update(kind="completion", prompt=req.prompt)
        gen = await self._open(call, body, None)
        try:
            text, final = await self._collect(call, gen)
        except ApiError as e:
            self._finish(call, e.status, None)
            raise
        self._finish(call, 200, final)
        elapsed = time.perf_counter() - call.started
        n = final["completion_tokens"]
        return GenerateResponse(
            generated_text=text,
            inference_time=elapsed,
            tokens_generated=n,
            tokens_per_second=n / elapsed if elapsed > 0 else 0.0,
            memory_used=final.get("memory_mb", 0.0),
            model=call.model,
        )

    def _default_max_tokens(self, call: Call) -> int:
        name = call.model
        if name in self.splits:
            name = next(iter(self.splits[name].variants))
        return self.models[name].default_max_tokens if name in self.models else 256

    @fastapi_app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        if self.keys.requires_auth(request.url.path):
            self.keys.authenticate(request.headers.get("authorization"))
        names = [*self.splits, *self.models]
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "awq-serve"} for n in names
            ],
        }

    @fastapi_app.get("/health")
    async def health(self, request: Request) -> JSONResponse:
        if self.keys.requires_auth(request.url.path):
            self.keys.authenticate(request.headers.get("authorization"))
        models: dict[str, Any] = {}
        for name, handle in self.handles.items():
            try:
                async with asyncio.timeout(5):
                    models[name] = await handle.info.remote()
            except Exception as e:  # any failure means "not ready", reported, never raised
                models[name] = {"healthy": False, "error": type(e).__name__}
        ready = all(m.get("healthy") for m in models.values())
        body = {"status": "ok" if ready else "unavailable", "models": models}
        return JSONResponse(body, status_code=200 if ready else 503)

    @fastapi_app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        if self.keys.requires_auth(request.url.path):
            self.keys.authenticate(request.headers.get("authorization"))
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")
