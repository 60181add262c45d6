"""Verifiable tasks: seeded prompt suites, string graders, the code sandbox and user-data loading.

Public API::

    from tropd.tasks import grade, get_suite, list_suites, load_prompts, render_prompt

    grade("math", "... so the answer is \\boxed{1/2}", {"answer": "0.5"})  # -> 1.0
    suite = get_suite("math")
    train = suite.examples("train", n=64, seed=0)     # list[Example]
    scores = grade_batch("code", completions, [ex.reference for ex in examples])

This package grades strings: it never imports models (a tokenizer passed in is used duck-typed).
"""

from tropd.tasks.data import DataFormatError, LoadedPrompts, PromptRow, load_prompts, parse_row, render_prompt
from tropd.tasks.grading import GRADERS, grade, grade_batch
from tropd.tasks.suites import get_suite, list_suites
from tropd.tasks.types import DOMAINS, SPLITS, Example, TaskSuite

__all__ = [
    "DOMAINS",
    "SPLITS",
    "GRADERS",
    "DataFormatError",
    "Example",
    "LoadedPrompts",
    "PromptRow",
    "TaskSuite",
    "get_suite",
    "grade",
    "grade_batch",
    "list_suites",
    "load_prompts",
    "parse_row",
    "render_prompt",
]
