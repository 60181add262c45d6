"""The student's LM head as a function of hidden states, so a loss can project to the vocabulary chunk by chunk.

``z = post(project(h))`` for final (post-norm) hidden states ``h``, where ``project`` is the model's output
layer (``h Wᵀ (+ b)``) and ``post`` the logit post-processing some models apply in their own ``forward``:
soft-capping ``c · tanh(z / c)`` (Gemma), division by ``logits_scaling`` (Granite), multiplication by
``logit_scale`` (Cohere). Given :class:`LMHead` and hidden states instead of logits, an objective evaluates its
row terms chunk by chunk over positions (``[chunk, V]`` logits at a time, recomputed in backward), so no
``[B·T, V]`` student tensor ever exists (:func:`tropd.objectives.terms.rowwise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

#: Positions per chunk of the fused (hidden-state) path when the objective has no ``chunk_size``.
FUSED_CHUNK = 1024


@dataclass(frozen=True)
class LMHead:
    """``hidden [n, H] -> logits [n, V]``: ``project`` (the output layer, e.g. an ``nn.Linear``) then the
    post-processing of the module docstring. ``vocab_size`` is V. ``params``: the tensors a plain-function
    ``project`` reads that may take gradients (an ``nn.Module``'s are found by itself); with them known, the loss
    forms its gradient in the forward pass (:mod:`tropd.objectives.fused`)."""

    project: Callable[[torch.Tensor], torch.Tensor]
    vocab_size: int
    softcap: float | None = None
    divide_by: float | None = None
    multiply_by: float | None = None
    params: tuple[torch.Tensor, ...] = ()

    def trainable(self) -> tuple[torch.Tensor, ...] | None:
        """The tensors ``project`` reads that may take gradients: ``params`` if given, else the parameters of an
        ``nn.Module`` ``project``; ``None`` when unknown (a plain function without ``params``)."""
        if self.params:
            return tuple(self.params)
        if isinstance(self.project, torch.nn.Module):
            return tuple(self.project.parameters())
        return None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        z = self.project(hidden)
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.divide_by is not None:
            z = z / self.divide_by
        if self.multiply_by is not None:
            z = z * self.multiply_by
        return z

    @classmethod
    def of(cls, model) -> LMHead:
        """The head of an HF causal LM: its output embeddings and its config's logit post-processing."""
        config = model.config.get_text_config()
        out = model.get_output_embeddings()
        weight = getattr(out, "weight", None)
        vocab = int(weight.shape[0]) if weight is not None else int(config.vocab_size)
        return cls(out, vocab, getattr(config, "final_logit_softcapping", None),
                   getattr(config, "logits_scaling", None), getattr(config, "logit_scale", None))
