"""The objective base class: one place that turns a scored batch into per-token losses, the step loss, metrics.

An objective is evaluated in two stages:

1. *row terms*: per-position quantities that need the student's full-vocabulary distribution (the sampled
   log-prob ``s_t``, its entropy, top-k forward KL, full-vocabulary divergences). :func:`terms.rowwise` computes
   them, chunked over positions when ``chunk_size`` is set.
2. *combine*: cheap ``[B,T]`` arithmetic (rewards, masks, trust region) that yields per-token losses.

The loss is the token mean ``Σ_t ℓ_t / N`` over loss-bearing positions; pass ``num_tokens`` = the global count
(all micro-batches and processes of one optimiser step) so that accumulation and data parallelism leave the
gradient unchanged (docs/method.md §3, §6.5).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch

from tropd.needs import Needs
from tropd.objectives import fused, terms
from tropd.objectives.checks import check_inputs
from tropd.objectives.head import FUSED_CHUNK
from tropd.objectives.inputs import ObjectiveOutput, TokenInputs
from tropd.objectives.keywords import Range, check_keywords

#: Default trust threshold τ = log(λ/(1−λ)) with λ = 0.2 (docs/method.md §3).
DEFAULT_TAU = math.log(0.2 / 0.8)


class Objective:
    """Base class. Subclasses set :attr:`needs` in ``__init__`` and implement :meth:`combine`."""

    name: str = ""
    needs: Needs = Needs()
    #: row terms besides ``s`` (log-prob of the sampled token) and ``student_entropy`` that combine() reads.
    row_terms: tuple[str, ...] = ()
    #: ``[B,T]`` inputs the loss reads (a missing one is an error naming it); the K1 diagnostics are reported
    #: whenever ``behavior_logprobs`` and ``teacher_logprobs`` are both given.
    requires: tuple[str, ...] = ("behavior_logprobs", "teacher_logprobs")
    #: the allowed interval of numeric keywords (a subclass adds its own; :mod:`tropd.objectives.keywords`)
    keyword_ranges: dict[str, Range] = {"chunk_size": Range(1, None)}

    def __init__(self, chunk_size: int | None = None) -> None:
        check_keywords(self.name or type(self).__name__, Objective.__init__, {"chunk_size": chunk_size},
                       self.all_keyword_ranges())
        self.chunk_size = chunk_size

    def __init_subclass__(cls, **kwargs) -> None:
        """Every constructor's keyword values are checked against its annotations and :attr:`keyword_ranges`
        before it runs (:func:`tropd.objectives.keywords.check_keywords`): ``beta=nan`` or ``top_k=True`` never
        builds an objective."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def checked_init(self, *args, **kw):
            given = signature.bind(self, *args, **kw).arguments
            values = {k: v for k, v in given.items() if k != "self"
                      and signature.parameters[k].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                               inspect.Parameter.VAR_KEYWORD)}
            check_keywords(self.name or type(self).__name__, init, values, self.all_keyword_ranges())
            init(self, *args, **kw)

        cls.__init__ = checked_init

    @classmethod
    def all_keyword_ranges(cls) -> dict[str, Range]:
        """:attr:`keyword_ranges` of the class and its bases (the most derived entry wins)."""
        out: dict[str, Range] = {}
        for klass in reversed(cls.__mro__):
            out.update(klass.__dict__.get("keyword_ranges", {}))
        return out

    # -- stage 1 ---------------------------------------------------------------------------------------
    def row_fn(self, logits: torch.Tensor, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-position terms from the student logits ``[n,V]``; override to add more.

        One fused pass (:func:`terms.log_softmax_gather`) gives the student entropy and the log-probs of the
        sampled token (``s``) and, when the teacher's top-k ids are given, of those ids (``student_topk``)."""
        ids = rows["tokens"].unsqueeze(-1)
        if "topk_ids" in rows:
            ids = torch.cat([ids, rows["topk_ids"]], dim=-1)
        picked, entropy = terms.log_softmax_gather(logits, ids)
        out = {"s": picked[..., 0], "student_entropy": entropy}
        if "topk_ids" in rows:
            out["student_topk"] = picked[..., 1:]
        return out

    def side_inputs(self, x: TokenInputs) -> dict[str, torch.Tensor]:
        """Per-position tensors ``row_fn`` reads: teacher quantities detached, masked-out positions sanitised."""
        pad = ~x.loss_mask
        rows = {"tokens": x.tokens.masked_fill(pad, 0)}
        if self.needs.teacher_topk:
            x.require(self.name, "teacher_topk_ids", "teacher_topk_logprobs")
            rows["topk_ids"] = x.teacher_topk_ids.masked_fill(pad[..., None], 0)
            rows["topk_logprobs"] = x.teacher_topk_logprobs.detach().masked_fill(pad[..., None], 0.0)
        if self.needs.teacher_logits:
            x.require(self.name, "teacher_logits")
            rows["teacher_logits"] = x.teacher_logits.detach().masked_fill(pad[..., None], 0.0)
        return rows

    # -- stage 2 ---------------------------------------------------------------------------------------
    def combine(self, t: dict[str, torch.Tensor], x: TokenInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token losses ``[B,T]`` from row terms ``t`` and ``[B,T]`` inputs, plus per-region loss sums.

        Returns ``(token_losses, parts)`` where ``parts`` maps metric names to ``[B,T]`` tensors or scalars:
        ``region_<name>`` entries are per-token loss contributions (reported as their share of the loss) and
        ``frac_masked`` the share of student positions whose main term was dropped or replaced.
        """
        raise NotImplementedError

    def rows_independent(self, x: TokenInputs) -> bool:
        """Whether :meth:`combine` at each position reads that position's row terms and inputs only (no batch
        statistic such as an entropy quantile, no random draw over the batch). Then the fused path forms the
        gradient chunk by chunk in the forward pass (:mod:`tropd.objectives.fused`); override to say no."""
        return True

    # -- evaluation --------------------------------------------------------------------------------------
    def __call__(self, x: TokenInputs, num_tokens: float | int | torch.Tensor | None = None) -> ObjectiveOutput:
        x.require(self.name, *self.requires)
        student = check_inputs(x, num_tokens)  # NaN/inf, bad ids or num_tokens: NonFiniteInputError naming it
        m = x.loss_mask
        n = m.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=m.device)
        denom = n.to(terms.compute_dtype(student)).clamp(min=1.0)
        names = ("s", "student_entropy", *self.row_terms)
        loss = None
        if self._grad_in_forward(x):  # the loss carries the gradient; t holds the detached row terms
            loss, t = self._fused_loss(student, x, names, denom)
        else:
            t = terms.rowwise(student, m, self.side_inputs(x), self.row_fn, names, self.chunk_size,
                              head=x.student_head)
        token_losses, parts = self._token_losses(t, x)
        if loss is None:
            loss = token_losses.sum() / denom
        metrics = self._metrics(t, x, loss, parts, denom)
        return ObjectiveOutput(loss=loss, token_losses=token_losses, metrics=metrics, num_tokens=float(n))

    def _token_losses(self, t: dict[str, torch.Tensor], x: TokenInputs):
        """``(token_losses, parts)`` from the row terms ``t``: the ``[B,T]`` inputs (sanitised at padding) and the
        K1 reward join ``t`` in place, then :meth:`combine`; positions outside ``loss_mask`` get 0."""
        m = x.loss_mask
        zero = torch.zeros((), dtype=t["s"].dtype, device=m.device)
        for key in ("behavior_logprobs", "teacher_logprobs", "teacher_entropy"):
            value = getattr(x, key)
            if value is not None:  # sanitise padding so no NaN/Inf can leak through masked arithmetic
                t[key] = torch.where(m, value.to(zero.dtype).detach(), zero)
        if "teacher_logprobs" in t and "behavior_logprobs" in t:
            t["reward"] = t["teacher_logprobs"] - t["behavior_logprobs"]
        token_losses, parts = self.combine(t, x)
        return torch.where(m, token_losses, zero), parts

    def _grad_in_forward(self, x: TokenInputs) -> bool:
        """The fused path with the gradient formed in forward: hidden states and a head whose trainable tensors
        are known (and are all it reads, :func:`fused.reads_only`), something to differentiate, loss positions, and
        a row-local :meth:`combine`."""
        head = x.student_head
        if head is None or not torch.is_grad_enabled() or not bool(x.loss_mask.any()):
            return False
        params = head.trainable()
        hidden = x.student_hidden
        return (params is not None and (hidden.requires_grad or any(p.requires_grad for p in params))
                and self.rows_independent(x) and fused.reads_only(head, params, hidden[0, :1]))

    def _fused_loss(self, hidden: torch.Tensor, x: TokenInputs, names: tuple[str, ...], denom: torch.Tensor):
        """``(loss, row terms [B,T] detached)`` by :func:`tropd.objectives.fused.loss_with_gradient`: each chunk's
        row terms, :meth:`combine` on that chunk alone, its loss ``Σ ℓ / N`` differentiated right away."""
        b, t_len, _ = hidden.shape
        rows = {k: v.reshape(b * t_len, *v.shape[2:]) for k, v in self.side_inputs(x).items()}
        index = x.loss_mask.reshape(-1).nonzero().squeeze(1)

        def chunk_loss(logits: torch.Tensor, idx: torch.Tensor):
            out = self.row_fn(logits, {k: v.index_select(0, idx) for k, v in rows.items()})
            values = torch.stack([out[n].detach() for n in names], dim=-1)
            token_losses, _ = self._token_losses({n: out[n][None] for n in names}, x.take_rows(idx))
            return token_losses.sum() / denom, values

        loss, values = fused.loss_with_gradient(hidden.reshape(b * t_len, -1), x.student_head, index,
                                                self.chunk_size or FUSED_CHUNK, chunk_loss)
        full = torch.zeros(b * t_len, len(names), dtype=values.dtype, device=values.device).index_copy(0, index, values)
        return loss, {n: full[:, j].reshape(b, t_len) for j, n in enumerate(names)}

    def _metrics(self, t, x: TokenInputs, loss, parts, denom) -> dict[str, float]:
        with torch.no_grad():
            sm = x.student_mask
            out = {"loss": float(loss), "num_tokens": float(x.loss_mask.sum()), "student_tokens": float(sm.sum())}
            if sm.any():
                out["student_entropy"] = _masked_mean(t["student_entropy"], sm)
            if "behavior_logprobs" in t and sm.any():  # how far the sampler's log-probs are from the trainer's
                gap = (t["s"] - t["behavior_logprobs"]).abs()[sm]
                out["behavior_gap"], out["behavior_gap_max"] = float(gap.mean()), float(gap.max())
            if "reward" in t:
                r = t["reward"][sm]
                out["k1_rkl"] = float(-r.mean()) if r.numel() else 0.0
                for name, q in (("reward_min", 0.0), ("reward_p01", 0.01), ("reward_p50", 0.5)):
                    out[name] = float(torch.quantile(r, q)) if r.numel() else 0.0
            if x.teacher_topk_logprobs is not None:
                mass = x.teacher_topk_logprobs.detach().to(t["s"].dtype).exp().sum(-1)
                out["teacher_topk_mass"] = _masked_mean(mass, sm)
            out["frac_masked"] = 0.0
            for key, value in parts.items():
                if key.startswith("region_"):
                    out["loss_" + key[len("region_"):]] = float(value.sum() / denom)
                elif isinstance(value, torch.Tensor) and value.shape == sm.shape:
                    out[key] = _masked_mean(value.to(t["s"].dtype), sm)
                else:
                    out[key] = float(value)
            return out


def _masked_mean(value: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``value`` over ``mask``; values outside the mask (padding: possibly NaN/inf) are never read."""
    n = mask.sum()
    return float(torch.where(mask, value, torch.zeros_like(value)).sum() / n) if n > 0 else 0.0
