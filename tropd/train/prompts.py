"""Training and held-out prompts: the embedded built-in set, a task suite's splits, or the user's data file."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_TEMPLATES = (
    "Explain {t} in two sentences.",
    "Give three facts about {t}.",
    "Write a short paragraph about {t} for a ten-year-old.",
    "What is the most important thing to know about {t}?",
    "Describe {t} in one sentence.",
    "List two advantages and one disadvantage of {t}.",
    "Write a haiku about {t}.",
    "Why do people care about {t}?",
)
_TOPICS = (
    "the water cycle", "photosynthesis", "volcanoes", "the moon", "honey bees", "rainbows", "electricity",
    "the internet", "bicycles", "coffee", "the ocean", "gravity", "recycling", "dinosaurs", "the human heart",
    "solar energy", "libraries", "trains", "chess", "clouds", "bread", "the alphabet", "music", "penguins",
    "mountains", "maps", "the seasons", "friendship", "exercise", "sleep", "computers", "trees", "rivers",
    "the sun", "vaccines", "money", "cats", "dogs", "football", "gardening",
)


@dataclass(frozen=True)
class Prompt:
    """One prompt: the user message (or chat messages), plus the grading reference when it has one."""

    text: str
    domain: str | None = None
    reference: dict = field(default_factory=dict)
    messages: tuple = ()


def builtin_prompts(split: str) -> list[Prompt]:
    """The embedded prompt set: templates × topics, split by topic so held-out prompts are unseen topics."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    topics = _TOPICS[:32] if split == "train" else _TOPICS[32:]
    return [Prompt(text=tpl.format(t=t)) for t in topics for tpl in _TEMPLATES]


def load_prompts(source: str, split: str, seed: int = 0) -> list[Prompt]:
    """Prompts from ``data.prompts``: 'builtin', a task suite name, or a data file/folder (train split only)."""
    if source == "builtin":
        return builtin_prompts(split)
    from tropd.tasks import get_suite, list_suites

    if source in list_suites():
        examples = get_suite(source).examples(split, 512 if split == "train" else 64, seed)
        return [Prompt(text=e.prompt, domain=e.domain, reference=dict(e.reference)) for e in examples]
    from tropd.tasks.data import load_user_prompts

    rows = load_user_prompts(source)
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_test = max(1, len(rows) // 10) if len(rows) > 1 else 0
    chosen = order[:n_test] if split == "test" else order[n_test:]
    return [_row_to_prompt(rows[i]) for i in chosen]


def _row_to_prompt(row) -> Prompt:
    messages = tuple(getattr(row, "messages", ()) or ())
    text = getattr(row, "prompt", None) or (messages[-1]["content"] if messages else "")
    return Prompt(text=text, domain=getattr(row, "domain", None), reference=dict(getattr(row, "reference", {}) or {}),
                  messages=messages)


def render(prompt: Prompt, tokenizer, chat_template: bool) -> list[int]:
    """Token ids of a prompt, through the tokenizer's chat template when asked (with the generation prompt)."""
    if chat_template:
        messages = list(prompt.messages) or [{"role": "user", "content": prompt.text}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    ids = tokenizer(prompt.text, add_special_tokens=True)["input_ids"]
    return list(ids)
