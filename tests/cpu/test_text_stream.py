"""Incremental detokenization: the text after every token is exactly what decoding all tokens
gives, with the demo model's real tokenizer, while each token decodes only a short window."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from deployments.engine.text_stream import TextStream

SAMPLES = [
    "Plain English, with punctuation: commas, (brackets) and 'quotes'.",
    "Accents and scripts: café, naïve, Zürich, 東京は日本の首都です, Привет, مرحبا.",
    "Emoji split over byte tokens: 🐱🚀👩‍💻 and 🇫🇷, then text again.",
    "def add(a, b):\n    return a + b  # code, indentation\n\n\ttabs",
]


@pytest.fixture(scope="module")
def tokenizer(demo_fp16_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_fp16_dir)


def stream_of(tokenizer) -> TextStream:  # type: ignore[no-untyped-def]
    return TextStream(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), ())


def assert_text_follows_full_decode(tokenizer, ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    stream = stream_of(tokenizer)
    sent = ""
    for i, token in enumerate(ids, 1):
        stream.add(token)
        assert stream.stop.text == tokenizer.decode(ids[:i], skip_special_tokens=True), i
        sent += stream.ready(1)
    assert sent + stream.rest(False) == tokenizer.decode(ids, skip_special_tokens=True).rstrip(
        "\ufffd"
    )


@pytest.mark.parametrize("text", SAMPLES, ids=["english", "scripts", "emoji", "code"])
def test_text_after_each_token_equals_decoding_them_all(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    assert_text_follows_full_decode(tokenizer, tokenizer.encode(text))


def test_random_tokens_with_special_ones_and_broken_bytes_decode_alike(tokenizer) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    ids = [rng.randrange(len(tokenizer)) for _ in range(400)]
    ids[50:50] = [tokenizer.eos_token_id] * 2  # special tokens decode to nothing
    assert_text_follows_full_decode(tokenizer, ids)


def test_each_token_decodes_a_short_window_not_the_whole_output() -> None:
    decoded: list[int] = []

    def decode(ids: list[int]) -> str:
        decoded.append(len(ids))
        return "".join(chr(ord("a") + i % 26) for i in ids)

    stream = TextStream(decode, ())
    for token in range(2000):
        stream.add(token)
    assert stream.stop.text == decode(list(range(2000)))
    assert max(decoded[:-1]) <= 2  # the window, and the settled stretch before it
