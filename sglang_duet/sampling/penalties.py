"""Per-row logit penalties and the min_new_tokens ban, applied in place to one row of logits.

Order (vLLM's `apply_penalties`): repetition penalty first, then frequency, then presence.
- repetition (HF / CTRL style) over every token seen in prompt + output: a positive logit is
  divided by the penalty, a negative one multiplied, so penalty > 1 always lowers the token.
- frequency and presence (OpenAI style) over OUTPUT tokens only: subtract
  `frequency_penalty * count + presence_penalty * (count > 0)`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from sglang_duet.sampling_params import SamplingParams


MIN_REPETITION_PENALTY = 1e-30


def has_penalty(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )


def apply_penalties(row: Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> None:
    """Penalise one row [V] of logits in place."""
    dev = row.device
    # A penalty near 0 (1e-300 is valid input) would be 0 in float32: logits / 0 = inf, and inf - inf
    # NaN logprobs. Below MIN_REPETITION_PENALTY every realistic logit (|x| < 3e8) still divides to a
    # finite float32 with its order kept, so the effect (seen tokens first) is the same.
    rep = max(params.repetition_penalty, MIN_REPETITION_PENALTY)
    if rep != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(list(prompt_ids) + list(output_ids), dtype=torch.long, device=dev).unique()
        vals = row[seen]
        big = torch.finfo(row.dtype).max
        row[seen] = torch.where(vals > 0, vals / rep, vals * rep).clamp_(-big, big)
    freq, pres = params.frequency_penalty, params.presence_penalty
    if (freq != 0.0 or pres != 0.0) and output_ids:
        ids, counts = torch.tensor(output_ids, dtype=torch.long, device=dev).unique(return_counts=True)
        # ids are unique, so a gather/scatter pair is exact (no duplicate-index accumulation issue).
        row[ids] = row[ids] - (freq * counts.to(row.dtype) + pres)


def min_tokens_ban_active(params: SamplingParams, output_ids: list[int], eos_ids: list[int]) -> bool:
    return bool(eos_ids) and len(output_ids) < params.min_new_tokens


def ban_tokens(row: Tensor, token_ids: list[int]) -> None:
    """Make the given tokens unsampleable (and give them logprob -inf), in place."""
    # Ids past the logits' width (e.g. the caller sliced off vocab padding) cannot be sampled anyway.
    ids = [t for t in token_ids if 0 <= t < row.shape[-1]]
    if ids:
        row[torch.tensor(ids, dtype=torch.long, device=row.device)] = float("-inf")
