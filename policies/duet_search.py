"""The data of one duet search (policies/duet.py): the ready decodes summarised, the FCFS chunk
list cut at every budget, and every candidate priced as parallel arrays."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np

from sglang_duet.policies.base import LaneKind, PrefillChunk, Priced, SchedulerView


@dataclass
class Candidate:
    """One way to use the GPU next, priced (for tests and logs; the search works on arrays)."""

    mode: str  # "aggregated" | "split"
    budget: int
    prefill_tokens: int
    decode_sms: int | None = None  # split only
    k: int = 1
    step_ms: float = 0.0  # aggregated: the step; split: the prefill lane's launch
    decode_ms: float = 0.0  # split: all k decode steps (aggregated: the step)
    first_ms: float = 0.0  # the first gap a ready decode sees
    slowest_ms: float = 0.0  # the longest decode step until the lanes meet again
    joiner_ms: float = 0.0  # split: first gap of a request that joins when its prefill ends
    r_p: float = 0.0
    pace_ms: float = 0.0  # mean decode step
    score: float = -math.inf
    feasible: bool = False
    prefill: list[PrefillChunk] = field(default_factory=list)


@dataclass
class Decodes:
    """The ready decodes as the search needs them. Their ids are read off `reqs` (and `more`)
    only when a plan launches them: the decode lane's projection never does, and at batch 256
    reading every request's id is a good part of a plan (cold memory)."""

    reqs: list  # requests (anything with a rid)
    cached: int  # sum of cached tokens
    longest: int  # the most tokens any of them may still emit, counted up to k_max (all a look-ahead needs)
    waited_ms: float  # the longest wait since a last token
    more: list = field(default_factory=list)  # further decodes (a busy decode lane's work, projected)

    @property
    def n(self) -> int:
        return len(self.reqs) + len(self.more)

    @property
    def ids(self) -> list[str]:
        return [r.rid for r in self.reqs] + [w.rid for w in self.more]


