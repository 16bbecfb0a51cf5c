"""Turn API requests into prompt token ids with the model's own tokenizer and chat template."""

from __future__ import annotations

from typing import Any

from deployments.errors import InvalidPrompt


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Apply the tokenizer's chat template and open the assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidPrompt(
            "This model has no chat template; use /v1/completions with a plain prompt.",
            param="messages",
            code="no_chat_template",
        )
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)


def completion_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Plain text completion: the tokenizer's own special tokens (BOS where the model uses it)."""
    return list(tokenizer.encode(prompt))
