"""The embedded prompt set of the default run: short general instructions, templates × topics.

Train and test are split by topic, so held-out prompts ask about topics never seen in training. These prompts
carry no grader: the default run measures closeness to the teacher, not task accuracy.
"""

from __future__ import annotations

from tropd.tasks.data import PromptRow

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
_TEST_TOPICS = 8


def builtin_prompts(split: str) -> list[PromptRow]:
    """Prompts of ``split`` ('train': 32 topics × 8 templates; 'test': 8 other topics × 8 templates)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    topics = _TOPICS[:-_TEST_TOPICS] if split == "train" else _TOPICS[-_TEST_TOPICS:]
    return [PromptRow(messages=({"role": "user", "content": tpl.format(t=t)},), domain=None, reference=None,
                      id=f"builtin/{t}/{i}", source="builtin")
            for t in topics for i, tpl in enumerate(_TEMPLATES)]
