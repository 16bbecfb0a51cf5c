"""The engine on the real demo AWQ model, without Ray: batching must not change results."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deployments.engine.prompts import chat_prompt_ids
from deployments.engine.scheduler import Engine, EngineConfig, RequestStream
from deployments.errors import ContextLengthExceeded
from deployments.protocol import Delta, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "Write one sentence about the sea.",
    "What is 2 plus 2?",
    "Give me a synonym for happy.",
    "Who wrote Romeo and Juliet?",
]


@pytest.fixture(scope="module")
def start_engine():
    started: list[Engine] = []

    def start(model_dir: Path) -> Engine:
        eng = Engine(EngineConfig(model_dir=model_dir, max_running=8, max_model_len=512))
        eng.start()
        started.append(eng)
        return eng

    yield start
    for eng in started:
        eng.shutdown(drain_timeout_s=5)


@pytest.fixture(scope="module")
def engine(start_engine, demo_awq_dir: Path) -> Engine:
    return start_engine(demo_awq_dir)


@pytest.fixture(scope="module")
def fp32_engine(start_engine, demo_fp16_dir: Path) -> Engine:
    return start_engine(demo_fp16_dir)


def ids(engine: Engine, question: str) -> list[int]:
    return chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": question}])


async def generate(engine: Engine, request_id: str, prompt: list[int], params: SamplingParams):
    stream = RequestStream(request_id)
    engine.enqueue(request_id, prompt, params, stream)
    text, final = [], None
    async for event in stream:
        text.append(event.text)
        final = event
    return "".join(text), final


@pytest.mark.slow  # the demo model, by fixture name
@pytest.mark.parametrize("which", ["engine", "fp32_engine"])
def test_greedy_output_in_a_busy_batch_equals_output_alone(which: str, request) -> None:
    """Token for token, on the AWQ and the FP32 model: a request's greedy answer does not depend
    on its batch-mates or on when it joined the running batch (batch-invariant kernels)."""
    engine = request.getfixturevalue(which)
    greedy = SamplingParams(max_tokens=24, temperature=0.0)

    async def alone() -> list[str]:
        return [(await generate(engine, f"a{i}", ids(engine, q), greedy))[0]
                for i, q in enumerate(QUESTIONS)]  # fmt: skip

    async def together() -> list[str]:
        # Staggered arrivals: later requests join a batch that is already decoding.
        async def one(i: int, q: str) -> str:
            await asyncio.sleep(0.05 * i)
            return (await generate(engine, f"b{i}", ids(engine, q), greedy))[0]

        return list(await asyncio.gather(*(one(i, q) for i, q in enumerate(QUESTIONS))))

    expected = asyncio.run(alone())
    assert asyncio.run(together()) == expected
    assert "Paris" in expected[0]


def test_usage_counts_prompt_and_completion_tokens(engine: Engine) -> None:
    prompt = ids(engine, QUESTIONS[2])
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    text, final = asyncio.run(generate(engine, "u", prompt, params))
    assert final.usage.prompt_tokens == len(prompt)
    assert final.usage.completion_tokens == 5
    assert final.reason == "length"
    assert text


def test_stop_sequence_ends_generation_before_the_stop_text(engine: Engine) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=("Paris",))
    text, final = asyncio.run(generate(engine, "s", ids(engine, QUESTIONS[0]), params))
    assert final.reason == "stop"
    assert "Paris" not in text
    assert text.startswith("The capital of France is")


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    first = asyncio.run(generate(engine, "r1", ids(engine, QUESTIONS[2]), params))[0]
    second = asyncio.run(generate(engine, "r2", ids(engine, QUESTIONS[2]), params))[0]
    assert first == second


def test_prompt_plus_max_tokens_over_context_is_rejected_with_the_numbers(engine: Engine) -> None:
    with pytest.raises(ContextLengthExceeded, match=r"maximum context length is 512 tokens.*600"):
        engine.check([1] * 500, SamplingParams(max_tokens=100))


def test_cancelled_request_frees_its_slot_within_a_step(engine: Engine) -> None:
    async def scenario() -> tuple[str | None, int]:
        stream = RequestStream("c")
        params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        engine.enqueue("c", ids(engine, QUESTIONS[2]), params, stream)
        async for event in stream:
            if isinstance(event, Delta) and event.text:
                break
        engine.cancel("c")
        last = None
        async for event in stream:
            last = event
        await asyncio.sleep(0.05)
        return last.reason, last.usage.completion_tokens

    reason, produced = asyncio.run(scenario())
    assert reason == "cancelled"
    assert produced < 400
    assert engine.stats.running == 0


def test_stream_interval_groups_tokens_but_sends_the_first_at_once(engine: Engine) -> None:
    params = SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True)
    prompt = ids(engine, QUESTIONS[2])

    async def events() -> list[str]:
        stream = RequestStream(f"si{engine.stream_interval}")
        engine.enqueue(stream.request_id, prompt, params, stream)
        return [event.text async for event in stream]

    every_token = asyncio.run(events())
    engine.set_limits(stream_interval=5)
    try:
        grouped = asyncio.run(events())
    finally:
        engine.set_limits(stream_interval=1)
    assert "".join(grouped) == "".join(every_token)
    # First token alone, then 20 tokens in chunks of 5 (the last one rides on the final event).
    assert len(grouped) <= 1 + 20 // 5 + 1 < len(every_token)
    assert grouped[0] == every_token[0]
