"""Prompt → token ids, shared by training, the trainer's evaluation and ``tropd eval`` (tokenizer duck-typed)."""

from __future__ import annotations

from typing import Any

from tropd.tasks.data import render_prompt


def encode_prompt(prompt: Any, tokenizer: Any, chat_template: bool = True) -> list[int]:
    """Token ids of ``prompt`` (a PromptRow, Example, messages or text), ready for generation.

    With ``chat_template`` the tokenizer's template is required and rendered with the generation prompt; the
    template already holds the special tokens. Without it, the plain text gets the tokenizer's own special
    tokens (e.g. the BOS a base model needs).
    """
    text = render_prompt(prompt, tokenizer if chat_template else None, require_chat_template=chat_template)
    return list(tokenizer(text, add_special_tokens=not chat_template)["input_ids"])
