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
from dataclasses import dataclass, field
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
from deployments.auth import ApiKeyRecord, KeyStore
from deployments.config import AppArgs, RouterUserConfig
from deployments.errors import ApiError, ModelNotFoundError, OverloadedError
from deployments.health import health_report, replica_counts, replica_info
from deployments.logging_setup import configure_logging
from deployments.metrics import RouterMetrics
from deployments.rate_limit import RateDecision, RateLimiter
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
# Which served model answered: for an alias, the variant its split chose for this client.
VARIANT_HEADER = "X-AWQ-Variant"
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


def estimate_prompt_tokens(text: str) -> int:
    """Prompt tokens for the per-key token budget, before any tokenizer has seen the text.

    The router holds no tokenizer, so it counts ~4 characters per token (about right for
    English with BPE vocabularies). The reservation (estimate + max_tokens) is settled when the
    replica reports the real counts: the unused part is refunded.
    """
    return len(text) // 4 + 1


@dataclass
class Call:
    """One request's context as it moves through the router."""

    request_id: str
    started: float
    client_ip: str
    endpoint: str
    key_id: str | None = None
    record: ApiKeyRecord | None = None
    model: str = "-"
    variant: str = "-"
    # Rate-limit headers of this request's decisions; they go on its response.
    headers: dict[str, str] = field(default_factory=dict)
    reserved_tokens: int = 0
    prompt: str | None = None  # only kept when the audit log records text
    completion: str | None = None