class Prefix:
    """An FCFS chunk list and its summaries cut at any token budget (what select_prefills gives
    for a smaller budget is a prefix of it, the last chunk shortened)."""

    def __init__(self, chunks: list[PrefillChunk], remaining: dict[str, int]):
        self.chunks = chunks
        # prefix sums in plain Python (a handful of chunks), one array each
        cumL, prefA, prefK, prefC, starts = [], [0.0], [0.0], [0.0], []
        L = A = Kk = C = 0.0
        for c in chunks:
            s, n = c.start, c.length
            L += n
            A += n * (s + (n + 1) / 2)
            Kk += s + n
            C += n >= remaining.get(c.rid, 0)
            cumL.append(L)
            prefA.append(A)
            prefK.append(Kk)
            prefC.append(C)
            starts.append(float(s))
        starts.append(0.0)  # start of "the chunk after the last"
        # one array build for the five (n + 1)-long tables (plan() overhead is numpy call count)
        cumL0 = [0.0] + cumL  # tokens before chunk i
        self._table = np.array([prefA, prefK, prefC, starts, cumL0])  # rows read by index (not unpacked: slower)
        self.cumL = self._table[4, 1:]
        self._cumL, self._prefC = cumL, prefC  # the Python lists, for `completes`
        self.total = L

    def cut(self, budgets: np.ndarray, nonnegative: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(X rows [T, R, A, K] per budget, whether the cut completes a request); `nonnegative`:
        the caller's budgets are >= 0 already."""
        b = np.minimum(budgets if nonnegative else np.maximum(budgets, 0.0), self.total)
        full = self.cumL.searchsorted(b, side="right")  # chunks wholly inside
        at = self._table.take(full, axis=1)  # prefix sums A, K, C, the chunk's start, tokens before it
        s = at[3]
        n = b - at[4]  # tokens of the partly taken chunk
        part = n > 0
        # (s + n) * part: s + n where a chunk is partly taken, else 0 (both are >= 0)
        X = np.array([b, full + part, at[0] + n * (s + (n + 1) / 2), at[1] + (s + n) * part]).T
        return X, at[2] > 0

    def completes(self, budget: float) -> bool:
        """Whether the cut at `budget` tokens completes a request (`cut`'s second answer, for one
        budget, without numpy)."""
        b = min(max(budget, 0.0), self.total)
        return self._prefC[bisect.bisect_right(self._cumL, b)] > 0

    def take(self, budget: float) -> list[PrefillChunk]:
        out, left = [], int(budget)
        for c in self.chunks:
            if left <= 0:
                break
            n = min(c.length, left)
            out.append(c if n == c.length else PrefillChunk(c.rid, c.start, n))
            left -= n
        return out


@dataclass
class Search:
    """Every candidate of one plan as parallel arrays (aggregated ones first, by budget; then the
    splits by S_d, then budget)."""

    split: np.ndarray
    agg_budgets: np.ndarray
    split_budgets: np.ndarray
    grid: np.ndarray
    tau: float  # the decode pace target the scores used
    tokens: np.ndarray
    k: np.ndarray
    step: np.ndarray
    decode: np.ndarray
    first: np.ndarray
    slowest: np.ndarray
    joiner: np.ndarray
    feasible: np.ndarray
    score: np.ndarray
    prefix: Prefix | None
    dec: Decodes
    priced: Priced  # the rows: aggregated steps, decode steps per (S_d, step), prefills per (S_d, budget)
    cal: dict  # lane -> the (a, b) the rows were priced with
    _best: list = field(default_factory=list, init=False, repr=False, compare=False)  # best(), once known

    def __len__(self) -> int:
        return len(self.score)

    @property
    def budget(self) -> np.ndarray:
        return np.concatenate([self.agg_budgets, np.tile(self.split_budgets, len(self.grid))])

    @property
    def sd(self) -> np.ndarray:
        """Decode SMs per candidate (0 for aggregated)."""
        return np.concatenate([np.zeros(len(self.agg_budgets), dtype=int), np.repeat(self.grid, len(self.split_budgets))])

    def budget_of(self, i: int) -> int:
        na = len(self.agg_budgets)
        return int(self.agg_budgets[i] if i < na else self.split_budgets[(i - na) % len(self.split_budgets)])

    def sd_of(self, i: int) -> int:
        na = len(self.agg_budgets)
        return 0 if i < na else int(self.grid[(i - na) // len(self.split_budgets)])

    def best(self, mask: np.ndarray | None = None, lo: int = 0) -> int | None:
        """Index of the highest score among `mask` (default: the feasible); ties (within 1e-9) to
        the lowest index. A mask shorter than the candidates covers those from `lo` on."""
        if mask is None:
            if not self._best:
                self._best.append(self.best(self.feasible))
            return self._best[0]
        m = mask
        s = np.where(m, self.score[lo:lo + len(m)], -np.inf)
        top = float(s[s.argmax()]) if len(s) else -math.inf
        if top == -math.inf:  # nothing in the mask (scores are finite)
            return lo if m.any() else None
        return lo + int((s >= top - 1e-9 * max(1.0, abs(top))).argmax())

    def parts_of(self, i: int) -> dict:
        """lane -> (compute ms, memory ms) of what candidate i launches, read off the search's own
        pricing (for calibration: no second pricing call)."""
        parts, cal = self.priced.parts, self.cal
        na, nb = len(self.agg_budgets), len(self.split_budgets)
        if i < na:
            return {LaneKind.AGGREGATED: parts(i, i + 1, *cal[LaneKind.AGGREGATED])}
        G, K = len(self.grid), (len(self.priced.t) - na - len(self.grid) * nb) // max(1, len(self.grid))
        g, bi = divmod(i - na, nb)
        p = na + G * K + g * nb + bi
        d = na + g * K
        k = int(self.k[i])
        pre, dec = self.priced.parts_of_ranges([(p, p + 1, *cal[LaneKind.PREFILL]), (d, d + k, *cal[LaneKind.DECODE])])
        return {LaneKind.PREFILL: pre, LaneKind.DECODE: dec}

    def candidate(self, i: int) -> Candidate:
        split = bool(self.split[i])
        prefix = self.prefix
        tokens = int(self.tokens[i])
        return Candidate(
            "split" if split else "aggregated", self.budget_of(i), tokens,
            decode_sms=self.sd_of(i) if split else None, k=int(self.k[i]), step_ms=float(self.step[i]),
            decode_ms=float(self.decode[i]), first_ms=float(self.first[i]), slowest_ms=float(self.slowest[i]),
            joiner_ms=float(self.joiner[i]), r_p=tokens / float(self.step[i]) if self.step[i] > 0 else 0.0,
            pace_ms=float(self.decode[i]) / int(self.k[i]), score=float(self.score[i]),
            feasible=bool(self.feasible[i]), prefill=prefix.take(tokens) if prefix is not None and tokens else [],
        )


def remaining_prefill(view: SchedulerView, chunks: list[PrefillChunk]) -> dict[str, int]:
    """Remaining prefill tokens of the requests the chunks belong to (a chunk that covers them all
    completes its request, which then joins the decodes)."""
    want = {c.rid for c in chunks}
    out = {}
    for r in view.prefilling:
        if r.rid in want:
            out[r.rid] = r.remaining_prefill
    if len(out) < len(want):
        for r in view.waiting:
            if r.rid in want:
                out[r.rid] = r.remaining_prefill
                if len(out) == len(want):
                    break
    return out
