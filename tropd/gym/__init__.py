"""The distillation gym: code-generated tasks with verifiable answers and reasoning traces, and their tokenizer.

Public API::

    from tropd.gym import FAMILIES, get_family, make_dataset, grade, build_tokenizer

    fam = get_family("add")                       # difficulty: digits=3
    train = fam.problems("train", n=1000, seed=0)  # list[Problem], disjoint from the "heldout" split
    text = train[0].prompt + fam.completion(train[0], "teacher")   # "345+678=5+8=13 ... #### 1023"
    grade(train[0], "... #### 1023")               # 1.0

See :mod:`tropd.gym.tasks` for the families and their trace styles, :mod:`tropd.gym.tokenizer` for the ids.
"""

from tropd.gym.tasks import (
    ANSWER_MARKER,
    FAMILIES,
    SPLITS,
    STYLES,
    Addition,
    ModChain,
    Problem,
    SortDigits,
    TaskFamily,
    completion,
    extract_answer,
    family_of,
    get_family,
    grade,
    make_completion,
    make_dataset,
    noisy_completion,
    split_of,
    trace,
)
from tropd.gym.tokenizer import ALPHABET, SPECIAL_TOKENS, build_tokenizer

__all__ = [
    "ALPHABET",
    "ANSWER_MARKER",
    "FAMILIES",
    "SPECIAL_TOKENS",
    "SPLITS",
    "STYLES",
    "Addition",
    "ModChain",
    "Problem",
    "SortDigits",
    "TaskFamily",
    "build_tokenizer",
    "completion",
    "extract_answer",
    "family_of",
    "get_family",
    "grade",
    "make_completion",
    "make_dataset",
    "noisy_completion",
    "split_of",
    "trace",
]
