"""Text sources for calibration and evaluation, and their tokenisation into fixed-length blocks.

Built-in and offline: `pydoc` (CPython's own documentation, `pydoc_data.topics`, ~100k tokens),
split by topic into calibration and evaluation parts. Local `.txt`/`.jsonl` files and Hugging Face
datasets (for users with a network) are split by document with a fixed seed. Topic names are not
content: pydoc topics quote each other, so the evaluation text is also stripped of every 13-word
sequence found in the calibration text (`held_out_documents`), and the report says how much.
Long documents are chunked into blocks; nothing is silently dropped (AutoAWQ drops long samples).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal, Protocol

import torch

Part = Literal["calibration", "evaluation"]

# Every 4th pydoc topic (sorted by name) is held out for evaluation: ~25% of the text.
_EVAL_EVERY = 4


class CalibrationError(ValueError):
    """A text source that cannot give the calibration or evaluation data asked for."""


class TextSource(Protocol):
    name: str

    def documents(self) -> list[str]: ...


@dataclass(frozen=True)
class PydocSource:
    """CPython's bundled documentation topics; `part` picks the disjoint half."""

    part: Part = "calibration"

    @property
    def name(self) -> str:
        return f"pydoc:{self.part}"

    def documents(self) -> list[str]:
        from pydoc_data.topics import topics

        names = sorted(topics)
        held_out = {n for i, n in enumerate(names) if i % _EVAL_EVERY == 0}
        chosen = [n for n in names if (n in held_out) == (self.part == "evaluation")]
        return [topics[n] for n in chosen]


