"""The runner computes what the model's own transformers forward computes: prefill and every
decode step, for each supported wiring (Llama; Qwen3 with q/k norms) and for the shipped AWQ
model. The runner re-wires the decoder blocks (fused projections, its own rope and KV cache), so
this is the check that the re-wiring is the same model, not only self-consistent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.step_overhead import hollow_llama
from deployments.engine.model_runner import ModelRunner, load_model

STEPS = 6


def tiny_qwen3(vocab: int = 256) -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms, so a q/k norm left out or misplaced changes the output
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


@torch.inference_mode()
def hf_last_logits(model: nn.Module, ids: list[list[int]]) -> torch.Tensor:
    """The model's own forward over each whole sequence: last-position logits (rows, vocab)."""
    return torch.stack([model(torch.tensor([row])).logits[0, -1].float() for row in ids])


def assert_runner_follows_hf(model: nn.Module, prompts: list[list[int]], atol: float) -> None:
    """Prefill, then STEPS decode steps fed the model's own greedy choices (teacher forcing, so a
    near tie cannot send the two down different paths); logits must agree at every step."""
    runner = ModelRunner(model, max_slots=len(prompts), max_len=512)
    seqs = [list(p) for p in prompts]
    got = runner.prefill(0, seqs)
    for step in range(STEPS + 1):
        want = hf_last_logits(model, seqs)
        diff = (got - want).abs().max().item()
        assert diff <= atol, f"step {step}: logits differ by {diff} (allowed {atol})"
        top2 = want.topk(2, dim=-1).values
        clear = top2[:, 0] - top2[:, 1] > 2 * atol  # a lead no error within atol can overturn
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear]), step
        if step == STEPS:
            break
        nxt = want.argmax(-1).tolist()
        for seq, token in zip(seqs, nxt, strict=True):
            seq.append(token)
        got = runner.decode(nxt)


PROMPTS = [[5, 17, 3, 99, 42, 7, 250, 1, 64], [8, 8, 120, 33], [200, 13]]


@pytest.mark.parametrize("build", [hollow_llama, tiny_qwen3], ids=["llama", "qwen3-qk-norm"])
def test_runner_logits_equal_the_transformers_forward(build) -> None:  # type: ignore[no-untyped-def]
    model = build(vocab=256) if build is tiny_qwen3 else build(layers=2, vocab=256)
    assert_runner_follows_hf(model, PROMPTS, atol=1e-5)


@pytest.mark.slow
def test_awq_runner_logits_equal_the_transformers_forward(demo_awq_dir: Path) -> None:
    """The same int4 kernels on both sides, and every layer's ops equal given equal inputs; only
    the attention's summation order differs (query tiles vs one causal call). The int4 kernel
    rounds its input to bf16, so a last-bit difference there becomes a bf16 step (2^-8 relative)
    and grows over 30 layers: logits differ by up to ~0.2 (measured 0.218), not 1e-5."""
    model, tokenizer = load_model(demo_awq_dir, torch.device("cpu"))
    prompts = [tokenizer.encode(t) for t in ("The capital of France is", "def add(a, b):")]
    assert_runner_follows_hf(model, prompts, atol=0.5)
