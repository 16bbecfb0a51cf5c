"""The engine on CUDA: the AWQ artifact runs on a CUDA kernel in fp16 and answers correctly."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from deployments.engine.prompts import chat_prompt_ids
from deployments.engine.scheduler import Engine, EngineConfig, RequestStream
from deployments.protocol import SamplingParams


async def _answer(engine: Engine, rid: str, question: str) -> str:
    ids = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": question}])
    stream = RequestStream(rid)
    engine.enqueue(rid, ids, SamplingParams(max_tokens=24, temperature=0), stream)
    return "".join([e.text async for e in stream])


def test_auto_device_picks_cuda_kernels_and_answers(demo_awq_dir: Path) -> None:
    engine = Engine(EngineConfig(model_dir=demo_awq_dir, device="auto", max_running=8))
    engine.start()
    try:
        assert engine.device.type == "cuda"
        assert engine.runner.dtype == torch.float16
        kernel = type(engine.model.model.layers[0].mlp.down_proj).__name__
        assert "TorchAten" not in kernel, kernel
        alone = asyncio.run(_answer(engine, "a", "What is the capital of France?"))
        assert "Paris" in alone

        async def busy() -> list[str]:
            questions = ["What is the capital of France?"] + [f"Count to {n}." for n in range(7)]
            return await asyncio.gather(
                *(_answer(engine, f"b{i}", q) for i, q in enumerate(questions))
            )

        assert asyncio.run(busy())[0] == alone
    finally:
        engine.shutdown(drain_timeout_s=5)
