"""Shared types of the task package: an :class:`Example` and the :class:`TaskSuite` interface.

A task suite is a deterministic source of prompts with references; a grader (``tropd.tasks.grade``) turns a
completion and a reference into a score in ``[0, 1]``. Nothing here knows about models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal

Domain = Literal["math", "code", "if", "mcq"]
Split = Literal["train", "test"]

DOMAINS: tuple[str, ...] = ("math", "code", "if", "mcq")
SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class Example:
    """One prompt with what its grader needs.

    Attributes:
        prompt: the user message text (already asks for a gradeable final-answer format).
        domain: which grader scores it: ``"math"``, ``"code"``, ``"if"`` or ``"mcq"``.
        reference: the grader's reference (see ``docs/tasks.md`` for each domain's keys).
        id: stable identifier, ``"<suite>/<hash of the canonical problem>"``; equal ids mean the same problem.
        meta: free-form descriptive fields (template, difficulty level, ...); graders never read it.

    Examples compare by value; they are not hashable (``reference`` is a dict): key sets and dicts by ``id``.
    """

    prompt: str
    domain: str
    reference: dict[str, Any]
    id: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def messages(self) -> list[dict[str, str]]:
        """The prompt as a one-turn chat: ``[{"role": "user", "content": prompt}]``."""
        return [{"role": "user", "content": self.prompt}]


class TaskSuite(ABC):
    """A named, seeded source of examples of one domain with disjoint train and test splits."""

    name: str
    domain: str
    description: str = ""
    splits: tuple[str, ...] = SPLITS

    @abstractmethod
    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """Return ``n`` distinct examples of ``split``, the same list for the same ``(split, n, seed)``.

        Raises:
            ValueError: unknown split, ``n < 0``, or fewer than ``n`` distinct problems available.
        """

    def _check_split(self, split: str, n: int) -> None:
        if split not in self.splits:
            raise ValueError(f"suite {self.name!r} has splits {list(self.splits)}, not {split!r}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")

    def __repr__(self) -> str:
        return f"<TaskSuite {self.name!r} domain={self.domain!r}>"
