"""One-token-per-row sampler over a [B, V] logits batch.

Order of operations (SGLang / vLLM):
  1. penalties (repetition over prompt+output, then frequency, presence over output) — see penalties.py
  2. min_new_tokens: ban the row's eos/stop ids while fewer than min_new_tokens tokens were generated
  2b. structured output: rows with a grammar get every token it does not allow next set to -inf
     (xgrammar's token bitmask, applied on the logits' device)
  3. logprobs are taken HERE: log_softmax of the logits after 1-2 but before temperature and
     top-k/top-p/min-p (what SGLang returns; vLLM's default "raw" logprobs additionally skip the
     penalties). The min_new_tokens ban is part of this (SGLang implements it as a penalizer), so a
     banned token reports -inf.
  4. greedy rows (params.is_greedy): argmax. With no penalties/ban this is argmax of the raw logits,
     bit-identical to transformers' greedy search.
  5. sampled rows: divide by temperature, top-k, then top-p on the top-k-renormalised distribution
     (vLLM/HF order), then min-p (relative to the max prob, so renormalisation does not matter),
     then draw with the exponential race: argmax(log p - log E), E ~ Exp(1) i.i.d. per vocab entry,
     which is an exact sample from p.

Reproducibility: the noise E of a row is a pure function of (step_seed(seed, step), vocab index),
step = len(output_ids): a counter-based hash computed with integer tensor ops (`race_log_noise`), not
a stateful generator. It depends on nothing else — not on the row's position, the other rows, the
batch size, the device, or whether the request was retracted and recomputed — so a request with a
fixed seed yields the same tokens however it is batched (up to float ties in the filters), and the
graph-safe GPU sampler (sglang_duet.kernels.gpu_sampling) draws the very same noise on the device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sglang_duet.constrained.grammar import apply_grammar_masks
from sglang_duet.sampling.penalties import apply_penalties, ban_tokens, has_penalty, min_tokens_ban_active
from sglang_duet.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """Everything the sampler needs about one row of the batch."""

    params: SamplingParams
    seed: int  # the request's seed (the engine draws one when the user gave none)
    prompt_ids: list[int]
    output_ids: list[int]  # tokens generated so far: penalties, min_new_tokens, and the noise step
    # Tokens that end the request (model eos + stop_token_ids); all of them are banned while
    # len(output_ids) < min_new_tokens. The caller decides what goes here (SGLang bans eos even
    # under ignore_eos, which is harmless: eos does not end such a request anyway).
    eos_ids: list[int] = field(default_factory=list)
    # Structured output: the request's grammar matcher (constrained/grammar.py GrammarState): the
    # row's logits are masked to what it allows next, before logprobs and sampling. The caller
    # advances it with the token sampled.
    grammar: object | None = None


@dataclass
class SampleOutput:
    token_ids: list[int]
    # Per row: None unless params.logprobs, else
    # {'token_id': int, 'logprob': float, 'top': [(token_id, logprob), ...] (top_logprobs long, best first)}
    logprobs: list[dict | None]


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """Noise key for one (request seed, decode step); any Python int seed is accepted."""
    return _mix64(_mix64(seed & _MASK64) ^ (step & _MASK64))


# ---- counter-based noise, shared with the GPU sampler ------------------------------------------
# Everything below runs on int64 tensors holding values in [0, 2^32) and never lets a product reach
# 2^63, so it is exact (no signed overflow) and gives the same bits on every device and backend.
_M32 = 0xFFFFFFFF


def noise_key_halves(seed: int, step: int) -> tuple[int, int]:
    """step_seed split into two 32-bit halves (lo, hi): what a device tensor of keys holds."""
    k = step_seed(seed, step)
    return k & _M32, k >> 32


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32): split c in 16-bit halves so products stay < 2^48."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def hash32(x: Tensor) -> Tensor:
    """lowbias32 (xorshift-multiply, a bijection of [0, 2^32) with good avalanche)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def race_log_noise(key_lo: Tensor, key_hi: Tensor, vocab: int) -> Tensor:
    """log E for E ~ Exp(1), one per (row, vocab entry): [S, vocab] float32.

    key_lo/key_hi: [S] int64 halves of step_seed (noise_key_halves). The uniform u has 23 random
    bits and is exact in float32: u = (2m + 1) / 2^24, so 0 < u < 1 and log E = log(-log u) is
    finite. Both logs are taken in float64 and rounded once to float32 so that CPU and CUDA libm
    differences (an ulp in float32) do not change a draw.
    """
    j = torch.arange(vocab, dtype=torch.int64, device=key_lo.device)
    h = hash32(hash32(j.unsqueeze(0) ^ key_lo.unsqueeze(1)) ^ key_hi.unsqueeze(1))
    u = ((h >> 9) * 2 + 1).to(torch.float64) * (2.0 ** -24)
    return torch.log(-torch.log(u)).to(torch.float32)


