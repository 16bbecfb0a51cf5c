"""From the router to a replica and back: open the stream (retrying a dead replica), collect a
whole answer, or relay it as OpenAI SSE chunks. Speaks `deployments.protocol` to the replica."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.errors import ApiError, overloaded
from deployments.gateway import openai_format as fmt
from deployments.gateway.admission import Call
from deployments.protocol import Accepted, Delta, Failed, Finished, GenerateRequest

log = logging.getLogger("awq_serve.router")

# A replica that dies before answering is retried on another; after output started it is not.
ATTEMPTS = 3


def replica_died(where: str) -> ApiError:
    return ApiError(
        503,
        f"The replica serving this request died {where}; retry.",
        type="server_error",
        code="replica_died",
        headers={"Retry-After": "1"},
    )


def timed_out(seconds: float) -> ApiError:
    return ApiError(504, f"Request exceeded {seconds}s.", type="timeout", code="timeout")


class Relay:
    def __init__(
        self,
        handles: dict[str, DeploymentHandle],
        timeout_s: float,
        choose: Callable[[Call, str | None], str],
    ) -> None:
        self.handles = handles
        self.timeout_s = timeout_s
        self.choose = choose  # (call, sticky key) -> the variant to send it to

    async def open(self, call: Call, request: GenerateRequest, sticky: str | None) -> Any:
        """Start the replica stream and read its `Accepted`; returns the stream after it."""
        last: Exception | None = None
        for _ in range(ATTEMPTS):
            call.variant = self.choose(call, sticky)
            gen = self.handles[call.variant].options(stream=True).generate.remote(request)
            try:
                async with asyncio.timeout(self.timeout_s):
                    first = await gen.__anext__()
            except asyncio.CancelledError:  # the client left while it waited
                gen.cancel()
                raise
            except BackPressureError as e:
                raise overloaded() from e
            except TimeoutError as e:
                gen.cancel()
                raise ApiError(
                    504, "Timed out waiting for a replica.", type="timeout", code="timeout"
                ) from e
            except RayActorError as e:
                last = e
                log.warning("replica died before answering %s; retrying", call.request_id)
                continue
            if isinstance(first, Failed):
                raise ApiError.from_info(first.error)
            if not isinstance(first, Accepted):
                raise ApiError(502, "The replica answered out of protocol.", type="server_error")
            return gen
        raise ApiError(
            503,
            f"No replica could take the request ({type(last).__name__}).",
            type="server_error",
            code="replica_unavailable",
            headers={"Retry-After": "1"},
        )

    async def collect(self, gen: Any) -> tuple[str, Finished]:
        """Read a stream to its end: (text, the `Finished` event)."""
        parts: list[str] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                async for event in gen:
                    if isinstance(event, Delta):
                        parts.append(event.text)
                    elif isinstance(event, Finished):
                        parts.append(event.text)
                        return "".join(parts), event
                    elif isinstance(event, Failed):
                        raise ApiError.from_info(event.error)
        except TimeoutError as e:
            gen.cancel()
            raise timed_out(self.timeout_s) from e
        except asyncio.CancelledError:  # the client left: stop the generation
            gen.cancel()
            raise
        except RayActorError as e:
            raise replica_died("mid-request") from e
        raise ApiError(502, "The replica ended the stream early.", type="server_error")

    async def sse(
        self,
        call: Call,
        gen: Any,
        kind: str,
        include_usage: bool,
        on_end: Callable[[int, Finished | None, str], None],
    ) -> AsyncIterator[bytes]:
        """OpenAI SSE chunks ending `data: [DONE]`; an error mid-stream is an SSE error event.
        `on_end(status, final, text)` runs once however the stream ends (499: client left)."""
        final: Finished | None = None
        status = 200
        texts: list[str] = []

        def chunk(text: str | None, reason: str | None = None, role: bool = False) -> bytes:
            return fmt.sse(fmt.chunk(kind, call.request_id, call.model, text, reason, role))

        try:
            if kind == "chat":
                yield chunk(None, role=True)
            async for event in gen:
                if isinstance(event, Failed):
                    status = event.error.status
                    yield fmt.sse(event.error.body())
                    break
                if isinstance(event, Delta | Finished) and event.text:
                    texts.append(event.text)
                    yield chunk(event.text)
                if isinstance(event, Finished):
                    final = event
                    yield chunk(None, fmt.FINISH_REASONS[event.reason])
                    if include_usage:
                        yield fmt.sse(fmt.usage_chunk(kind, call.request_id, call.model, event))
                    break
            yield fmt.sse("[DONE]")
        except RayActorError:
            status = 503
            yield fmt.sse(replica_died("mid-stream").body())
        finally:
            if final is None:  # client disconnected or replica died: stop the generation
                gen.cancel()
                status = status if status != 200 else 499
            on_end(status, final if status == 200 else None, "".join(texts))
