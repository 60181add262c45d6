"""Teacher scoring: what the frozen teacher says about each response position (in-process now)."""

from tropd.teacher.scoring import TeacherScores, entropy_from_logprobs, score_with_teacher

__all__ = ["TeacherScores", "entropy_from_logprobs", "score_with_teacher"]