class Sampler:
    """Stateless (the noise is counter-based), so one instance may serve any number of batches.

    vocab_size: when set, logits columns past it (vocabulary padding of the LM head) are ignored.
    """

    def __init__(self, vocab_size: int | None = None):
        self.vocab_size = vocab_size

    def __call__(self, logits: Tensor, rows: list[SamplingRow]) -> SampleOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [B, V] with B == len(rows) ({len(rows)}), got {tuple(logits.shape)}.")
        if not rows:
            return SampleOutput([], [])
        if self.vocab_size is not None:
            logits = logits[:, : self.vocab_size]
        if logits.dtype != torch.float32:
            logits = logits.float()

        logits = self._process(logits, rows)
        greedy = [r.params.is_greedy for r in rows]

        if all(greedy):  # hot path: one vectorised argmax
            token_ids = logits.argmax(dim=-1).tolist()
        else:
            token_ids = [0] * len(rows)
            g_idx = [i for i, g in enumerate(greedy) if g]
            s_idx = [i for i, g in enumerate(greedy) if not g]
            if g_idx:
                picked = logits[self._index(g_idx, logits)].argmax(dim=-1).tolist()
                for i, t in zip(g_idx, picked):
                    token_ids[i] = t
            # Advanced indexing copies, so the temperature/filters below leave `logits` untouched
            # for the logprobs.
            picked = self._sample(logits[self._index(s_idx, logits)], [rows[i] for i in s_idx])
            for i, t in zip(s_idx, picked):
                token_ids[i] = t

        return SampleOutput(token_ids, self._logprobs(logits, rows, token_ids))

    # ---- steps ------------------------------------------------------------------------------

    @staticmethod
    def _index(idx: list[int], like: Tensor) -> Tensor:
        return torch.tensor(idx, dtype=torch.long, device=like.device)

    @staticmethod
    def _process(logits: Tensor, rows: list[SamplingRow]) -> Tensor:
        """Penalties and the min_new_tokens ban; clones only when some row needs them."""
        todo = [
            (i, has_penalty(r.params), min_tokens_ban_active(r.params, r.output_ids, r.eos_ids))
            for i, r in enumerate(rows)
        ]
        todo = [t for t in todo if t[1] or t[2]]
        grammars = [r.grammar for r in rows]
        constrained = any(g is not None for g in grammars)
        if not todo and not constrained:
            return logits
        logits = logits.clone()  # never mutate the caller's tensor
        for i, pen, ban in todo:
            r = rows[i]
            if pen:
                apply_penalties(logits[i], r.params, r.prompt_ids, r.output_ids)
            if ban:
                ban_tokens(logits[i], r.eos_ids)
        if constrained:
            apply_grammar_masks(logits, grammars)
        return logits

    def _sample(self, x: Tensor, rows: list[SamplingRow]) -> list[int]:
        """x: [S, V] penalised logits of the sampled rows (a private copy, modified in place)."""
        S, V = x.shape
        dev = x.device
        temps = torch.tensor([r.params.temperature for r in rows], dtype=x.dtype, device=dev)
        x.div_(temps.unsqueeze(1))

        ks = [r.params.top_k if 0 < r.params.top_k < V else V for r in rows]
        ps = [r.params.top_p for r in rows]
        if any(p < 1.0 for p in ps):
            x = _top_k_top_p(x, ks, ps)
        elif any(k < V for k in ks):
            _top_k_only(x, ks)
        min_ps = [r.params.min_p for r in rows]
        if any(m > 0.0 for m in min_ps):
            _min_p(x, min_ps)

        # Noise is a pure function of each row's (seed, step) key: batched, and device-independent.
        keys = [noise_key_halves(r.seed, len(r.output_ids)) for r in rows]
        key_lo = torch.tensor([k[0] for k in keys], dtype=torch.int64, device=dev)
        key_hi = torch.tensor([k[1] for k in keys], dtype=torch.int64, device=dev)
        noise = race_log_noise(key_lo, key_hi, V)
        return (x - noise).argmax(dim=-1).tolist()

    @staticmethod
    def _logprobs(logits: Tensor, rows: list[SamplingRow], token_ids: list[int]) -> list[dict | None]:
        out: list[dict | None] = [None] * len(rows)
        idx = [i for i, r in enumerate(rows) if r.params.logprobs]
        if not idx:
            return out
        sel = torch.tensor(idx, dtype=torch.long, device=logits.device)
        lp = logits[sel].log_softmax(dim=-1)
        chosen = lp.gather(1, torch.tensor([[token_ids[i]] for i in idx], device=logits.device)).squeeze(1).tolist()
        k = min(max(rows[i].params.top_logprobs for i in idx), lp.shape[1])
        top_v: list[list[float]] = [[] for _ in idx]
        top_i: list[list[int]] = [[] for _ in idx]
        if k > 0:
            v, ti = lp.topk(k, dim=-1)
            top_v, top_i = v.tolist(), ti.tolist()
        for j, i in enumerate(idx):
            n = rows[i].params.top_logprobs
            top = list(zip(top_i[j][:n], top_v[j][:n]))
            out[i] = {"token_id": token_ids[i], "logprob": chosen[j], "top": top}
        return out


