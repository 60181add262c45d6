"""The rollout batch every sampler returns, how it is assembled from per-row pieces, and its log statistics.

Layout (B rows, P = longest prompt, T = longest response of the batch)::

    input_ids       [B, P+T]   pad … pad  prompt_i | y_0 … y_{n_i−1}  pad … pad
    attention_mask  [B, P+T]   0  …  0    1 …   1  | 1   …   1        0  …  0
                               (left padding)        response_start = P  (right padding)

Position ``t`` of every ``[B, T]`` tensor is the response token ``y_t`` at column ``P + t`` of ``input_ids``.
Prompt and padding positions never carry loss: ``loss_mask[i, t] = t < response_lengths[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import torch

from tropd.forward import position_ids_from_mask


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists to a common length.

    Returns ``input_ids`` [B, P] (int64) and ``attention_mask`` [B, P] (int64, 1 on real tokens), where P is the
    longest prompt. Every prompt must be non-empty (a causal LM needs a context to predict the first token from).
    """
    if len(prompts) == 0:
        raise ValueError("left_pad: no prompts given")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"left_pad: prompt {lengths.index(0)} is empty; every prompt needs at least one token")
    width = max(lengths)
    ids = torch.full((len(prompts), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@dataclass
class RolloutRow:
    """One row's response, before batching (internal assembly unit of the samplers).

    Attributes:
        tokens: ``[n]`` int64 response tokens (EOS included when the row ended with it).
        behavior_logprobs: ``[n]`` float32 log-prob of each token under the policy that sampled it.
        guidance_length: number of leading tokens written by the teacher and tagged as teacher positions.
        eos: the response ended with an EOS token.
        truncated: the response hit the length budget without EOS.
        teacher_row: the whole response was sampled by the teacher (GKD teacher rows, ``"teacher"`` rollouts).
        blend_beta: ``[n]`` float32 TRB β* used at each token, or None.
    """

    tokens: torch.Tensor
    behavior_logprobs: torch.Tensor
    guidance_length: int = 0
    eos: bool = False
    truncated: bool = False
    teacher_row: bool = False
    blend_beta: torch.Tensor | None = None


@dataclass
class RolloutBatch:
    """A batch of sampled rollouts ``prompt ++ response`` with everything the loss needs about how they were drawn.

    Attributes:
        input_ids: ``[B, P+T]`` int64: left-padded prompts, then responses right-padded with the pad token.
        attention_mask: ``[B, P+T]`` int64: 1 on prompt and response tokens, 0 on padding.
        response_start: P, the column where responses start.
        tokens: ``[B, T]`` int64 response tokens ``y_t`` (pad after the end of a row).
        behavior_logprobs: ``[B, T]`` float32 ``b_t = log π_beh(y_t | h_t)``: log-prob under the exact distribution
            the token was drawn from (after temperature and top-p, or the TRB blend; the teacher's own for
            teacher-written tokens); 0 on padding.
        loss_mask: ``[B, T]`` bool: response tokens up to and including EOS.
        teacher_token_mask: ``[B, T]`` bool: teacher-written guidance-prefix positions (docs/method.md §4.2; every response
            position of a ``"teacher"`` rollout). Subset of ``loss_mask``.
        eos: ``[B]`` bool: the response ended with an EOS token.
        truncated: ``[B]`` bool: the response hit ``max_new_tokens`` without EOS.
        response_lengths: ``[B]`` int64 number of response tokens (= ``loss_mask.sum(1)``).
        prompt_lengths: ``[B]`` int64 unpadded prompt lengths.
        guidance_lengths: ``[B]`` int64 number of teacher-tagged prefix tokens (= ``teacher_token_mask.sum(1)``).
        teacher_rows: ``[B]`` bool: the whole response was sampled by the teacher (not tagged as teacher positions
            for GKD, whose loss does not depend on the source).
        blend_beta: ``[B, T]`` float32 TRB β* at each sampled position (0 on padding), or None when not blended.
        blend_beta_per_step: ``[T]`` float32 mean β* over the rows still decoding at each step, or None.
        info: scalar diagnostics of the draw (e.g. ``guidance_cap``, ``trb_eps``, ``teacher_generated_tokens``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_start: int
    tokens: torch.Tensor
    behavior_logprobs: torch.Tensor
    loss_mask: torch.Tensor
    teacher_token_mask: torch.Tensor
    eos: torch.Tensor
    truncated: torch.Tensor
    response_lengths: torch.Tensor
    prompt_lengths: torch.Tensor
    guidance_lengths: torch.Tensor
    teacher_rows: torch.Tensor
    blend_beta: torch.Tensor | None = None
    blend_beta_per_step: torch.Tensor | None = None
    info: dict[str, float] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_response_tokens(self) -> int:
        """Loss-bearing response tokens in the batch (student- and teacher-written)."""
        return int(self.response_lengths.sum().item())

    def position_ids(self) -> torch.Tensor:
        """``[B, P+T]`` position ids consistent with the left padding (for scoring ``input_ids`` in one pass)."""
        return position_ids_from_mask(self.attention_mask)

    def rows(self, start: int, stop: int) -> "RolloutBatch":
        """Rows ``start:stop`` as a batch of their own (views, same padding layout); ``info`` is shared."""
        per_row = {f.name: getattr(self, f.name)[start:stop] for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor) and f.name != "blend_beta_per_step"}
        return replace(self, **per_row)

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """A copy with every tensor moved to ``device``."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def stats(self) -> dict[str, float]:
        """Scalar statistics for logging; see :func:`rollout_stats`."""
        return rollout_stats(self)

    @classmethod
    def from_rows(cls, prompts: Sequence[Sequence[int]], rows: Sequence[RolloutRow], pad_token_id: int,
                  info: dict[str, float] | None = None, device: torch.device | str | None = None,
                  ) -> "RolloutBatch":
        """Assemble a batch from prompts (token-id lists) and one :class:`RolloutRow` per prompt, in order."""
        if len(prompts) != len(rows):
            raise ValueError(f"RolloutBatch.from_rows: {len(prompts)} prompts but {len(rows)} rows")
        prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
        b, p = prompt_ids.shape
        lengths = torch.tensor([int(r.tokens.numel()) for r in rows], dtype=torch.long)
        t_max = int(lengths.max().item()) if b else 0
        tokens = torch.full((b, t_max), int(pad_token_id), dtype=torch.long)
        logp = torch.zeros((b, t_max), dtype=torch.float32)
        use_beta = any(r.blend_beta is not None for r in rows)
        beta = torch.zeros((b, t_max), dtype=torch.float32) if use_beta else None
        for i, r in enumerate(rows):
            n = int(lengths[i])
            if not 0 <= r.guidance_length <= n:
                raise ValueError(f"row {i}: guidance_length {r.guidance_length} outside [0, {n}]")
            tokens[i, :n] = r.tokens.detach().to("cpu", torch.long)
            logp[i, :n] = r.behavior_logprobs.detach().to("cpu", torch.float32)
            if beta is not None and r.blend_beta is not None:
                beta[i, :n] = r.blend_beta.detach().to("cpu", torch.float32)
        steps = torch.arange(t_max)
        loss_mask = steps[None, :] < lengths[:, None]
        guidance = torch.tensor([r.guidance_length for r in rows], dtype=torch.long)
        teacher_mask = steps[None, :] < guidance[:, None]
        beta_per_step = None
        if beta is not None:
            active = loss_mask.float().sum(0)
            beta_per_step = (beta * loss_mask).sum(0) / active.clamp(min=1.0)
        batch = cls(
            input_ids=torch.cat([prompt_ids, tokens], dim=1),
            attention_mask=torch.cat([prompt_mask, loss_mask.long()], dim=1),
            response_start=p,
            tokens=tokens,
            behavior_logprobs=logp,
            loss_mask=loss_mask,
            teacher_token_mask=teacher_mask,
            eos=torch.tensor([bool(r.eos) for r in rows], dtype=torch.bool),
            truncated=torch.tensor([bool(r.truncated) for r in rows], dtype=torch.bool),
            response_lengths=lengths,
            prompt_lengths=prompt_mask.sum(1),
            guidance_lengths=guidance,
            teacher_rows=torch.tensor([bool(r.teacher_row) for r in rows], dtype=torch.bool),
            blend_beta=beta,
            blend_beta_per_step=beta_per_step,
            info=dict(info or {}),
        )
        return batch if device is None else batch.to(device)


SUMMED_INFO = frozenset({"teacher_generated_tokens", "vllm_sync_s"})
"""``info`` keys that are counts (summed over micro-batches); every other key is averaged."""


def rollout_stats(batches: RolloutBatch | Sequence[RolloutBatch]) -> dict[str, float]:
    """Scalar rollout statistics for logging (docs/method.md §7), over one batch or all micro-batches of a step.

    Keys (rates and means over all rows / tokens of all the batches):
        ``response_len_mean``: mean response length in tokens (teacher prefix included);
        ``eos_rate`` / ``truncation_rate``: share of rows that ended with EOS / hit the length budget;
        ``guided_share``: share of rows with a teacher prefix (``guidance_lengths > 0``);
        ``guidance_len_mean``: mean prefix length over the guided rows (0 when none);
        ``generated_tokens``: loss-bearing response tokens;
        ``teacher_tokens``: of those, how many the teacher sampled (prefixes and teacher rows);
        ``teacher_row_share``: share of rows written wholly by the teacher;
        ``blend_beta_mean``: mean TRB β* over sampled positions (only when some batch was blended);
        plus the ``info`` entries: summed for counts (:data:`SUMMED_INFO`), averaged over batches otherwise.
    """
    group = [batches] if isinstance(batches, RolloutBatch) else list(batches)
    rows = sum(b.batch_size for b in group)
    denom = max(rows, 1)
    lengths = sum(float(b.response_lengths.sum().item()) for b in group)
    guided_rows = sum(int((b.guidance_lengths > 0).sum().item()) for b in group)
    guided_len = sum(float(b.guidance_lengths.sum().item()) for b in group)
    teacher_tokens = sum(float((b.guidance_lengths.sum() + (b.response_lengths - b.guidance_lengths)[
        b.teacher_rows].sum()).item()) for b in group)
    out: dict[str, float] = {
        "response_len_mean": lengths / denom,
        "eos_rate": sum(float(b.eos.sum().item()) for b in group) / denom,
        "truncation_rate": sum(float(b.truncated.sum().item()) for b in group) / denom,
        "guided_share": guided_rows / denom,
        "guidance_len_mean": guided_len / guided_rows if guided_rows else 0.0,
        "generated_tokens": lengths,
        "teacher_tokens": teacher_tokens,
        "teacher_row_share": sum(float(b.teacher_rows.sum().item()) for b in group) / denom,
    }
    blended = [b for b in group if b.blend_beta is not None]
    if blended:
        beta_sum = sum(float((b.blend_beta * b.loss_mask).sum().item()) for b in blended)
        beta_n = sum(float(b.loss_mask.sum().item()) for b in blended)
        out["blend_beta_mean"] = beta_sum / max(beta_n, 1.0)
    keys = sorted({k for b in group for k in b.info})
    for k in keys:
        values = [float(b.info[k]) for b in group if k in b.info]
        out[k] = sum(values) if k in SUMMED_INFO else sum(values) / len(values)
    return out
