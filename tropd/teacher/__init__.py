"""The teacher: what the frozen teacher says about each response position, behind the ``Teacher`` seam."""

from tropd.teacher.scoring import TeacherScores, entropy_from_logprobs, score_with_teacher
from tropd.teacher.remote import RemoteTeacher, TeacherServerError
from tropd.teacher.seam import InProcessTeacher, Teacher

__all__ = ["InProcessTeacher", "RemoteTeacher", "Teacher", "TeacherScores", "TeacherServerError",
           "entropy_from_logprobs", "score_with_teacher"]