@dataclass(frozen=True)
class FileSource:
    """A local `.txt` (documents separated by blank lines) or `.jsonl` (a `text` field) file."""

    path: Path
    text_field: str = "text"

    @property
    def name(self) -> str:
        return f"file:{self.path}"

    def documents(self) -> list[str]:
        if not self.path.is_file():
            raise CalibrationError(f"calibration file {self.path} does not exist")
        raw = self.path.read_text(encoding="utf-8")
        if self.path.suffix == ".jsonl":
            docs = []
            for lineno, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    docs.append(str(json.loads(line)[self.text_field]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CalibrationError(
                        f"{self.path}:{lineno}: expected a JSON object with a "
                        f"'{self.text_field}' field ({e})"
                    ) from e
            return docs
        return [d.strip() for d in raw.split("\n\n") if d.strip()]


@dataclass(frozen=True)
class HuggingFaceSource:
    """A Hugging Face dataset (`mit-han-lab/pile-val-backup` is AWQ's default); needs a network."""

    dataset: str
    split: str = "validation"
    text_field: str = "text"
    max_documents: int = 2000

    @property
    def name(self) -> str:
        return f"hf:{self.dataset}:{self.split}"

    def documents(self) -> list[str]:
        try:
            from datasets import load_dataset

            ds = load_dataset(self.dataset, split=self.split, streaming=True)
            return [str(row[self.text_field]) for row in islice(ds, self.max_documents)]
        except Exception as e:  # datasets raises many types when offline or missing
            raise CalibrationError(
                f"could not load Hugging Face dataset '{self.dataset}' ({type(e).__name__}: {e}). "
                "Without a network use '--calib pydoc' or a local .txt/.jsonl file."
            ) from e


@dataclass(frozen=True)
class SplitSource:
    """One part of a document-level split of another source, with a fixed seed.

    A quarter of the documents (shuffled by `seed`) is the evaluation part, the rest calibration,
    so a file or dataset source never evaluates on a document it calibrated on.
    """

    inner: TextSource
    part: Part = "calibration"
    seed: int = 0
    eval_fraction: float = 1 / _EVAL_EVERY

    @property
    def name(self) -> str:
        return f"{self.inner.name}[{self.part} part, document split seed {self.seed}]"

    def documents(self) -> list[str]:
        docs = self.inner.documents()
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(self.seed))
        n_eval = max(1, round(len(docs) * self.eval_fraction)) if len(docs) > 1 else 0
        held_out = set(order[:n_eval].tolist())
        return [d for i, d in enumerate(docs) if (i in held_out) == (self.part == "evaluation")]


def source_from_spec(spec: str, part: Part = "calibration") -> TextSource:
    """Parse a CLI/recipe spec: `pydoc`, a path to .txt/.jsonl, or `hf:<dataset>[:split]`.

    Every source gives disjoint `calibration` and `evaluation` parts (pydoc by topic, others by
    a seeded document split), whichever source the other side uses.
    """
    if spec == "pydoc":
        return PydocSource(part)
    if spec == "pileval":
        return SplitSource(HuggingFaceSource("mit-han-lab/pile-val-backup", "validation"), part)
    if spec.startswith("hf:"):
        dataset, _, split = spec[3:].partition(":")
        return SplitSource(HuggingFaceSource(dataset, split or "train"), part)
    path = Path(spec)
    if path.suffix in {".txt", ".jsonl"}:
        return SplitSource(FileSource(path), part)
    raise CalibrationError(
        f"unknown text source '{spec}': use 'pydoc', a .txt/.jsonl path, or 'hf:<dataset>[:split]'"
    )


def token_stream(documents: Iterable[str], encode, separator_id: int | None) -> list[int]:
    """Concatenate documents into one token stream, a separator after each."""
    stream: list[int] = []
    for doc in documents:
        stream.extend(encode(doc))
        if separator_id is not None:
            stream.append(separator_id)
    return stream


def chunk_blocks(stream: list[int], block_len: int, n_blocks: int, source: str) -> torch.Tensor:
    """Cut a stream into `n_blocks` blocks of `block_len` tokens, spread evenly over the stream.

    Spreading (instead of taking the first blocks) samples every part of the source.
    Returns (n_blocks, block_len) int64.
    """
    available = len(stream) // block_len
    if available < n_blocks:
        raise CalibrationError(
            f"text source '{source}' gives {len(stream)} tokens = {available} blocks of "
            f"{block_len}; {n_blocks} blocks are needed. Use a larger source or fewer samples."
        )
    idx = torch.linspace(0, available - 1, n_blocks).round().long().tolist()
    blocks = [stream[i * block_len : (i + 1) * block_len] for i in idx]
    return torch.tensor(blocks, dtype=torch.long)


@dataclass(frozen=True)
class HeldOut:
    """Evaluation documents with every word n-gram seen in calibration cut out."""

    documents: list[str]
    description: str
    ngram: int
    words_before: int
    words_removed: int

    @property
    def removed_pct(self) -> float:
        return 100 * self.words_removed / max(1, self.words_before)

    def summary(self) -> dict:
        return {"description": self.description, "ngram": self.ngram,
                "words_before": self.words_before, "words_removed": self.words_removed,
                "removed_pct": self.removed_pct}  # fmt: skip


_WORD = re.compile(r"\S+")


def word_ngrams(docs: Iterable[str], n: int) -> set[tuple[str, ...]]:
    grams: set[tuple[str, ...]] = set()
    for doc in docs:
        words = doc.split()
        grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return grams


def remove_seen_ngrams(doc: str, seen: set[tuple[str, ...]], n: int) -> tuple[list[str], int, int]:
    """Cut every run of words covered by an n-gram in `seen` out of `doc`.

    Returns (the remaining pieces, in order, with their original spacing; words in `doc`; words
    removed). A piece boundary is a document boundary for evaluation: no n-gram spans a cut.
    """
    spans = [m.span() for m in _WORD.finditer(doc)]
    words = [doc[a:b] for a, b in spans]
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        if tuple(words[i : i + n]) in seen:
            covered[i : i + n] = [True] * n
    pieces, start = [], None
    for i, hit in enumerate([*covered, True]):
        if not hit and start is None:
            start = i
        elif hit and start is not None:
            pieces.append(doc[spans[start][0] : spans[i - 1][1]])
            start = None
    return pieces, len(words), sum(covered)


def held_out_documents(evaluation: str, calibration: str, ngram: int = 13) -> HeldOut:
    """The evaluation part of `evaluation`, minus every `ngram`-word sequence that occurs in the
    calibration part of `calibration` (what AWQ may have calibrated on)."""
    source = source_from_spec(evaluation, "evaluation")
    seen = word_ngrams(source_from_spec(calibration, "calibration").documents(), ngram)
    kept, before, removed = [], 0, 0
    for doc in source.documents():
        pieces, words, cut = remove_seen_ngrams(doc, seen, ngram)
        kept += pieces
        before += words
        removed += cut
    return HeldOut(kept, source.name, ngram, before, removed)


@dataclass(frozen=True)
class ListSource:
    """Documents already in memory (held-out text after deduplication)."""

    name: str
    docs: tuple[str, ...]

    def documents(self) -> list[str]:
        return list(self.docs)


def build_blocks(source: TextSource, tokenizer, n_blocks: int, block_len: int) -> torch.Tensor:
    """Tokenise a source into (n_blocks, block_len) blocks for calibration or evaluation."""
    docs = source.documents()
    if not docs:
        raise CalibrationError(f"text source '{source.name}' is empty")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    stream = token_stream(docs, encode, tokenizer.eos_token_id)
    return chunk_blocks(stream, block_len, n_blocks, source.name)
