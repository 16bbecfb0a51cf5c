"""The served-path check: a quantized candidate run by the serving engine's own runner.

The quality gate scores transformers' plain forward; replicas run `ModelRunner` (fused q/k/v and
gate/up projections, the prepacked output projection, the slot KV cache, packed and chunked
prefill, prefix-cache hits, decode) behind the chat template. This loads the candidate exactly as a
replica does and compares the runner's next-token distributions with transformers' forward of the
same artifact, position by position, so a runner bug blocks publication instead of reaching users.
The reference is the artifact loaded a second time, so a kernel the runner swaps in (the native
int4 one) is checked against transformers' own. It also asks a few chat questions: the greedy
served answer must keep the key fact the FP16 model states. The quantization pipeline receives
an `EngineServedCheck` by injection (`quantization.served.ServedPathCheck`); it never imports
this package.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deployments.engine import (
    fused_projections,
    model_runner,
    native_int4,
    native_step,
    prefix_cache,
    prompts,
)
from deployments.engine.model_runner import ModelRunner, load_model
from deployments.engine.prompts import chat_prompt_ids
from quantization.compute import pick_device
from quantization.served import ChatAnswer, ChatProbe, ServedCheckResult

log = logging.getLogger("awq_serve.served_check")

RunnerFactory = Callable[..., ModelRunner]
# Where the reference's two best tokens are this close (log-probability), either pick is
# rounding, not a runner bug: measured on the demo model, the engine's int4 kernels flipped a
# 0.053-nat tie that transformers' kernels resolved the other way (KL 2e-4 per token). KL still
# scores those positions; top-1 agreement counts only decisive ones.
NEAR_TIE_NATS = 0.1


@dataclass
class _Scores:
    """Running sums of KL(transformers || engine) and top-1 agreement (near ties agree), per
    path."""

    kl: dict[str, float] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    agree: int = 0

    def add(self, path: str, reference: torch.Tensor, served: torch.Tensor) -> None:
        """reference/served: (positions, vocab) logits."""
        ref = F.log_softmax(reference.float(), -1)
        got = F.log_softmax(served.float(), -1)
        kl = F.kl_div(got, ref, log_target=True, reduction="sum").item()
        self.kl[path] = self.kl.get(path, 0.0) + kl
        self.count[path] = self.count.get(path, 0) + ref.shape[0]
        top2 = ref.topk(2, dim=-1).values  # (positions, 2)
        near_tie = (top2[:, 0] - top2[:, 1]) < NEAR_TIE_NATS
        self.agree += int(((ref.argmax(-1) == got.argmax(-1)) | near_tie).sum())

    def result(self, chat: list[ChatAnswer], engine: str) -> ServedCheckResult:
        total = sum(self.count.values())
        return ServedCheckResult(
            kl_per_token=sum(self.kl.values()) / total,
            top1_agreement=self.agree / total,
            tokens_compared=total,
            kl_by_path={k: self.kl[k] / self.count[k] for k in self.kl},
            chat=chat,
            engine=engine,
        )


def _source_digest() -> str:
    """The engine code the check exercises: a change to it invalidates cached results."""
    digest = hashlib.sha256()
    modules = (model_runner, fused_projections, native_int4, native_step, prefix_cache, prompts)
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    for source in sorted(native_step.SOURCE.parent.iterdir()):  # the C++ step and kernels
        digest.update(source.read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class EngineServedCheck:
    """`ServedPathCheck` through `ModelRunner`; `runner_factory` lets tests inject a bug."""

    device: str = "auto"
    max_slots: int = 4
    max_len: int = 1024
    prefix_cache_mb: float = 32.0
    prefill_chunk: int = 64  # forces the chunked path on the longest prompt
    decode_steps: int = 8
    chat_tokens: int = 24
    runner_factory: RunnerFactory = ModelRunner

    @property
    def key(self) -> str:
        settings = [self.max_slots, self.max_len, self.prefix_cache_mb, self.prefill_chunk]
        settings += [self.decode_steps, self.chat_tokens, self.runner_factory.__qualname__]
        return f"{_source_digest()}-{hashlib.sha256(repr(settings).encode()).hexdigest()[:8]}"

    def __call__(
        self,
        reference_dir: Path,
        candidate_dir: Path,
        prompts: list[list[int]],
        chat: list[ChatProbe],
    ) -> ServedCheckResult:
        device = pick_device(self.device)
        model, tokenizer = load_model(candidate_dir, device)  # exactly what a replica loads
        # The reference is a second load: a runner may rewire the modules it serves (the native
        # int4 kernel does), and the served path must be held to transformers' own kernels.
        reference, _ = load_model(candidate_dir, device)
        runner = self.runner_factory(
            model, self.max_slots, self.max_len, prefix_cache_mb=self.prefix_cache_mb
        )
        scores = _Scores()
        self._prefill_and_decode(runner, reference, prompts, scores)
        self._prefix_hit_and_chunked(runner, reference, prompts, scores)
        answers = self._chat(runner, tokenizer, reference_dir, chat)
        engine = f"ModelRunner on {device.type}, {type(runner).__name__}"
        return scores.result(answers, engine)

    def _prefill_and_decode(
        self, runner: ModelRunner, model: nn.Module, prompts: list[list[int]], scores: _Scores
    ) -> None:
        """All prompts in one packed prefill, then teacher-forced decode steps over them."""
        n = min(len(prompts), runner.cache.slots)
        steps = self.decode_steps
        # Each prompt is its first len - steps tokens; the rest are fed one decode step at a time.
        heads = [p[: len(p) - steps] for p in prompts[:n]]
        _reset(runner)
        served = [runner.prefill(0, heads)]
        for j in range(steps - 1):
            served.append(
                runner.decode([p[len(h) + j] for p, h in zip(prompts[:n], heads, strict=True)])
            )
        for row, (p, h) in enumerate(zip(prompts[:n], heads, strict=True)):
            reference = _hf_logits(model, p)  # (len, vocab), position i predicts token i + 1
            scores.add("packed_prefill", reference[len(h) - 1 : len(h)], served[0][row : row + 1])
            got = torch.stack([s[row] for s in served[1:]])
            scores.add("decode", reference[len(h) : len(h) + steps - 1], got)

    def _prefix_hit_and_chunked(
        self, runner: ModelRunner, model: nn.Module, prompts: list[list[int]], scores: _Scores
    ) -> None:
        """A prompt whose prefix the cache holds (a hit), and a long one prefilled in chunks."""
        longest = max(prompts, key=len)
        block = runner.prefix_cache.block_tokens
        _reset(runner)
        runner.prefill(0, [longest[: 2 * block + 3]])  # stores two full blocks
        hit = runner.prefix_cache.lookup(longest[: 3 * block])
        if not hit:
            raise RuntimeError("served-path check: the prefix cache did not store the prompt")
        extended = longest[: 3 * block]
        logits = runner.prefill(1, [extended])
        scores.add("prefix_hit", _hf_logits(model, extended)[-1:], logits)
        _reset(runner)
        chunked = runner.prefill(0, [longest], chunk=self.prefill_chunk)
        scores.add("chunked_prefill", _hf_logits(model, longest)[-1:], chunked)
        _reset(runner)

    def _chat(
        self, runner: ModelRunner, tokenizer, reference_dir: Path, chat: list[ChatProbe]
    ) -> list[ChatAnswer]:
        """Greedy answers through the chat template: served candidate vs FP16 transformers."""
        if not chat or not getattr(tokenizer, "chat_template", None):
            return []
        ids = [chat_prompt_ids(tokenizer, [{"role": "user", "content": c.question}]) for c in chat]
        served = _greedy(runner, ids, self.chat_tokens, tokenizer.eos_token_id)
        reference = _reference_answers(reference_dir, runner.device, ids, self.chat_tokens)
        return [
            ChatAnswer(
                c.question,
                c.key_fact,
                tokenizer.decode(r, skip_special_tokens=True),
                tokenizer.decode(s, skip_special_tokens=True),
            )
            for c, r, s in zip(chat, reference, served, strict=True)
        ]


def _reset(runner: ModelRunner) -> None:
    runner.reset(forget_prefixes=True)


@torch.inference_mode()
def _hf_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """transformers' own forward: (len, vocab) float32 logits."""
    out = model(input_ids=torch.tensor([ids], device=model.device)).logits[0]
    return out.float()


def _greedy(runner: ModelRunner, prompts: list[list[int]], tokens: int, eos: int | None) -> list:
    _reset(runner)
    answers: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    nxt = runner.prefill(0, prompts).argmax(-1).tolist()
    for _ in range(tokens):
        for i, t in enumerate(nxt):
            done[i] = done[i] or t == eos
            if not done[i]:
                answers[i].append(t)
        if all(done):
            break
        nxt = runner.decode(nxt).argmax(-1).tolist()
    _reset(runner)
    return answers


@torch.inference_mode()
def _reference_answers(
    reference_dir: Path, device: torch.device, prompts: list[list[int]], tokens: int
) -> list[list[int]]:
    """The FP16 model's greedy answers through transformers' generate (no engine code)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=dtype).to(device)
    answers = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=tokens,
                             do_sample=False)  # fmt: skip
        answers.append(out[0, len(ids) :].tolist())
    return answers
