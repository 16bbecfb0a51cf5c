"""The replica's logic against a fake engine: admission, fault isolation, cancellation, events.

Fast tier: no model, no Ray cluster. The same paths run against the real engine in the
end-to-end tests.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deployments.config import ModelConfig
from deployments.model_server import ModelServer
from deployments.protocol import (
    Accepted,
    Delta,
    Event,
    Failed,
    Finished,
    GenerateRequest,
    Message,
    SamplingParams,
)
from tests.fakes.fake_engine import CRASH_WORD, FakeEngine

T = TypeVar("T")


pytestmark = pytest.mark.usefixtures("restore_logger")  # the server configures logging


@pytest.fixture(autouse=True)
def batch_outside_a_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    """`@serve.batch` works in any event loop; only its start-up warning (batch size vs.
    max_ongoing_requests) reads the replica context, which a unit test does not have."""
    from ray.serve import batching

    monkeypatch.setattr(
        batching._BatchQueue,
        "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
        lambda self: None,
    )


# One event loop for the module: `@serve.batch` keeps its queue per decorated method (one replica
# per process in Serve), bound to the loop of its first call.
LOOP = asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return LOOP.run_until_complete(coro)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "fake"}))
    return tmp_path


OPEN: list[ModelServer] = []


@pytest.fixture(autouse=True)
def close_servers() -> Iterator[None]:
    """`@serve.batch` holds every server it saw, so none is ever collected: close them here, or
    their gauge samplers run on into the Ray sessions of later tests."""
    yield
    while OPEN:
        OPEN.pop().close()


def make_server(model_dir: Path, engine: FakeEngine | None = None) -> ModelServer:
    fake = engine or FakeEngine()
    config = ModelConfig(name="fake", source=str(model_dir), verify=False)
    server = ModelServer(config, engine_factory=lambda cfg, path, on_step: fake)
    OPEN.append(server)
    return server


def samplers() -> int:
    return sum(t.name == "metrics-sampler" for t in threading.enumerate())


def test_close_stops_the_gauge_sampler_and_the_engine_once(model_dir: Path) -> None:
    engine = FakeEngine()
    before = samplers()
    server = make_server(model_dir, engine)
    assert samplers() == before + 1
    server.close()
    assert samplers() == before
    assert not engine.healthy
    server.close()  # a second close (Serve's __del__ after an explicit one) is a no-op


def completion(prompt: str, max_tokens: int = 8, rid: str = "r1", **kw: object) -> GenerateRequest:
    return GenerateRequest(
        rid, "completion", SamplingParams(max_tokens=max_tokens, **kw), prompt=prompt
    )


async def events(server: ModelServer, request: GenerateRequest) -> list[Event]:
    return [e async for e in server.generate(request)]


def test_a_request_streams_accepted_deltas_then_one_finished(model_dir: Path) -> None:
    server = make_server(model_dir)
    out = run(events(server, completion("one two three")))
    assert out[0] == Accepted("fake")
    assert "".join(e.text for e in out if isinstance(e, Delta)) == "three two one"
    final = out[-1]
    assert isinstance(final, Finished)
    assert final.reason == "stop"
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (3, 3)
    assert final.memory_mb > 0  # the replica fills in its RSS


def test_max_tokens_ends_with_length(model_dir: Path) -> None:
    out = run(events(make_server(model_dir), completion("a b c d e", max_tokens=2)))
    assert out[-1].reason == "length"  # type: ignore[union-attr]
    assert out[-1].usage.completion_tokens == 2  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("request_", "status", "code"),
    [
        (completion(""), 400, "empty_prompt"),
        (completion("x " * 60, max_tokens=8), 400, "context_length_exceeded"),
        (completion(f"a {CRASH_WORD}"), 500, None),
    ],
    ids=["empty", "too-long", "unexpected-exception"],
)
def test_a_request_the_engine_refuses_fails_alone_in_its_batch(
    model_dir: Path, request_: GenerateRequest, status: int, code: str | None
) -> None:
    server = make_server(model_dir)

    async def both() -> tuple[list[Event], list[Event]]:
        good = GenerateRequest(
            "good", "chat", SamplingParams(max_tokens=4), messages=(Message("user", "x y"),)
        )
        # Sent together, so @serve.batch admits them as one batch.
        return await asyncio.gather(events(server, request_), events(server, good))

    bad_events, good_events = run(both())
    assert len(bad_events) == 1 and isinstance(bad_events[0], Failed)
    assert bad_events[0].error.status == status
    if code is not None:
        assert bad_events[0].error.code == code
    assert isinstance(good_events[0], Accepted)
    assert isinstance(good_events[-1], Finished)
    assert server.engine.healthy


def test_a_full_engine_queue_is_a_503_with_retry_hint(model_dir: Path) -> None:
    server = make_server(model_dir, FakeEngine(max_waiting=1, step_s=0.05))

    async def two() -> list[list[Event]]:
        first = completion("a b c", rid="first")
        second = completion("d e f", rid="second")
        return list(await asyncio.gather(events(server, first), events(server, second)))

    outcomes = run(two())
    failed = [o[0] for o in outcomes if isinstance(o[0], Failed)]
    assert len(failed) == 1 and failed[0].error.status == 503
    assert any(isinstance(o[-1], Finished) for o in outcomes)


def test_closing_the_stream_early_cancels_the_engine_request(model_dir: Path) -> None:
    engine = FakeEngine(step_s=0.02)
    server = make_server(model_dir, engine)

    async def read_two_then_leave() -> None:
        gen = server.generate(completion("a b c d e f g h", rid="leaver"))
        assert isinstance(await anext(gen), Accepted)
        assert isinstance(await anext(gen), Delta)
        await gen.aclose()  # what Serve does when the HTTP client disconnects

    run(read_two_then_leave())
    assert engine.cancelled == ["leaver"]


def test_a_finished_stream_cancels_nothing(model_dir: Path) -> None:
    engine = FakeEngine()
    run(events(make_server(model_dir, engine), completion("a b")))
    assert engine.cancelled == []


def test_stop_string_ends_with_stop(model_dir: Path) -> None:
    out = run(
        events(make_server(model_dir), completion("a b STOP c d", stop=("STOP",), max_tokens=8))
    )
    assert out[-1].reason == "stop"  # type: ignore[union-attr]
    assert "STOP" not in "".join(e.text for e in out if isinstance(e, Delta))


def test_live_batching_changes_reach_the_engine(model_dir: Path) -> None:
    engine = FakeEngine()
    server = make_server(model_dir, engine)
    run(server.reconfigure({"batching": {"max_running": 3, "max_batch_size": 2}}))
    assert engine.limits is not None and engine.limits[0] == 3


def test_draining_finishes_in_flight_streams_and_refuses_new_ones_with_retry_after(
    model_dir: Path,
) -> None:
    engine = FakeEngine(step_s=0.02)
    server = make_server(model_dir, engine)

    async def drain_under_load() -> tuple[list[list[Event]], list[Event], bool]:
        streams = [server.generate(completion("a b c d e f g h", rid=f"s{i}")) for i in (1, 2)]
        for gen in streams:  # admitted before the drain starts
            assert isinstance(await anext(gen), Accepted)

        async def rest(gen: Any) -> list[Event]:
            return [e async for e in gen]

        readers = [asyncio.ensure_future(rest(g)) for g in streams]
        drain = asyncio.ensure_future(server.reconfigure({"draining": True}))
        await asyncio.sleep(0.05)  # the drain has begun; the streams are mid-way
        assert not drain.done(), "the drain must wait for the in-flight streams"
        late = await events(server, completion("x y", rid="late"))
        await drain
        return [await r for r in readers], late, server.engine.stats.running == 0

    finished, late, idle_when_drain_returned = run(drain_under_load())
    assert idle_when_drain_returned
    for out in finished:
        assert isinstance(out[-1], Finished) and out[-1].reason == "length"
        assert out[-1].usage.completion_tokens == 8
    assert len(late) == 1 and isinstance(late[0], Failed)
    assert late[0].error.status == 503 and late[0].error.headers == {"Retry-After": "1"}


def test_health_check_fails_once_the_engine_dies(model_dir: Path) -> None:
    engine = FakeEngine()
    server = make_server(model_dir, engine)
    server.check_health()
    info = server.info()
    assert info["healthy"] is True and info["variant"] == "fake" and info["pid"] > 0
    engine.kill()
    with pytest.raises(RuntimeError, match="not healthy"):
        server.check_health()
    out = run(events(server, completion("a b")))
    assert isinstance(out[0], Failed) and out[0].error.status == 503
