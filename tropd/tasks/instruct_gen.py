"""Seeded generator of instruction-following prompts: a writing task plus 1-3 verifiable constraints.

The task is a topic in a phrasing ("Write a short blog post about ..."); constraints come from
:data:`tropd.tasks.instruct.CONSTRAINT_TYPES` with parameters drawn here and never two that contradict each
other (see :data:`CONFLICTS`). A problem's identity is ``topic|phrasing|constraints``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable

from tropd.tasks.instruct import CONSTRAINT_TYPES, describe

TOPICS: dict[str, tuple[str, ...]] = {
    "the history of tea": ("leaves", "trade", "china", "ceremony"),
    "learning to ride a bicycle": ("balance", "pedal", "helmet", "practice"),
    "why sleep matters": ("brain", "memory", "rest", "night"),
    "a rainy day in a big city": ("umbrella", "street", "puddle", "traffic"),
    "how volcanoes form": ("magma", "crust", "pressure", "eruption"),
    "the life of honeybees": ("hive", "queen", "pollen", "nectar"),
    "starting a vegetable garden": ("soil", "seeds", "water", "sunlight"),
    "the first moon landing": ("rocket", "astronaut", "lunar", "mission"),
    "saving money as a student": ("budget", "expenses", "savings", "discount"),
    "how the internet works": ("network", "packet", "server", "protocol"),
    "the benefits of reading fiction": ("empathy", "imagination", "story", "characters"),
    "a visit to a night market": ("lanterns", "food", "stalls", "crowd"),
    "caring for a houseplant": ("light", "pot", "roots", "leaves"),
    "the water cycle": ("evaporation", "clouds", "rain", "ocean"),
    "learning a second language": ("vocabulary", "grammar", "practice", "accent"),
    "a day at the beach": ("sand", "waves", "sunscreen", "shells"),
    "why cats purr": ("vibration", "comfort", "kitten", "sound"),
    "the invention of the printing press": ("ink", "books", "press", "knowledge"),
    "training for a marathon": ("endurance", "miles", "recovery", "shoes"),
    "how recycling works": ("plastic", "sorting", "waste", "materials"),
    "a lighthouse keeper's evening": ("lamp", "storm", "ships", "coast"),
    "the importance of bridges": ("river", "steel", "travel", "engineering"),
    "making bread at home": ("flour", "yeast", "oven", "dough"),
    "a first day at a new job": ("colleagues", "office", "nervous", "welcome"),
}
PHRASINGS = (
    "Write a short blog post about {}.",
    "Write a short essay about {}.",
    "Explain {} to a ten-year-old.",
    "Write a friendly email to a colleague about {}.",
    "Write a product-style description inspired by {}.",
    "Write a short story that involves {}.",
    "Give some practical advice about {}.",
    "Write a speech for a school assembly about {}.",
)
FILLER_WORDS = ("very", "really", "basically", "actually", "thing", "stuff", "amazing", "literally", "just")
STARTS = ("Here is", "Let me explain", "Imagine this", "Dear reader", "In short")
ENDS = ("Is there anything else I can help with?", "Thank you for reading.", "That is all.", "Stay curious.")

# Constraint types that cannot be asked together (both directions are listed once here).
CONFLICTS: dict[str, set[str]] = {
    "lowercase": {"uppercase"},
    "max_words": {"min_words"},
    "max_sentences": {"min_sentences"},
    "json_format": {"paragraphs", "bullet_points", "starts_with", "ends_with", "title", "quotation", "postscript",
                    "sections", "highlights", "placeholders", "max_sentences", "min_sentences", "no_commas"},
    "quotation": {"starts_with", "ends_with"},
    "ends_with": {"postscript"},
    "paragraphs": {"bullet_points", "sections"},
    "bullet_points": {"sections"},
    "include_keywords": {"forbidden_words"},
}


def _conflicts(a: str, b: str) -> bool:
    return a == b or b in CONFLICTS.get(a, set()) or a in CONFLICTS.get(b, set())


def _draw(kind: str, rng: random.Random, keywords: tuple[str, ...]) -> dict[str, Any]:
    draws: dict[str, Callable[[], dict[str, Any]]] = {
        "max_words": lambda: {"value": rng.choice((40, 50, 60, 80, 100, 150))},
        "min_words": lambda: {"value": rng.choice((50, 80, 100, 150, 200))},
        "max_sentences": lambda: {"value": rng.randint(3, 8)},
        "min_sentences": lambda: {"value": rng.randint(4, 10)},
        "paragraphs": lambda: {"value": rng.randint(2, 5)},
        "bullet_points": lambda: {"value": rng.randint(2, 6)},
        "include_keywords": lambda: {"keywords": sorted(rng.sample(keywords, rng.randint(1, 2)))},
        "forbidden_words": lambda: {"keywords": sorted(rng.sample(FILLER_WORDS, rng.randint(1, 3)))},
        "keyword_frequency": lambda: {"keyword": rng.choice(keywords), "relation": "at_least",
                                      "value": rng.randint(2, 4)},
        "json_format": dict,
        "lowercase": dict,
        "uppercase": dict,
        "starts_with": lambda: {"value": rng.choice(STARTS)},
        "ends_with": lambda: {"value": rng.choice(ENDS)},
        "no_commas": dict,
        "title": dict,
        "placeholders": lambda: {"value": rng.randint(1, 3)},
        "highlights": lambda: {"value": rng.randint(1, 3)},
        "quotation": dict,
        "postscript": lambda: {"marker": rng.choice(("P.S.", "P.P.S."))},
        "sections": lambda: {"value": rng.randint(2, 4), "marker": rng.choice(("Section", "Part"))},
    }
    return {"type": kind, **draws[kind]()}


@dataclass(frozen=True)
class InstructProblem:
    """One generated prompt: canonical key, text and constraint list."""

    key: str
    prompt: str
    constraints: tuple[dict[str, Any], ...]


def sample_problem(rng: random.Random) -> InstructProblem:
    """Draw a topic, a phrasing and 1-3 mutually compatible constraints."""
    topic = rng.choice(sorted(TOPICS))
    phrasing = rng.randrange(len(PHRASINGS))
    target = rng.randint(1, 3)
    kinds: list[str] = []
    for kind in rng.sample(sorted(CONSTRAINT_TYPES), len(CONSTRAINT_TYPES)):
        if len(kinds) == target:
            break
        if not any(_conflicts(kind, chosen) for chosen in kinds):
            kinds.append(kind)
    constraints = tuple(_draw(kind, rng, TOPICS[topic]) for kind in sorted(kinds))
    key = f"{topic}|{phrasing}|" + json.dumps(constraints, sort_keys=True)
    lines = "\n".join(f"- {describe(c)}" for c in constraints)
    prompt = f"{PHRASINGS[phrasing].format(topic)}\n\nFollow these instructions exactly:\n{lines}"
    return InstructProblem(key, prompt, constraints)
