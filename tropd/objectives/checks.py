"""The input check every objective call runs first: finite numbers at loss positions, or an error naming the input.

:func:`check_inputs` rejects, at loss-bearing positions only (``loss_mask``; padding may hold anything):

- NaN or ±inf in ``student_logits``, ``teacher_logits``, ``behavior_logprobs``, ``teacher_logprobs`` and
  ``teacher_entropy``; NaN or +inf in ``teacher_topk_logprobs`` (−inf there is a teacher probability of exactly
  0, an entry that contributes exactly 0 to the top-k terms);
- ``tokens`` and ``teacher_topk_ids`` outside ``[0, V)``, and a top-k id listed twice at one position (the
  top-k forward KL would count it twice);
- ``num_tokens`` that is not a positive finite number (0 only for a batch without loss positions), and a
  non-finite ``progress``.

Every given input is checked, whether or not this objective's loss reads it (the common metrics read the
rewards and the top-k mass). Failures raise :class:`NonFiniteInputError` (a ``ValueError``) whose message names
the input, counts the bad values and locates the first one; wrong shapes or dtypes are caught before, by
:meth:`TokenInputs.check_shapes`, as plain ``ValueError``.

Cost: full-size ``[B,T,V]`` logits are tested through one row sum each (NaN and ±inf propagate into the sum;
``torch.isfinite`` on the whole tensor costs as much as a log-softmax on CPU), the small tensors with
``isfinite``; all verdicts are combined so that the host waits once. Counting and locating run only on failure.

Non-finite student logits at padding rows are harmless to the loss but not to the gradient (the unchunked
log-softmax backward turns them into NaN gradients, which would reach the model's weights): those rows are
zeroed for the call, so their gradient is exactly 0 as in the chunked path.
"""

from __future__ import annotations

import math
import numbers

import torch

from tropd.objectives.errors import NonFiniteInputError
from tropd.objectives.inputs import TokenInputs
from tropd.objectives.terms import compute_dtype

#: Float inputs in the order they are reported, whether −inf is allowed, and what a bad value means.
FLOAT_INPUTS: tuple[tuple[str, bool, str], ...] = (
    ("teacher_logprobs", False,
     "the teacher's log-prob of each sampled token must be finite (−inf, probability 0 for a token that was "
     "sampled, makes the K1 reward −inf; NaN means the teacher's forward pass failed)"),
    ("teacher_topk_logprobs", True,
     "−inf (teacher probability 0) is allowed, NaN and +inf are not (NaN means the teacher's forward pass failed)"),
    ("teacher_entropy", False, "the teacher entropy is a finite number of nats"),
    ("teacher_logits", False,
     "full teacher logits must be finite (NaN means the teacher's forward pass failed; a −inf logit makes "
     "reverse-KL terms infinite, mask with a large finite negative value instead)"),
    ("behavior_logprobs", False,
     "the log-prob recorded at rollout time for each sampled token must be finite"),
    ("student_logits", False,
     "the student's forward pass overflowed or produced NaN (learning rate too high? half precision? "
     "float32 is safest)"),
    ("student_hidden", False,
     "the student's forward pass overflowed or produced NaN (learning rate too high? half precision? "
     "float32 is safest)"),
)
_ID_HINTS = {
    "tokens": "the response tokens index the student's logits, so they must be ids of the student's vocabulary",
    "teacher_topk_ids": "the teacher's top-k ids index the student's logits, so teacher and student must share "
                        "a tokenizer of the same size",
}
#: Inputs shaped ``[B,T,V]``: tested through a row sum, reported with the vocabulary id.
_FULL_VOCAB = ("student_logits", "teacher_logits")


def _bad_values(value: torch.Tensor, allow_neg_inf: bool) -> torch.Tensor:
    """Boolean tensor of the rejected values of ``value``."""
    return ~(value < math.inf) if allow_neg_inf else ~torch.isfinite(value)


def _where(bad: torch.Tensor, name: str) -> str:
    """``(first at batch b, position t[, top-k entry k | vocab id v])`` of the first True entry of ``bad``."""
    first = [int(i) for i in bad.nonzero()[0]]
    where = f"batch {first[0]}, position {first[1]}"
    if len(first) > 2:
        where += f", {'vocab id' if name in _FULL_VOCAB else 'top-k entry'} {first[2]}"
    return where


def _float_problem(x: TokenInputs, name: str, allow_neg_inf: bool, hint: str) -> str | None:
    """The message for ``name`` if it holds rejected values at loss positions, else None (slow path)."""
    value = getattr(x, name).detach()
    mask = x.loss_mask if value.dim() == 2 else x.loss_mask[..., None]
    bad = _bad_values(value, allow_neg_inf) & mask
    count = int(bad.sum())
    if count == 0:
        return None
    first = value[tuple(bad.nonzero()[0])]
    kinds = "NaN/+inf" if allow_neg_inf else "NaN/inf"
    return (f"TokenInputs.{name} has {count} {kinds} value{'s' if count != 1 else ''} at loss positions "
            f"(first at {_where(bad, name)}: {float(first)}); {hint}")


