"""The fused loss with its gradient formed in the forward pass: one vocabulary projection per chunk.

For a loss that is a sum of per-position terms, ``L = Σ_i ℓ_i(z_i) / N`` with ``z_i = head(h_i)`` and each ``ℓ_i``
reading only its own row (the objective's ``rows_independent``), the gradient of one chunk ``c`` of positions is
known as soon as its logits are::

    ∂L/∂h_c = (∂ℓ_c/∂z_c) W / N,      ∂L/∂W += (∂ℓ_c/∂z_c)ᵀ h_c / N

(through the head's post-processing too), so :func:`loss_with_gradient` projects each chunk once,
differentiates the chunk's loss locally (autograd on ``[chunk, V]`` tensors) and accumulates ``∂L/∂h``
``[N, H]`` and ``∂L/∂θ`` for the head's parameters ``θ`` (one weight-sized buffer). Backward only scales these
by the upstream gradient: 3 matrix products per chunk (projection, ``∂L/∂h``, ``∂L/∂W``) instead of 4 for
projecting again in backward (:func:`tropd.objectives.terms.rowwise` with ``head``), and the row terms are
evaluated once instead of twice. No ``[N, V]`` tensor exists. The result is first-order only (no double backward).
"""

from __future__ import annotations

from typing import Callable

import torch

from tropd.objectives.head import LMHead

#: ``chunk_loss(logits [n, V], index [n]) -> (loss of those rows, detached per-row values [n, k])``.
ChunkLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _LossWithGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: tuple, hidden: torch.Tensor, *params: torch.Tensor):
        head, index, chunk_size, chunk_loss = spec
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[1] else None
        grad_p: list[torch.Tensor | None] = [None] * len(params)
        # what each chunk differentiates: None for the hidden rows, j for params[j]
        targets = ([None] if grad_h is not None else []) + [j for j, w in enumerate(ctx.needs_input_grad[2:]) if w]
        total, values = None, []
        for idx in index.split(chunk_size):
            with torch.enable_grad():
                h = hidden.index_select(0, idx).detach().requires_grad_(grad_h is not None)
                loss, value = chunk_loss(head(h), idx)
                inputs = [h if j is None else params[j] for j in targets]
                grads = (torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad and inputs
                         else [None] * len(inputs))
            for j, g in zip(targets, grads):
                if g is None:
                    continue
                if j is None:
                    grad_h.index_add_(0, idx, g.to(grad_h.dtype))
                else:  # autograd's result is a fresh tensor: accumulate into the first chunk's
                    grad_p[j] = g if grad_p[j] is None else grad_p[j].add_(g)
            total = loss.detach() if total is None else total + loss.detach()
            values.append(value.detach())
        ctx.grads = (grad_h, grad_p)
        packed = torch.cat(values)
        ctx.mark_non_differentiable(packed)
        return total, packed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss: torch.Tensor, _g_packed: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("the fused loss formed its gradient in forward and hands it out once: a second "
                               "backward through the same loss (retain_graph=True) is not supported")
        grad_h, grad_p = ctx.grads
        ctx.grads = None  # the buffers are scaled in place
        if grad_h is not None:
            grad_h = grad_h.mul_(g_loss.to(grad_h.dtype))
        scaled = [None if g is None else g.mul_(g_loss.to(g.dtype)) for g in grad_p]
        return (None, grad_h, *scaled)


def reads_only(head: LMHead, params: tuple[torch.Tensor, ...], row: torch.Tensor) -> bool:
    """Whether every tensor that takes a gradient through ``head`` is one of ``params``: ``head`` is applied to one
    detached ``row`` ``[1, H]`` and its autograd graph walked to the leaves. A tensor read but not listed (FSDP1's
    flat-parameter views, a weight kept as a plain attribute) would get no gradient from the one-pass loss, whose
    backward hands gradients only to ``hidden`` and ``params``; the caller then keeps the two-pass path."""
    with torch.enable_grad():
        z = head(row.detach())
    listed = {id(p) for p in params}
    seen, stack = set(), [z.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        leaf = getattr(fn, "variable", None)  # AccumulateGrad: a leaf that takes a gradient
        if leaf is not None and id(leaf) not in listed:
            return False
        stack.extend(f for f, _ in fn.next_functions)
    return True


def loss_with_gradient(hidden: torch.Tensor, head: LMHead, index: torch.Tensor, chunk_size: int,
                       chunk_loss: ChunkLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_chunks loss_c, per-row values [len(index), k])`` over the rows ``index`` of ``hidden`` ``[M, H]``,
    ``chunk_size`` rows at a time, each chunk's logits ``head(hidden[idx])`` made once and its gradient w.r.t.
    ``hidden`` and ``head.trainable()`` formed right away (module docstring). ``chunk_loss`` must depend on its own
    rows only; the loss is differentiable (first order), the values are not. ``index`` must not be empty."""
    params = head.trainable() or ()
    return _LossWithGradient.apply((head, index, chunk_size, chunk_loss), hidden, *params)
