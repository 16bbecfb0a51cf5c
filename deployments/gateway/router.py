"""The ingress: OpenAI-compatible API plus the seed API, over admission and relay.

Holds no model and imports neither torch nor transformers. Each route turns its body into a
`protocol.GenerateRequest`; `Admission` decides whether it may run and records how it ended,
`Relay` carries it to a replica and back.
"""

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.config import AppArgs, RouterUserConfig
from deployments.errors import ApiError, ModelNotFoundError
from deployments.gateway import openai_format as fmt
from deployments.gateway.admission import CLIENT_CLOSED, Admission, Call
from deployments.gateway.health import RETRY_AFTER_S, HealthMonitor
from deployments.gateway.openapi_docs import document_bodies, error_responses, json_body
from deployments.gateway.relay import Relay
from deployments.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateResponse,
    SamplingFields,
    SeedGenerateRequest,
)
from deployments.gateway.traffic import TrafficSplit, choose_variant
from deployments.logging_setup import configure_logging
from deployments.metrics import RouterMetrics
from deployments.protocol import Finished, GenerateRequest, Message, SamplingParams

REQUEST_ID_HEADER = "X-Request-Id"
# Which served model answered: for an alias, the variant its split chose for this client.
VARIANT_HEADER = "X-AWQ-Variant"

fastapi_app = FastAPI(title="awq-serve", description="OpenAI-compatible AWQ model server")
document_bodies(fastapi_app, [ChatCompletionRequest, CompletionRequest, SeedGenerateRequest])


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


@fastapi_app.exception_handler(RequestValidationError)
async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    # A bad query parameter (`/health?detail=maybe`): 400 with the OpenAI body, never 422.
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    err = ApiError(400, f"Invalid '{param}': {first.get('msg', 'invalid')}.", param=param,
                   code="invalid_value")  # fmt: skip
    return JSONResponse(err.body(), status_code=400)


@fastapi_app.exception_handler(StarletteHTTPException)
async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = ApiError(exc.status_code, str(exc.detail), code="not_found")
    return JSONResponse(err.body(), status_code=exc.status_code)


class EndedStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls `on_closed` however sending it ended.

    The body generator's own `finally` covers a stream that started; a client that leaves
    before the first byte cancels the response before the generator ever runs, and only this
    sees it (so the request's concurrency slot and tokens still come back)."""

    def __init__(self, content: Any, on_closed: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_closed = on_closed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_closed()


def sampling_params(req: SamplingFields, default_max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=req.resolved_max_tokens(default_max_tokens),
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        stop=tuple(req.stop or ()),
        ignore_eos=req.ignore_eos,
    )


def engine_request_id() -> str:
    """The id the engine keys work by: made here, so two clients sending the same
    X-Request-Id cannot cancel each other."""
    return uuid.uuid4().hex


@serve.ingress(fastapi_app)
class Router:
    def __init__(self, args: dict[str, Any] | AppArgs, handles: dict[str, DeploymentHandle]):
        self.args = AppArgs.model_validate(args) if isinstance(args, dict) else args
        self.handles = handles
        self.models = {m.name: m for m in self.args.models}
        self.configured_splits = {a.name: a.split for a in self.args.aliases}
        self.splits: dict[str, TrafficSplit] = dict(self.configured_splits)
        self.metrics = RouterMetrics(
            {m.name: m.gpu_dollars_per_hour for m in self.args.models}, aliases=self.splits
        )
        self.admission = Admission(self.args, self.metrics)
        self.relay = Relay(handles, self.args.request_timeout_s, self._variant)
        self.health_monitor = HealthMonitor(handles)
        configure_logging(self.args.log_level)
        # Serve builds the replica on its event loop; without one, the first /health starts it.
        with contextlib.suppress(RuntimeError):
            self.health_monitor.start()

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Live split weights (`awq-serve rollout` / `rollback`, `serve deploy`), no restart.

        The configured aliases are the base and the user_config's splits replace theirs, so an
        alias dropped from the user_config returns to its configured split.
        """
        live = RouterUserConfig.model_validate(user_config or {})
        live.check(self.args)
        self.splits = {**self.configured_splits, **live.splits}

    def _variant(self, call: Call, sticky: str | None) -> str:
        if call.model in self.splits:
            key = sticky or call.key_id
            # Keyed by alias too, so one user's draws for different aliases are independent.
            sticky_key = None if key is None else f"{call.model}:{key}"
            return choose_variant(self.splits[call.model], sticky_key)
        if call.model in self.handles:
            return call.model
        raise ModelNotFoundError(call.model, [*self.models, *self.splits])

    def _default_max_tokens(self, model: str) -> int:
        if model in self.splits:
            model = next(iter(self.splits[model].variants))
        return self.models[model].default_max_tokens if model in self.models else 256

    @staticmethod
    def _headers(call: Call) -> dict[str, str]:
        return {**call.headers, VARIANT_HEADER: call.variant}

    def _ended(self, call: Call, status: int, final: Finished | None, text: str) -> None:
        if self.args.audit.log_prompts and not call.ended:
            call.completion = text
        self.admission.finish(call, status, final, text)

    @contextlib.contextmanager
    def _recorded(self, call: Call) -> Iterator[None]:
        """An exception here ends the call's record: an ApiError as its status; any other is
        the client leaving (the task was cancelled) or a bug. Either way the request's slot and
        unused tokens come back."""
        try:
            yield
        except ApiError as e:
            self.admission.fail(call, e)
            raise
        except BaseException as e:
            cancelled = isinstance(e, asyncio.CancelledError)
            self.admission.finish(call, CLIENT_CLOSED if cancelled else 500, None)
            raise

    async def _complete(
        self, call: Call, request: GenerateRequest, sticky: str | None
    ) -> tuple[str, Finished]:
        """Run a request to its end (no streaming); every outcome is recorded once."""
        with self._recorded(call):
            text, final = await self.relay.collect(await self.relay.open(call, request, sticky))
        self._ended(call, 200, final, text)
        return text, final

    async def _run(
        self,
        call: Call,
        request: GenerateRequest,
        sticky: str | None,
        stream: bool,
        include_usage: bool,
    ) -> Response:
        if not stream:
            text, final = await self._complete(call, request, sticky)
            body = fmt.full_response(request.kind, call.request_id, call.model, text, final)
            return JSONResponse(body, headers=self._headers(call))
        with self._recorded(call):
            gen = await self.relay.open(call, request, sticky)
        on_end = lambda status, final, text: self._ended(call, status, final, text)  # noqa: E731

        def closed() -> None:
            if not call.ended:  # the body never ran to its end: the client left early
                gen.cancel()
                self._ended(call, CLIENT_CLOSED, None, "")

        return EndedStreamingResponse(
            self.relay.sse(call, gen, request.kind, include_usage, on_end),
            on_closed=closed,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", **self._headers(call)},
        )

    # ---- routes ----------------------------------------------------------------------------
    @fastapi_app.post(
        "/v1/chat/completions",
        openapi_extra=json_body(ChatCompletionRequest, streams=True),
        responses=error_responses(),
    )
    async def chat_completions(self, request: Request) -> Response:
        call, req = await self.admission.begin(
            request, ChatCompletionRequest, "chat", self._default_max_tokens
        )
        engine_request = GenerateRequest(
            request_id=engine_request_id(),
            kind="chat",
            params=sampling_params(req, self._default_max_tokens(call.model)),
            messages=tuple(Message(m.role, m.text()) for m in req.messages),
            trace_id=call.request_id,
        )
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return await self._run(call, engine_request, req.user, req.stream, usage)

    @fastapi_app.post(
        "/v1/completions",
        openapi_extra=json_body(CompletionRequest, streams=True),
        responses=error_responses(),
    )
    async def completions(self, request: Request) -> Response:
        call, req = await self.admission.begin(
            request, CompletionRequest, "completions", self._default_max_tokens
        )
        engine_request = GenerateRequest(
            request_id=engine_request_id(),
            kind="completion",
            params=sampling_params(req, self._default_max_tokens(call.model)),
            prompt=req.prompt_text(),
            trace_id=call.request_id,
        )
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return await self._run(call, engine_request, req.user, req.stream, usage)

    @fastapi_app.post(
        "/generate",
        response_model=GenerateResponse,
        openapi_extra=json_body(SeedGenerateRequest),
        responses=error_responses(),
    )
    async def generate(self, request: Request) -> JSONResponse:
        call, req = await self.admission.begin(
            request, SeedGenerateRequest, "generate", self._default_max_tokens
        )
        params = SamplingParams(
            max_tokens=req.max_new_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
        )
        if req.use_chat_template:
            engine_request = GenerateRequest(
                engine_request_id(),
                "chat",
                params,
                messages=(Message("user", req.prompt),),
                trace_id=call.request_id,
            )
        else:
            engine_request = GenerateRequest(
                engine_request_id(),
                "completion",
                params,
                prompt=req.prompt,
                trace_id=call.request_id,
            )
        text, final = await self._complete(call, engine_request, None)
        elapsed = time.perf_counter() - call.started
        n = final.usage.completion_tokens
        response = GenerateResponse(
            generated_text=text,
            inference_time=elapsed,
            tokens_generated=n,
            tokens_per_second=n / elapsed if elapsed > 0 else 0.0,
            memory_used=final.memory_mb,
            model=call.model,
        )
        return JSONResponse(response.model_dump(), headers=self._headers(call))

    @fastapi_app.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        self.admission.authenticate_path(request)
        names = [*self.splits, *self.models]
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "awq-serve"} for n in names
            ],
        }

    @fastapi_app.get("/health")
    async def health(self, request: Request, detail: bool = False) -> JSONResponse:
        """Ready or not per model, from Serve's controller (refreshed every second, never
        through a replica's queue); 503 while a model has no running replica. `?detail=1` adds
        each replica's last reported info and needs a key when auth is on."""
        self.admission.authenticate_path(request, always=detail)
        self.health_monitor.start()
        status, body = await self.health_monitor.report(detail)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return JSONResponse(body, status_code=status, headers=headers)

    @fastapi_app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        self.admission.authenticate_path(request)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")
