"""The router's gate: who is calling, whether they may, and the record of how it ended.

Authentication, per-IP and per-key rate limits, the token budget (reserved on admission, settled
with the real usage), and one `finish` that counts, logs and audits every response.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel

from deployments.config import AppArgs
from deployments.errors import ApiError
from deployments.gateway.audit import AuditLog, AuditRecord
from deployments.gateway.auth import ApiKeyRecord, KeyStore
from deployments.gateway.rate_limit import RateDecision, RateLimiter
from deployments.gateway.request_parsing import parse_body
from deployments.metrics import RouterMetrics
from deployments.protocol import Finished, Usage

log = logging.getLogger("awq_serve.router")
M = TypeVar("M", bound=BaseModel)


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


def estimate_prompt_tokens(text: str) -> int:
    """Prompt tokens for the per-key token budget, before any tokenizer has seen the text.

    The router holds no tokenizer, so it counts ~4 characters per token (about right for
    English with BPE vocabularies). The reservation (estimate + max_tokens) is settled when the
    replica reports the real counts: the unused part is refunded.
    """
    return len(text) // 4 + 1


class Admission:
    def __init__(self, args: AppArgs, metrics: RouterMetrics) -> None:
        self.args = args
        self.keys = KeyStore.from_config(args.auth)
        self.limiter = RateLimiter(args.rate_limit)
        self.audit = AuditLog(args.audit) if args.audit.enabled else None
        self.metrics = metrics

    def authenticate_path(self, request: Request) -> None:
        """For the GET endpoints: a key when the config says the path needs one."""
        if self.keys.requires_auth(request.url.path):
            self.keys.authenticate(request.headers.get("authorization"))

    async def begin(
        self,
        request: Request,
        schema: type[M],
        endpoint: str,
        default_max_tokens: Callable[[str], int],
    ) -> tuple[Call, M]:
        """Admit a request; a refused one (401/403/413/429/400) is recorded, then raised."""
        call = Call(
            request_id=request.state.request_id,
            started=time.perf_counter(),
            client_ip=self.args.client_identity.client_ip(
                request.client.host if request.client else None, request.headers
            ),
            endpoint=endpoint,
        )
        try:
            req = await self._admit(request, call, schema, default_max_tokens)
        except ApiError as e:
            self.fail(call, e)
            raise
        return call, req

    async def _admit(
        self,
        request: Request,
        call: Call,
        schema: type[M],
        default_max_tokens: Callable[[str], int],
    ) -> M:
        if self.keys.requires_auth(request.url.path):
            call.record = self.keys.authenticate(request.headers.get("authorization"))
            call.key_id = call.record.key_id
        key_rpm = call.record.requests_per_minute if call.record else None
        self._charge(call, self.limiter.check_request(call.client_ip, call.key_id, key_rpm))
        req = parse_body(await self._body(request), schema)
        if (
            getattr(req, "ignore_eos", False)
            and call.record is None
            and not self.args.allow_ignore_eos
        ):
            raise ApiError(
                400,
                "'ignore_eos' is a benchmark switch this server does not accept "
                "from clients without an API key.",
                param="ignore_eos",
                code="unsupported_parameter",
            )
        call.model = getattr(req, "model", None) or self.args.default_model
        if call.record is not None:
            self.keys.authorize(call.record, call.model)
        prompt = req.prompt_text()  # type: ignore[attr-defined]
        if self.args.audit.log_prompts:
            call.prompt = prompt
        max_tokens = req.resolved_max_tokens(default_max_tokens(call.model))  # type: ignore[attr-defined]
        self._reserve_tokens(call, prompt, max_tokens)
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

    def _settle_tokens(self, call: Call, usage: Usage) -> None:
        """Refund the reserved tokens a request did not use (all of them if it failed)."""
        if call.record is None or call.reserved_tokens <= 0:
            return
        reserved, call.reserved_tokens = call.reserved_tokens, 0
        self.limiter.refund_tokens(
            call.record.key_id, reserved - usage.total_tokens, call.record.tokens_per_minute
        )

    def finish(self, call: Call, status: int, final: Finished | None) -> None:
        """Settle, count, log and audit a request that has ended, whatever its outcome."""
        usage = final.usage if final is not None else Usage()
        self._settle_tokens(call, usage)
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
                "completion_tokens": usage.completion_tokens,
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
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                latency_ms=latency * 1000,
                prompt=call.prompt,
                completion=call.completion,
            )
        )

    def fail(self, call: Call, error: ApiError) -> None:
        """Record a failed request; its error response keeps the rate-limit headers."""
        error.headers = {**call.headers, **error.headers}
        self.finish(call, error.status, None)
