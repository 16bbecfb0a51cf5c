"""Shared fixtures: the demo model from the registry that `make setup` builds, tiny models."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fresh_runs

REPO = Path(__file__).resolve().parent.parent
REGISTRY = REPO / "models"
DEMO = "smollm2-135m-instruct"


@pytest.fixture
def restore_logger() -> Iterator[None]:
    """configure_logging changes the process-wide `awq_serve` logger; put it back after."""
    from deployments.logging_setup import LOGGER

    logger = logging.getLogger(LOGGER)
    saved = (logger.level, logger.propagate, list(logger.handlers))
    yield
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


@pytest.fixture(scope="session")
def registry_root() -> Path:
    from quantization.registry import Registry

    if not Registry(REGISTRY).versions(DEMO):
        pytest.fail(f"demo model missing from {REGISTRY}: run `make setup` (awq-serve demo) first")
    return REGISTRY


@pytest.fixture(scope="session")
def demo_awq_dir(registry_root: Path) -> Path:
    from quantization.registry import Registry

    reg = Registry(registry_root)
    return reg.path(*reg.resolve(DEMO))


@pytest.fixture(scope="session")
def demo_fp16_dir(registry_root: Path) -> Path:
    from quantization.registry import Registry

    reg = Registry(registry_root)
    return reg.path(*reg.resolve(DEMO + "-fp16"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, demo_fp16_dir: Path) -> Path:
    """A 2-layer random-weight Llama with the demo tokenizer: fast to quantize and evaluate."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(demo_fp16_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).to(torch.float16)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# A test is in the slow tier when it needs the demo model, a tiny model to quantize or a Ray
# cluster (these fixtures, directly or through others), or when its module says so (the ones that
# start Ray Serve). `pytest -m "not slow"` is the fast tier.
SLOW_FIXTURES = frozenset(
    {"registry_root", "tiny_llama_dir", "ray_local", "ray_two_cpus", "ray_driver", "cluster"}
)


FRESH_TEST = "test_module_passes_in_a_fresh_interpreter"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # Last: each waits for its module in the lane beside the suite (tests/fresh_runs.py).
    items.sort(key=lambda item: getattr(item, "originalname", "") == FRESH_TEST)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the lane of fresh-interpreter modules now, so their waits overlap the suite."""
    if session.config.option.collectonly:
        return
    fresh_runs.start(
        [
            item.callspec.params["module"]
            for item in session.items
            if getattr(item, "originalname", "") == FRESH_TEST
        ]
    )


def pytest_sessionfinish() -> None:
    fresh_runs.stop()
