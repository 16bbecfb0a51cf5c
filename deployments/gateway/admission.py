"""The router's gate: who is calling, whether they may, and the record of how it ended.

The per-IP request limit (charged before the key is checked), authentication, per-key limits,
the limits of clients without a key (requests in flight, tokens per minute per IP), token
budgets (reserved on admission, settled with the real usage), and one `finish` that releases,
settles, counts, logs and audits every request exactly once.
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
from deployments.gateway.client_limits import ConcurrencyLease, ConcurrencyLimiter, TokenBudget
from deployments.gateway.rate_limit import RateDecision, RateLimiter
from deployments.gateway.request_parsing import parse_body
from deployments.metrics import RouterMetrics
from deployments.protocol import Finished, Usage

log = logging.getLogger("awq_serve.router")
# The status recorded for a request whose client went away (nginx's convention).
CLIENT_CLOSED = 499
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
    prompt_tokens_estimate: int = 0
    # A slot of the client's concurrency cap; `finish` releases it.
    lease: ConcurrencyLease | None = None
    ended: bool = False  # `finish` has run: every later call of it is a no-op
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
        # Anonymous clients' limits, this router replica's share of them.
        self.concurrency = ConcurrencyLimiter.from_config(args.client_limits, args.router_replicas)
        self.ip_tokens = TokenBudget.from_config(args.client_limits, args.router_replicas)
        self.audit = AuditLog(args.audit) if args.audit.enabled else None
        self.metrics = metrics

    def client_ip(self, request: Request) -> str:
        peer = request.client.host if request.client else None
        return self.args.client_identity.client_ip(peer, request.headers)

    def authenticate_path(self, request: Request, always: bool = False) -> None:
        """For the GET endpoints: a key when the config says the path needs one (or `always`
        while auth is on). Its IP pays for the request first, so guessing keys meets 429s."""
        if self.keys.requires_auth(request.url.path) or (always and self.keys.config.enabled):
            self.limiter.check_ip(self.client_ip(request)).raise_if_denied()
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
            client_ip=self.client_ip(request),
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
        # The IP pays for the request before its key is checked: key guessing meets 429s.
        ip_decision = self.limiter.check_ip(call.client_ip)
        self._charge(call, ip_decision)
        if self.keys.requires_auth(request.url.path):
            call.record = self.keys.authenticate(request.headers.get("authorization"))
            call.key_id = call.record.key_id
            key_decision = self.limiter.check_key(call.key_id, call.record.requests_per_minute)
            key_decision.raise_if_denied()
            call.headers.update(RateDecision.tightest(ip_decision, key_decision).headers())
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
        if call.record is None:
            # Last check that can refuse, but before tokens: a client at its cap is told so.
            call.lease = self.concurrency.acquire(call.client_ip)
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
        """Take the estimated prompt + max_tokens from the key's per-minute token budget, or
        from the IP's when there is no key."""
        call.prompt_tokens_estimate = estimate_prompt_tokens(prompt)
        estimate = call.prompt_tokens_estimate + max_tokens
        if call.record is not None:
            decision = self.limiter.check_tokens(
                call.record.key_id, estimate, call.record.tokens_per_minute
            )
        elif self.ip_tokens is not None:
            decision = self.ip_tokens.reserve(call.client_ip, estimate)
        else:
            return
        self._charge(call, decision)
        if decision.scope != "off":
            call.reserved_tokens = estimate

    def _settle_tokens(self, call: Call, used: int) -> None:
        """Refund the reserved tokens a request did not use."""
        if call.reserved_tokens <= 0:
            return
        reserved, call.reserved_tokens = call.reserved_tokens, 0
        if call.record is not None:
            self.limiter.refund_tokens(
                call.record.key_id, reserved - used, call.record.tokens_per_minute
            )
        elif self.ip_tokens is not None:
            self.ip_tokens.settle(call.client_ip, reserved, used)

    @staticmethod
    def used_tokens(call: Call, status: int, final: Finished | None, partial: str) -> int:
        """What a request cost: the replica's count when it finished; when it did not, the
        estimate of what ran (the prompt and the text sent) if the client left or had output,
        else nothing (refused or failed before any work showed)."""
        if final is not None:
            return final.usage.total_tokens
        if partial or status == CLIENT_CLOSED:
            return call.prompt_tokens_estimate + (estimate_prompt_tokens(partial) if partial else 0)
        return 0

    def finish(self, call: Call, status: int, final: Finished | None, partial: str = "") -> None:
        """Release, settle, count, log and audit a request that has ended, whatever its
        outcome; exactly once (later calls, e.g. from a backstop, do nothing). `partial` is the
        text sent before a request ended without `final`."""
        if call.ended:
            return
        call.ended = True
        if call.lease is not None:
            call.lease.release()
        usage = final.usage if final is not None else Usage()
        self._settle_tokens(call, self.used_tokens(call, status, final, partial))
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
