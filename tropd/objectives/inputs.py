"""Per-token inputs every objective reads, and what it returns.

Shapes: B sequences, T response positions, V vocabulary, K teacher top-k. Position ``t`` of every tensor
refers to the response token ``tokens[:, t]`` (inputs are already shifted: ``student_logits[:, t]`` is the
student's distribution for that token given everything before it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from tropd.objectives.head import LMHead

#: fields that hold one value per position (exactly ``[B,T]``) and fields that hold token ids.
_PER_POSITION = ("tokens", "behavior_logprobs", "teacher_logprobs", "teacher_entropy", "loss_mask",
                 "teacher_token_mask", "trust_mask", "trust_uniforms")
_INTEGER = ("tokens", "teacher_topk_ids")


@dataclass
class TokenInputs:
    """One scored batch of rollouts, aligned per response position.

    The student is given either as logits, or as final hidden states and its LM head (the fused path: the
    loss projects to the vocabulary chunk by chunk, so no ``[B,T,V]`` student tensor exists).

    Attributes:
        student_logits: ``[B,T,V]`` student logits at each response position; requires grad.
        student_hidden: ``[B,T,H]`` final (post-norm) student hidden states instead of logits; requires grad.
        student_head: the :class:`~tropd.objectives.head.LMHead` that maps ``student_hidden`` to logits.
        tokens: ``[B,T]`` int64 response tokens ``y_t``.
        behavior_logprobs: ``[B,T]`` ``b_t = log π_beh(y_t | h_t)``, recorded at rollout time (detached).
        teacher_logprobs: ``[B,T]`` ``q_t = log π_T(y_t | h_t)`` (detached).
        teacher_topk_ids: ``[B,T,K]`` ids of the teacher's top-k tokens at each position.
        teacher_topk_logprobs: ``[B,T,K]`` their teacher log-probs, **not renormalised**.
        teacher_entropy: ``[B,T]`` full-vocabulary teacher entropy ``H_T(t)``.
        teacher_logits: ``[B,T,V]`` full teacher logits (only the full-vocabulary objectives gkd, trb).
        loss_mask: ``[B,T]`` bool, positions that carry loss (response tokens, not prompt or padding).
        teacher_token_mask: ``[B,T]`` bool, teacher-written guidance-prefix positions (subset of loss_mask).
        trust_mask: ``[B,T]`` bool, if given it replaces the sampled trust mask ``M_t`` (tests, replay).
        trust_uniforms: ``[B,T]`` ``U_t ~ Uniform[0, 1)`` per position; the sampled trust mask is then
            ``M_t = [U_t < P_trust(t)]``. Data-parallel training passes them so that each row's mask depends on
            the row, not on the micro-batch it lands in. Without them ``M_t`` is drawn with ``generator``.
        generator: ``torch.Generator`` for the Bernoulli trust mask (device of the logits).
        progress: fraction of training done in ``[0, 1]`` (curriculum objectives such as reopold_2stage).
    """

    student_logits: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    student_hidden: torch.Tensor | None = None
    student_head: LMHead | None = None
    behavior_logprobs: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
    teacher_topk_ids: torch.Tensor | None = None
    teacher_topk_logprobs: torch.Tensor | None = None
    teacher_entropy: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    teacher_token_mask: torch.Tensor | None = None
    trust_mask: torch.Tensor | None = None
    trust_uniforms: torch.Tensor | None = None
    generator: torch.Generator | None = None
    progress: float | None = None

    def __post_init__(self) -> None:
        if (self.student_logits is None) == (self.student_hidden is None):
            raise ValueError("TokenInputs needs either student_logits, or student_hidden with student_head")
        if self.student_hidden is not None and self.student_head is None:
            raise ValueError("TokenInputs.student_hidden needs student_head (the LM head that makes its logits)")
        if self.tokens is None:
            raise ValueError("TokenInputs.tokens is required")
        logits = self.student
        if logits.dim() != 3:
            raise ValueError(f"TokenInputs.{self._student_name} must be [B,T,{'V' if self.student_hidden is None else 'H'}], "
                             f"got shape {tuple(logits.shape)}")
        bt = tuple(logits.shape[:2])
        if self.loss_mask is None:
            self.loss_mask = torch.ones(bt, dtype=torch.bool, device=logits.device)
        if self.teacher_token_mask is None:
            self.teacher_token_mask = torch.zeros(bt, dtype=torch.bool, device=logits.device)
        self.loss_mask = self.loss_mask.bool()
        self.teacher_token_mask = self.teacher_token_mask.bool() & self.loss_mask
        self.check_shapes()

    def check_shapes(self) -> None:
        """Raise ``ValueError`` naming the first field whose shape or dtype does not fit the student's tensor.

        Run at construction and again by every objective call (fields may be reassigned in between).
        """
        logits = self.student
        if logits.dim() != 3:
            raise ValueError(f"TokenInputs.{self._student_name} must be 3-d [B,T,·], got shape {tuple(logits.shape)}")
        bt = tuple(logits.shape[:2])
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, torch.Tensor) or f.name in ("student_logits", "student_hidden"):
                continue
            if f.name in _PER_POSITION and tuple(value.shape) != bt:
                raise ValueError(f"TokenInputs.{f.name} must be [B,T]={bt}, got {tuple(value.shape)}")
            if tuple(value.shape[:2]) != bt:
                raise ValueError(f"TokenInputs.{f.name} must start with [B,T]={bt}, got {tuple(value.shape)}")
            if f.name in _INTEGER and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
                raise ValueError(f"TokenInputs.{f.name} must hold integer token ids, got dtype {value.dtype}")
        if self.teacher_logits is not None and self.teacher_logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"TokenInputs.teacher_logits has vocabulary {self.teacher_logits.shape[-1]}, "
                f"the student {self.vocab_size}: teacher and student must share a tokenizer"
            )
        if self.teacher_logits is not None and self.teacher_logits.dim() != 3:
            raise ValueError(f"TokenInputs.teacher_logits must be [B,T,V], got {tuple(self.teacher_logits.shape)}")
        ids, lps = self.teacher_topk_ids, self.teacher_topk_logprobs
        if (ids is None) != (lps is None):
            raise ValueError("TokenInputs.teacher_topk_ids and teacher_topk_logprobs must be given together")
        if ids is not None:
            for name, value in (("teacher_topk_ids", ids), ("teacher_topk_logprobs", lps)):
                if value.dim() != 3:
                    raise ValueError(f"TokenInputs.{name} must be [B,T,K], got shape {tuple(value.shape)}")
            if ids.shape != lps.shape:
                raise ValueError(
                    f"TokenInputs.teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs "
                    f"{tuple(lps.shape)} must have the same shape [B,T,K]"
                )

    @property
    def student(self) -> torch.Tensor:
        """The student's tensor: ``student_logits``, or ``student_hidden`` on the fused path."""
        return self.student_logits if self.student_logits is not None else self.student_hidden

    @property
    def _student_name(self) -> str:
        return "student_logits" if self.student_logits is not None else "student_hidden"

    @property
    def vocab_size(self) -> int:
        """V, the size of the student's output distribution."""
        return int(self.student_logits.shape[-1]) if self.student_logits is not None else self.student_head.vocab_size

    @property
    def student_mask(self) -> torch.Tensor:
        """Loss-bearing positions sampled by the student (not teacher-written)."""
        return self.loss_mask & ~self.teacher_token_mask

    def take_rows(self, index: torch.Tensor) -> TokenInputs:
        """The positions ``index`` of the flattened ``[B·T]`` grid as a ``[1, n]`` batch: every per-position field
        taken at those rows, everything else (head, generator, progress) kept."""
        t = self.tokens.shape[1]
        rows, cols = index // t, index % t  # indexing [B,T] directly: no copy of a non-contiguous field

        def take(value):
            return value[rows, cols][None] if isinstance(value, torch.Tensor) else value

        return TokenInputs(**{f.name: take(getattr(self, f.name)) for f in fields(self)})

    def require(self, objective: str, *names: str) -> None:
        """Raise a clear error naming every input ``objective`` needs but did not get."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"objective '{objective}' needs TokenInputs.{', '.join(missing)}, which is None")


@dataclass
class ObjectiveOutput:
    """Result of an objective on one (micro-)batch.

    ``loss = token_losses.sum() / num_tokens``: the token mean over loss-bearing positions, where
    ``num_tokens`` is this batch's count unless a global count was passed (accumulation / data parallel).
    Differentiate ``loss``: on the fused path with the gradient formed in forward (:mod:`tropd.objectives.fused`)
    ``token_losses`` are values only.
    """

    loss: torch.Tensor
    token_losses: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    num_tokens: float = 0.0
