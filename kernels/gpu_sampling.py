"""Graph-safe sampling on the device: the CPU sampler's semantics with per-row state in tensors.

`Sampler` (sglang_duet/sampling/sampler.py) takes Python rows and syncs to the host (`tolist`).
Inside a captured CUDA graph nothing may depend on host values, so here every per-row parameter
(temperature, top-k, top-p, min-p, greedy flag, noise key) lives in a device tensor that the
caller refreshes outside the graph, and the result stays on the device as a [B] int64 tensor.
The only host sync of a decode step is the caller's one read of those ids.

Semantics (same order as the CPU sampler, without penalties / min_new_tokens / logprobs, which
the executor routes to the CPU-semantics `Sampler` instead):
  greedy rows: argmax of the logits;
  other rows:  divide by temperature, top-k, top-p on the top-k-renormalised mass, min-p, then
               the exponential race argmax(x - log E) with E from `race_log_noise`, the counter-
               based noise the CPU sampler uses too.
Agreement with the CPU sampler on the same logits: greedy is bit-identical (argmax picks the first
maximum on both). Seeded draws use the identical noise bits (integer hash, logs in float64 rounded
once), so tokens match bit-for-bit on CPU tensors and, on a GPU, whenever the filters keep the same
set: top-p and min-p compare softmax / cumsum values whose last-ulp rounding may differ between
devices, which can flip a token sitting exactly at the nucleus edge. Rows without those filters
match exactly.

Always-on filters cost a full-vocabulary sort per step; `sample(..., filters=False)` skips them
for batches where no row uses top-k/top-p/min-p (the graph runner captures both variants).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sglang_duet.sampling.sampler import noise_key_halves, race_log_noise

_NEG_INF = float("-inf")


@dataclass
class SamplingTensors:
    """Per-row sampling parameters as tensors (static buffers when used inside a CUDA graph)."""

    temperature: Tensor  # [B] float32; 1.0 on greedy rows (never divides by 0)
    top_k: Tensor  # [B] int64 in [1, V]; V = no top-k
    top_p: Tensor  # [B] float32; +inf = no top-p (as the CPU sampler, so round-off cannot cut)
    min_p: Tensor  # [B] float32; 0 = no min-p
    is_greedy: Tensor  # [B] bool
    key_lo: Tensor  # [B] int64: low 32 bits of step_seed(seed, step)
    key_hi: Tensor  # [B] int64: high 32 bits

    @staticmethod
    def host_rows(params: Sequence, seeds: Sequence[int], steps: Sequence[int], vocab: int) -> list[list[float]]:
        """The per-row values as host lists, in field order (for one pinned copy into static buffers)."""
        temp, top_k, top_p, min_p, greedy, lo, hi = [], [], [], [], [], [], []
        for p, seed, step in zip(params, seeds, steps):
            g = bool(p.is_greedy)
            temp.append(1.0 if g else float(p.temperature))
            top_k.append(p.top_k if 0 < p.top_k < vocab else vocab)
            top_p.append(p.top_p if p.top_p < 1.0 else float("inf"))
            min_p.append(float(p.min_p))
            greedy.append(g)
            k0, k1 = noise_key_halves(seed, step)
            lo.append(k0)
            hi.append(k1)
        return [temp, top_k, top_p, min_p, greedy, lo, hi]

    @classmethod
    def build(cls, params: Sequence, seeds: Sequence[int], steps: Sequence[int], vocab: int,
              device: torch.device | str) -> "SamplingTensors":
        t, k, p, m, g, lo, hi = cls.host_rows(params, seeds, steps, vocab)
        dev = torch.device(device)
        return cls(
            temperature=torch.tensor(t, dtype=torch.float32, device=dev),
            top_k=torch.tensor(k, dtype=torch.int64, device=dev),
            top_p=torch.tensor(p, dtype=torch.float32, device=dev),
            min_p=torch.tensor(m, dtype=torch.float32, device=dev),
            is_greedy=torch.tensor(g, dtype=torch.bool, device=dev),
            key_lo=torch.tensor(lo, dtype=torch.int64, device=dev),
            key_hi=torch.tensor(hi, dtype=torch.int64, device=dev),
        )

    @classmethod
    def empty(cls, batch: int, device: torch.device | str) -> "SamplingTensors":
        """Static buffers for a graph bucket: greedy rows with neutral parameters."""
        dev = torch.device(device)
        return cls(
            temperature=torch.ones(batch, dtype=torch.float32, device=dev),
            top_k=torch.ones(batch, dtype=torch.int64, device=dev),
            top_p=torch.full((batch,), float("inf"), dtype=torch.float32, device=dev),
            min_p=torch.zeros(batch, dtype=torch.float32, device=dev),
            is_greedy=torch.ones(batch, dtype=torch.bool, device=dev),
            key_lo=torch.zeros(batch, dtype=torch.int64, device=dev),
            key_hi=torch.zeros(batch, dtype=torch.int64, device=dev),
        )

    def copy_rows_(self, src: "SamplingTensors", vocab: int) -> None:
        """Fill the first n rows from `src` (n = its length); rows past n become neutral greedy
        rows (padding of a CUDA-graph bucket). Device-to-device copies only: graph-safe inputs."""
        n = src.temperature.shape[0]
        for name in ("temperature", "top_k", "top_p", "min_p", "is_greedy", "key_lo", "key_hi"):
            getattr(self, name)[:n].copy_(getattr(src, name), non_blocking=True)
        if n < self.temperature.shape[0]:
            self.temperature[n:].fill_(1.0)
            self.top_k[n:].fill_(vocab)
            self.top_p[n:].fill_(float("inf"))
            self.min_p[n:].fill_(0.0)
            self.is_greedy[n:].fill_(True)


def needs_filters(params: Sequence, vocab: int) -> bool:
    """Whether any sampled row uses top-k, top-p or min-p (else the cheap variant is exact)."""
    return any(not p.is_greedy and ((0 < p.top_k < vocab) or p.top_p < 1.0 or p.min_p > 0.0) for p in params)


def greedy(logits: Tensor, vocab: int | None = None) -> Tensor:
    """[B] int64 argmax over the first `vocab` columns (first maximum on ties, as the CPU sampler)."""
    if vocab is not None:
        logits = logits[:, :vocab]
    return logits.float().argmax(dim=-1)


def _apply_filters(x: Tensor, st: SamplingTensors) -> Tensor:
    """Top-k, then top-p on the renormalised mass, then min-p: masked entries become -inf.

    Same rules as the CPU sampler's _top_k_top_p / _top_k_only / _min_p with per-row tensors:
    neutral values (k = V, p = +inf, min_p = 0) mask nothing, so every row can go through it.
    """
    S, V = x.shape
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    kth = sorted_x.gather(1, (st.top_k.clamp(1, V) - 1).unsqueeze(1))
    sorted_x = sorted_x.masked_fill(sorted_x < kth, _NEG_INF)
    probs = sorted_x.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) >= st.top_p.unsqueeze(1)
    drop[:, 0] = False  # the best token always survives
    sorted_x = sorted_x.masked_fill(drop, _NEG_INF)
    x = torch.empty_like(x).scatter_(1, order, sorted_x)
    probs = x.softmax(dim=-1)
    return x.masked_fill(probs < probs.max(dim=-1, keepdim=True).values * st.min_p.unsqueeze(1), _NEG_INF)


def sample(logits: Tensor, st: SamplingTensors, vocab: int | None = None, filters: bool = True) -> Tensor:
    """[B] int64 token ids, computed on logits' device with no host sync (graph-capturable).

    filters=False skips top-k/top-p/min-p; exact only when no row uses them (`needs_filters`).
    """
    if vocab is not None:
        logits = logits[:, :vocab]
    x = logits.float()
    best = x.argmax(dim=-1)  # greedy rows
    y = x / st.temperature.unsqueeze(1)
    if filters:
        y = _apply_filters(y, st)
    drawn = (y - race_log_noise(st.key_lo, st.key_hi, y.shape[1])).argmax(dim=-1)
    return torch.where(st.is_greedy, best, drawn)