@serve.ingress(fastapi_app)
class Router:
    def __init__(self, args: dict[str, Any] | AppArgs, handles: dict[str, DeploymentHandle]):
        self.args = AppArgs.model_validate(args) if isinstance(args, dict) else args
        self.handles = handles
        self.models = {m.name: m for m in self.args.models}
        self.configured_splits = {a.name: a.split for a in self.args.aliases}
        self.splits: dict[str, TrafficSplit] = dict(self.configured_splits)
        self.keys = KeyStore.from_config(self.args.auth)
        self.limiter = RateLimiter(self.args.rate_limit)
        self.audit = AuditLog(self.args.audit) if self.args.audit.enabled else None
        self.metrics = RouterMetrics(
            {m.name: m.gpu_dollars_per_hour for m in self.args.models}, aliases=self.splits
        )
        configure_logging(self.args.log_level)

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Live split weights (`awq-serve rollout` / `rollback`, `serve deploy`), no restart.

        The configured aliases are the base and the user_config's splits replace theirs, so an
        alias dropped from the user_config returns to its configured split.
        """
        live = RouterUserConfig.model_validate(user_config or {})
        live.check(self.args)
        self.splits = {**self.configured_splits, **live.splits}

    # ---- request gate ----------------------------------------------------------------------
    async def _begin(self, request: Request, schema: type[BaseModel], endpoint: str):
        """Admit a request; a refused one (401/403/413/429/400) is audited, then raised."""
        call = Call(
            request_id=request.state.request_id,
            started=time.perf_counter(),
            client_ip=request.client.host if request.client else "-",
            endpoint=endpoint,
        )
        try:
            req = await self._admit(request, call, schema)
        except ApiError as e:
            self._finish(call, e.status, None)
            raise
        return call, req

    async def _admit(self, request: Request, call: Call, schema: type[BaseModel]) -> Any:
        if self.keys.requires_auth(request.url.path):
            call.record = self.keys.authenticate(request.headers.get("authorization"))
            call.key_id = call.record.key_id
        key_rpm = call.record.requests_per_minute if call.record else None
        self._charge(call, self.limiter.check_request(call.client_ip, call.key_id, key_rpm))
        raw = await self._body(request)
        req = parse_json(raw, schema)
        call.model = getattr(req, "model", None) or self.args.default_model
        if call.record is not None:
            self.keys.authorize(call.record, call.model)
        prompt = req.prompt_text()
        if self.args.audit.log_prompts:
            call.prompt = prompt
        self._reserve_tokens(call, prompt, req.resolved_max_tokens(self._default_max_tokens(call)))
        return req

    async def _body(self, request: Request) -> bytes:
        """The body, refused with 413 past the cap (by Content-Length before reading it)."""
        limit = self.args.max_body_bytes
        too_large = ApiError(413, f"Request body over {limit} bytes.", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        raw = await request.body()
        if len(raw) > limit:
            raise too_large
        return raw

    def _charge(self, call: Call, decision: RateDecision) -> None:
        """429 if the decision denies; else its x-ratelimit-* headers go on the response."""
        decision.raise_if_denied()
        call.headers.update(decision.headers())

    def _reserve_tokens(self, call: Call, prompt: str, max_tokens: int) -> None:
        """Take the estimated prompt + max_tokens from the key's per-minute token budget."""
        if call.record is None:
            return
        estimate = estimate_prompt_tokens(prompt) + max_tokens
        decision = self.limiter.check_tokens(
            call.record.key_id, estimate, call.record.tokens_per_minute
        )
        self._charge(call, decision)
        if decision.scope != "off":
            call.reserved_tokens = estimate

    def _settle_tokens(self, call: Call, final: dict[str, Any] | None) -> None:
        """Refund the reserved tokens a request did not use (all of them if it failed)."""
        if call.record is None or call.reserved_tokens <= 0:
            return
        counts = final or {}
        used = counts.get("prompt_tokens", 0) + counts.get("completion_tokens", 0)
        reserved, call.reserved_tokens = call.reserved_tokens, 0
        self.limiter.refund_tokens(
            call.record.key_id, reserved - used, call.record.tokens_per_minute
        )

    def _variant(self, call: Call, sticky: str | None) -> str:
        if call.model in self.splits:
            key = sticky or call.key_id
            # Keyed by alias too, so one user's draws for different aliases are independent.
            sticky_key = None if key is None else f"{call.model}:{key}"
            return choose_variant(self.splits[call.model], sticky_key)
        if call.model in self.handles:
            return call.model
        raise ModelNotFoundError(call.model, [*self.models, *self.splits])

    def _finish(self, call: Call, status: int, final: dict[str, Any] | None) -> None:
        self._settle_tokens(call, final)
        latency = time.perf_counter() - call.started
        self.metrics.observe(call.model, call.variant, status, latency, final)
        log.info(
            "request finished",
            extra={
                "request_id": call.request_id,
                "endpoint": call.endpoint,
                "model": call.model,
                "variant": call.variant,
                "status": status,
                "latency_ms": round(latency * 1000, 1),
                "completion_tokens": (final or {}).get("completion_tokens", 0),
            },
        )
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
                prompt=call.prompt,
                completion=call.completion,
            )
        )

    def _fail(self, call: Call, error: ApiError) -> None:
        """Record a failed request; its error response keeps the rate-limit headers."""
        error.headers = {**call.headers, **error.headers}
        self._finish(call, error.status, None)

    @staticmethod
    def _headers(call: Call) -> dict[str, str]:
        return {**call.headers, VARIANT_HEADER: call.variant}

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
        if not stream:
            text, final = await self._complete(call, body, sticky)
            return JSONResponse(
                fmt.full_response(body["kind"], call.request_id, call.model, text, final),
                headers=self._headers(call),
            )
        try:
            gen = await self._open(call, body, sticky)
        except ApiError as e:
            self._fail(call, e)
            raise
        return StreamingResponse(
            self._sse(call, gen, body["kind"], include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **self._headers(call)},
        )

    async def _complete(
        self, call: Call, body: dict[str, Any], sticky: str | None
    ) -> tuple[str, dict[str, Any]]:
        """Run a request to its end (no streaming); every outcome is recorded once."""
        try:
            gen = await self._open(call, body, sticky)
            text, final = await self._collect(call, gen)
        except ApiError as e:
            self._fail(call, e)
            raise
        if self.args.audit.log_prompts:
            call.completion = text
        self._finish(call, 200, final)
        return text, final

    async def _sse(self, call: Call, gen, kind: str, include_usage: bool) -> AsyncIterator[bytes]:
        final: dict[str, Any] | None = None
        status = 200
        texts: list[str] = []
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
                        texts.append(event["text"])
                        yield fmt.sse(fmt.chunk(kind, call.request_id, call.model, event["text"]))
                    reason = fmt.FINISH_REASONS[event["finish_reason"]]
                    yield fmt.sse(fmt.chunk(kind, call.request_id, call.model, None, reason))
                    if include_usage:
                        yield fmt.sse(fmt.usage_chunk(kind, call.request_id, call.model, event))
                    break
                texts.append(event["text"])
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
            if self.args.audit.log_prompts:
                call.completion = "".join(texts)
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

    @fastapi_app.post("/generate", response_model=GenerateResponse)
    async def generate(self, request: Request) -> JSONResponse:
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
        text, final = await self._complete(call, body, None)
        elapsed = time.perf_counter() - call.started
        n = final["completion_tokens"]
        response = GenerateResponse(
            generated_text=text,
            inference_time=elapsed,
            tokens_generated=n,
            tokens_per_second=n / elapsed if elapsed > 0 else 0.0,
            memory_used=final.get("memory_mb", 0.0),
            model=call.model,
        )
        return JSONResponse(response.model_dump(), headers=self._headers(call))

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
        infos = await asyncio.gather(*(replica_info(h) for h in self.handles.values()))
        status, body = health_report(
            dict(zip(self.handles, infos, strict=True)), await replica_counts(self.handles)
        )
        return JSONResponse(body, status_code=status)

    @fastapi_app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        if self.keys.requires_auth(request.url.path):
            self.keys.authenticate(request.headers.get("authorization"))
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")
