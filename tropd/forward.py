"""One forward pass over ``prompt ++ response``, aligned to response positions.

Layout: ``input_ids`` is ``[B, L]`` with prompts **left**-padded to a common length ``P = response_start`` and
responses **right**-padded, so ``T = L - P`` response positions. Padding is marked by ``attention_mask == 0``.

Positions: a token's position id is the number of real tokens before it,
``position_ids = cumsum(attention_mask) - 1`` (clamped at 0 on left padding), so a left-padded row gets the same
rotary positions as the unpadded sequence.

Alignment: a causal LM's output at index ``i`` is the distribution of token ``i + 1``. Response position ``t``
(token ``input_ids[:, P + t]``) is therefore scored by the output at index ``P + t - 1``: the outputs at indices
``P - 1 … P + T - 2`` (the last index ``L - 1`` predicts a token beyond the rollout and is dropped).

:func:`response_hidden` returns the final hidden states at those indices and :func:`lm_head_logits` maps a chunk
of them to logits, so callers can take ``log_softmax`` chunk by chunk and never hold ``[B, T, V]`` at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from tropd.objectives.head import LMHead

if TYPE_CHECKING:  # annotations only: transformers loads when a model does (--help-config stays light)
    from transformers import PreTrainedModel


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` position ids ``cumsum(mask) - 1`` (0 on left padding): positions count real tokens only."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _check_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int) -> None:
    if input_ids.dim() != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"input_ids and attention_mask must both be [B, L], got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    if not 1 <= response_start < input_ids.shape[1]:
        raise ValueError(
            f"response_start={response_start} must be in [1, L-1] with L={input_ids.shape[1]}: "
            "at least one prompt token and one response position"
        )


def response_hidden(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int
) -> torch.Tensor:
    """``[B, T, H]`` final (post-norm) hidden states at indices ``P - 1 … L - 2``: row ``t`` scores ``input_ids[:, P + t]``."""
    _check_layout(input_ids, attention_mask, response_start)
    base = getattr(model, model.base_model_prefix, model)
    out = base(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state[:, response_start - 1 : -1]


def lm_head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., V]`` for final hidden states ``[..., H]``: the model's LM head and its logit post-processing
    (soft-capping, scaling; :class:`tropd.objectives.head.LMHead`)."""
    return LMHead.of(model)(hidden)


def response_hidden_states(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int
) -> torch.Tensor:
    """``[B, T, H]`` final (post-norm) hidden states at the response positions, from one call of ``model`` itself
    (so a DDP wrapper's hooks and accelerate's autocast run), with logits for a single position only: the input
    of the fused loss (:class:`tropd.objectives.head.LMHead`). :func:`fused_head_supported` checks that this
    model's last ``hidden_states`` entry is the post-norm state its LM head reads."""
    out = _call(model, input_ids, attention_mask, response_start, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1][:, response_start - 1 : -1]


def _call(model, input_ids, attention_mask, response_start, **kwargs):
    """One call of ``model`` itself on the aligned layout (position ids from the mask, no cache)."""
    _check_layout(input_ids, attention_mask, response_start)
    with checkpointing_in_eval_mode(model):
        return model(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), use_cache=False, **kwargs)


@contextlib.contextmanager
def checkpointing_in_eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Let HF gradient checkpointing (:func:`enable_gradient_checkpointing`) work in eval mode: transformers
    checkpoints a decoder layer only when the layer is in training mode, and tropd runs the loss forward in eval
    mode (no dropout: it must be the network that sampled). Within, the layers with checkpointing on are marked
    training, they alone (their submodules, dropout included, stay in eval); with grad enabled, each then keeps
    only its input and recomputes its activations in backward (:func:`enable_gradient_checkpointing`)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    marked = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and not m.training]
    for m in marked:
        m.training = True
    try:
        yield
    finally:
        for m in marked:
            m.training = False


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Turn on HF gradient checkpointing (non-reentrant) for the loss forward: activations of ``model`` are kept at
    decoder-layer boundaries only and recomputed in backward. Raises ValueError if a decoder layer of this model
    applies dropout of its own once marked training (the loss forward would no longer be the sampling network)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; the older name before
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.tensor([[1, 2, 3, 4]], device=next(model.parameters()).device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            plain = model(input_ids=ids, use_cache=False).logits
            with checkpointing_in_eval_mode(model):
                marked = model(input_ids=ids, use_cache=False).logits
    finally:
        model.train(training)
    if not torch.equal(plain, marked):
        raise ValueError(f"model.gradient_checkpointing: {type(model).__name__}'s decoder layers change their output "
                         "in training mode (dropout of their own), which the loss forward must not; set "
                         "model.gradient_checkpointing=false")


@torch.no_grad()
def fused_head_supported(model: PreTrainedModel) -> bool:
    """Whether ``LMHead.of(model)(hidden_states[-1])`` reproduces the model's own logits (checked on 3 tokens)."""
    ids = torch.tensor([[1, 2, 3]], device=next(model.parameters()).device)
    training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=0)
        if not out.hidden_states:
            return False
        mine = LMHead.of(model)(out.hidden_states[-1]).float()
        return torch.allclose(mine, out.logits.float(), rtol=1e-4, atol=1e-4)
    finally:
        model.train(training)


def response_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``[B, T, V]`` float32 logits where ``[:, t]`` is the model's distribution for response token ``input_ids[:, P + t]``.

    Gradients flow when called with grad enabled. Without ``chunk_size`` this is one call of ``model`` itself
    (``logits_to_keep = T + 1``), so a DDP/FSDP wrapper's hooks and accelerate's autocast run; ``chunk_size``
    instead applies the LM head of the plain model to that many response positions at a time (bounds the head's
    temporaries, e.g. soft-capping); the result is the same.
    """
    if chunk_size is None:
        out = _call(model, input_ids, attention_mask, response_start,
                    logits_to_keep=input_ids.shape[1] - response_start + 1)
        return out.logits[:, :-1].float()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    hidden = response_hidden(model, input_ids, attention_mask, response_start)
    return torch.cat([lm_head_logits(model, h) for h in hidden.split(chunk_size, dim=1)], dim=1).float()