def _id_problem(x: TokenInputs, name: str, vocab: int) -> str | None:
    """The message for token ids ``name`` out of ``[0, vocab)`` or (top-k) duplicated at a loss position."""
    ids = getattr(x, name)
    mask = x.loss_mask if ids.dim() == 2 else x.loss_mask[..., None]
    bad = ((ids < 0) | (ids >= vocab)) & mask
    count = int(bad.sum())
    if count:
        first = int(ids[tuple(bad.nonzero()[0])])
        return (f"TokenInputs.{name} has {count} id{'s' if count != 1 else ''} outside [0, V={vocab}) at loss "
                f"positions (first at {_where(bad, name)}: id {first}); {_ID_HINTS[name]}")
    if ids.dim() == 3:
        dup = _duplicates(ids) & x.loss_mask
        count = int(dup.sum())
        if count:
            b, t = (int(i) for i in dup.nonzero()[0])
            row = ids[b, t].tolist()
            repeated = sorted({v for v in row if row.count(v) > 1})
            return (f"TokenInputs.{name} repeats an id at {count} loss position{'s' if count != 1 else ''} "
                    f"(first at batch {b}, position {t}: id {repeated[0]} listed {row.count(repeated[0])} times); "
                    "the top-k forward KL would count a repeated id more than once")
    return None


def _duplicates(ids: torch.Tensor) -> torch.Tensor:
    """``[B,T]`` bool: some id appears twice among the ``K`` ids of this position."""
    if ids.shape[-1] < 2:
        return torch.zeros(ids.shape[:-1], dtype=torch.bool, device=ids.device)
    s = ids.sort(dim=-1).values
    return (s[..., 1:] == s[..., :-1]).any(-1)


def _check_scalars(x: TokenInputs, num_tokens) -> None:
    """``num_tokens``: a positive finite count (0 only without loss positions); ``progress``: finite."""
    if x.progress is not None and not math.isfinite(float(x.progress)):
        raise NonFiniteInputError(f"TokenInputs.progress must be a finite fraction of training, got {x.progress}")
    if num_tokens is None:
        return
    if isinstance(num_tokens, torch.Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"num_tokens must be a single number, got a tensor of shape {tuple(num_tokens.shape)}")
        value = float(num_tokens)
    elif isinstance(num_tokens, numbers.Real):
        value = float(num_tokens)
    else:
        raise TypeError(f"num_tokens must be a number or a one-element tensor, got {num_tokens!r}")
    if math.isfinite(value) and (value > 0 or (value == 0 and not bool(x.loss_mask.any()))):
        return
    raise NonFiniteInputError(
        f"num_tokens must be a positive finite number (the count of loss-bearing positions of the whole "
        f"optimiser step, see count_loss_tokens), got {num_tokens!r}")


def check_inputs(x: TokenInputs, num_tokens=None) -> torch.Tensor:
    """Check ``x`` and ``num_tokens`` (see the module docstring); returns the student tensor to evaluate.

    That is ``x.student`` (logits, or hidden states on the fused path) itself, or a copy whose padding rows
    holding NaN/inf are zeroed.
    Raises ``ValueError`` for shapes, :class:`NonFiniteInputError` for values, naming the input.
    """
    x.check_shapes()
    _check_scalars(x, num_tokens)
    m = x.loss_mask
    vocab = x.vocab_size
    student_name = x._student_name
    verdicts: list[torch.Tensor] = []  # 0-dim bool tensors: True when the check passed
    pad_rows_ok = None
    for name, allow_neg_inf, _ in FLOAT_INPUTS:
        value = getattr(x, name)
        if value is None:
            continue
        value = value.detach()
        if name in _FULL_VOCAB:
            # NaN and ±inf propagate into the row sum; a finite sum that overflows only sends us to the exact scan
            rows_ok = torch.isfinite(value.sum(-1, dtype=compute_dtype(value)))
        else:
            rows_ok = ~_bad_values(value, allow_neg_inf)
            if rows_ok.dim() == 3:
                rows_ok = rows_ok.all(-1)
        if name == student_name:
            pad_rows_ok = (rows_ok | m).all()
        verdicts.append((rows_ok | ~m).all())
    id_inputs = [("tokens", x.tokens)]
    if x.teacher_topk_ids is not None:
        id_inputs.append(("teacher_topk_ids", x.teacher_topk_ids))
    for name, ids in id_inputs:
        in_range = (ids >= 0) & (ids < vocab)
        if ids.dim() == 3:
            in_range = in_range.all(-1) & ~_duplicates(ids)
        verdicts.append((in_range | ~m).all())
    if pad_rows_ok is not None:
        verdicts.append(pad_rows_ok)
    if bool(torch.stack(verdicts).all()):  # the one host synchronisation of the common case
        return x.student

    problems = [(name, _id_problem(x, name, vocab)) for name, _ in id_inputs]
    problems += [(spec[0], _float_problem(x, *spec)) for spec in FLOAT_INPUTS if getattr(x, spec[0]) is not None]
    problems = [(name, message) for name, message in problems if message]
    if problems:
        others = [name for name, _ in problems[1:]]
        also = f" (also rejected: {', '.join(others)})" if others else ""
        raise NonFiniteInputError(problems[0][1] + also)
    logits = x.student
    pad_bad = ~torch.isfinite(logits.detach()).all(-1) & ~m
    if bool(pad_bad.any()):
        logits = logits.masked_fill(pad_bad[..., None], 0.0)
    return logits