def _top_k_top_p(x: Tensor, ks: list[int], ps: list[float]) -> Tensor:
    """Mask (to -inf) everything outside top-k and then outside the top-p nucleus of what is left."""
    S, V = x.shape
    dev = x.device
    # Stable sort: equal logits keep vocab order, so the cut among ties is deterministic.
    sorted_x, order = x.sort(dim=-1, descending=True, stable=True)
    if any(k < V for k in ks):
        # Same rule as _top_k_only (keep logits >= the k-th largest, ties kept), so whether top_p
        # is also set never changes what top-k keeps.
        kth = sorted_x.gather(1, torch.tensor(ks, dtype=torch.long, device=dev).unsqueeze(1) - 1)
        sorted_x.masked_fill_(sorted_x < kth, _NEG_INF)
    probs = sorted_x.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: token i stays iff the mass strictly before
    # it is < top_p. Rows with top_p == 1 get +inf so float round-off in cumsum cannot cut their tail.
    p_t = torch.tensor([p if p < 1.0 else float("inf") for p in ps], dtype=x.dtype, device=dev).unsqueeze(1)
    drop = (probs.cumsum(dim=-1) - probs) >= p_t
    drop[:, 0] = False  # the best token always survives
    sorted_x.masked_fill_(drop, _NEG_INF)
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def _top_k_only(x: Tensor, ks: list[int]) -> None:
    """Top-k without a sort of the whole vocabulary: keep logits >= the k-th largest (ties kept)."""
    V = x.shape[1]
    k_max = max(k for k in ks if k < V)  # rows without top-k (k == V) must not force a full sort
    top = x.topk(k_max, dim=-1).values  # [S, k_max], descending
    k_t = torch.tensor([min(k, k_max) - 1 for k in ks], dtype=torch.long, device=x.device).unsqueeze(1)
    kth = top.gather(1, k_t)
    kth[torch.tensor([k >= V for k in ks], device=x.device)] = _NEG_INF
    x.masked_fill_(x < kth, _NEG_INF)


def _min_p(x: Tensor, min_ps: list[float]) -> None:
    """Drop tokens whose prob is below min_p times the row's max prob (in place)."""
    probs = x.softmax(dim=-1)
    m = torch.tensor(min_ps, dtype=x.dtype, device=x.device).unsqueeze(1)
    x.masked_fill_(probs < probs.max(dim=-1, keepdim=True).values * m, _NEG_INF)
