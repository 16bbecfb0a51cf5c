"""Calibration and evaluation text: disjoint pydoc parts, file and HF sources, block chunking."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from quantization.calibration import (
    CalibrationError,
    FileSource,
    HuggingFaceSource,
    PydocSource,
    SplitSource,
    build_blocks,
    chunk_blocks,
    held_out_documents,
    remove_seen_ngrams,
    source_from_spec,
    token_stream,
    word_ngrams,
)


class CharTokenizer:
    """Test double for the tokenizer protocol: one token per character, eos is 0."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


class ListSource:
    """An in-memory text source."""

    def __init__(self, docs: list[str]) -> None:
        self.name = "list"
        self._docs = docs

    def documents(self) -> list[str]:
        return self._docs


def _is_slice_of(block: list[int], stream: list[int]) -> bool:
    n = len(block)
    return any(stream[i : i + n] == block for i in range(len(stream) - n + 1))


def test_pydoc_calibration_and_evaluation_parts_are_disjoint_and_non_empty() -> None:
    calibration = set(PydocSource("calibration").documents())
    evaluation = set(PydocSource("evaluation").documents())
    assert calibration
    assert evaluation
    assert calibration.isdisjoint(evaluation)


def test_pydoc_source_name_says_which_part() -> None:
    assert PydocSource("evaluation").name == "pydoc:evaluation"


def test_chunk_blocks_spreads_blocks_from_start_to_end_of_stream() -> None:
    stream = list(range(100))
    blocks = chunk_blocks(stream, block_len=10, n_blocks=3, source="s")
    assert blocks.shape == (3, 10)
    assert blocks.dtype == torch.long
    assert blocks[0, 0].item() == 0
    assert blocks[-1, -1].item() == 99
    starts = blocks[:, 0].tolist()
    assert starts == sorted(set(starts))
    assert 0 < starts[1] < 90


def test_long_document_is_chunked_into_several_blocks_not_dropped() -> None:
    document = "".join(chr(ord("a") + i % 26) for i in range(1000))
    blocks = build_blocks(ListSource([document]), CharTokenizer(), n_blocks=10, block_len=64)
    assert blocks.shape == (10, 64)
    stream = token_stream([document], CharTokenizer().encode, separator_id=0)
    assert all(_is_slice_of(row, stream) for row in blocks.tolist())


def test_token_stream_puts_separator_after_each_document() -> None:
    assert token_stream(["ab", "c"], CharTokenizer().encode, separator_id=0) == [97, 98, 0, 99, 0]


def test_too_short_source_error_gives_token_count_and_blocks_needed() -> None:
    with pytest.raises(CalibrationError) as exc:
        chunk_blocks(list(range(25)), block_len=10, n_blocks=3, source="tiny")
    message = str(exc.value)
    assert "tiny" in message
    assert "25 tokens" in message
    assert "3 blocks are needed" in message


def test_empty_source_is_an_error_naming_it() -> None:
    with pytest.raises(CalibrationError, match="'list' is empty"):
        build_blocks(ListSource([]), CharTokenizer(), n_blocks=1, block_len=4)


def test_txt_file_source_splits_documents_on_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("first doc\nstill first\n\n\nsecond doc\n\n  \nthird\n", encoding="utf-8")
    assert FileSource(path).documents() == ["first doc\nstill first", "second doc", "third"]


def test_jsonl_file_source_reads_text_field_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    rows = [{"text": "alpha", "id": 1}, {"text": "beta"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert FileSource(path).documents() == ["alpha", "beta"]


@pytest.mark.parametrize("bad_line", ["{not json", '{"body": "no text field"}', "[1, 2]"])
def test_bad_jsonl_line_error_names_file_and_line(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "calib.jsonl"
    path.write_text(f'{{"text": "ok"}}\n{bad_line}\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match=re.escape(f"{path}:2:")):
        FileSource(path).documents()


def test_missing_file_source_is_an_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.txt"
    with pytest.raises(CalibrationError, match=r"absent\.txt does not exist"):
        FileSource(path).documents()


def test_source_from_spec_pydoc_keeps_the_part() -> None:
    assert source_from_spec("pydoc") == PydocSource("calibration")
    assert source_from_spec("pydoc", part="evaluation") == PydocSource("evaluation")


@pytest.mark.parametrize("name", ["data/calib.txt", "data/calib.jsonl"])
def test_source_from_spec_path_gives_a_split_file_source(name: str) -> None:
    assert source_from_spec(name) == SplitSource(FileSource(Path(name)), "calibration")
    assert source_from_spec(name, "evaluation").part == "evaluation"


def test_source_from_spec_hf_parses_dataset_and_split() -> None:
    assert source_from_spec("hf:org/data:validation").inner == HuggingFaceSource(
        "org/data", "validation"
    )
    assert source_from_spec("hf:org/data").inner.split == "train"


def test_file_source_is_split_by_document_with_a_fixed_seed(tmp_path: Path) -> None:
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(f"document number {i}" for i in range(40)), encoding="utf-8")
    calibration = source_from_spec(str(path), "calibration").documents()
    evaluation = source_from_spec(str(path), "evaluation").documents()
    assert len(evaluation) == 10 and len(calibration) == 30
    assert set(calibration).isdisjoint(evaluation)
    assert evaluation == source_from_spec(str(path), "evaluation").documents()  # same seed
    assert (
        "evaluation part, document split seed 0" in source_from_spec(str(path), "evaluation").name
    )


def test_evaluation_text_keeps_no_13_word_sequence_of_the_calibration_text() -> None:
    held = held_out_documents("pydoc", "pydoc")
    seen = word_ngrams(PydocSource("calibration").documents(), 13)
    assert word_ngrams(PydocSource("evaluation").documents(), 13) & seen, "pydoc topics overlap"
    assert not word_ngrams(held.documents, 13) & seen
    assert 0 < held.words_removed < 0.1 * held.words_before
    assert held.summary()["removed_pct"] == pytest.approx(
        100 * held.words_removed / held.words_before
    )


def test_remove_seen_ngrams_cuts_only_the_repeated_run() -> None:
    seen = word_ngrams(["b c d"], 3)
    pieces, words, removed = remove_seen_ngrams("a  b c d\ne f", seen, 3)
    assert pieces == ["a", "e f"]
    assert (words, removed) == (6, 3)


def test_source_from_spec_unknown_spec_lists_the_accepted_forms() -> None:
    with pytest.raises(CalibrationError, match="unknown text source 'wikipedia'") as exc:
        source_from_spec("wikipedia")
    assert "pydoc" in str(exc.value)
    assert "hf:" in str(exc.value)


def test_huggingface_source_offline_error_names_offline_alternatives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read these at import time; cover an import done earlier in the session.
    for module, attrs in {
        "huggingface_hub.constants": ["HF_HUB_OFFLINE"],
        "datasets.config": ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"],
    }.items():
        if module in sys.modules:
            for attr in attrs:
                monkeypatch.setattr(sys.modules[module], attr, True)

    with pytest.raises(CalibrationError) as exc:
        HuggingFaceSource("awq-serve-tests/no-such-dataset", "train").documents()
    message = str(exc.value)
    assert "awq-serve-tests/no-such-dataset" in message
    assert "pydoc" in message
    assert ".txt/.jsonl" in message
