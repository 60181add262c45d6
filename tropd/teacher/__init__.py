"""The teacher: what the frozen teacher says about each response position, and the rows it writes, behind the
``Teacher`` protocol.

The names below load their module on first use (PEP 562), so importing one light module of this package (a
config reading ``tropd.teacher.remote.is_url``) does not load transformers through ``InProcessTeacher``."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tropd.teacher.in_process import InProcessTeacher
    from tropd.teacher.openai_server import VLLMServerTeacher
    from tropd.teacher.protocol import Teacher
    from tropd.teacher.remote import RemoteTeacher, TeacherServerError
    from tropd.teacher.scoring import TEACHER_CHUNK, TeacherScores, entropy_from_logprobs, score_with_teacher

_WHERE = {"InProcessTeacher": "in_process", "Teacher": "protocol", "RemoteTeacher": "remote",
          "TeacherServerError": "remote", "TEACHER_CHUNK": "scoring", "TeacherScores": "scoring",
          "entropy_from_logprobs": "scoring", "score_with_teacher": "scoring", "VLLMServerTeacher": "openai_server"}

__all__ = ["InProcessTeacher", "RemoteTeacher", "TEACHER_CHUNK", "Teacher", "TeacherScores", "TeacherServerError",
           "VLLMServerTeacher", "entropy_from_logprobs", "score_with_teacher"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'tropd.teacher' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
