"""The teacher: what the frozen teacher says about each response position, and the rows it writes, behind the
``Teacher`` protocol."""

from tropd.teacher.in_process import InProcessTeacher
from tropd.teacher.openai_server import VLLMServerTeacher
from tropd.teacher.protocol import Teacher
from tropd.teacher.remote import RemoteTeacher, TeacherServerError
from tropd.teacher.scoring import TEACHER_CHUNK, TeacherScores, entropy_from_logprobs, score_with_teacher

__all__ = ["InProcessTeacher", "RemoteTeacher", "TEACHER_CHUNK", "Teacher", "TeacherScores", "TeacherServerError",
           "VLLMServerTeacher", "entropy_from_logprobs", "score_with_teacher"]
