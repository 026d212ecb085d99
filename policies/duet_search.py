"""The data of one duet search (policies/duet.py): the ready decodes summarised, the FCFS chunk
list cut at every budget, and every candidate priced as parallel arrays."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np

from sglang_duet.policies.base import LaneKind, PrefillChunk, Priced


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
        ids = [r.rid for r in self.reqs]
        if self.more:
            ids += [w.rid for w in self.more]
        return ids


def decodes_of(view, k_max: int) -> Decodes:
    """The ready decodes of a view, summarised (`Decodes`); their longest remaining output counted up to
    k_max."""
    decoding = view.decoding  # hot: every ready decode, every plan
    if not decoding:
        return Decodes([], 0, 1, 0.0)
    # one pass: each request's memory is touched once (cold at batch 256: most of the cost)
    cached, last = 0, math.inf
    for r in decoding:
        cached += r.num_computed
        t = r.last_token_time
        if t is not None and t < last:
            last = t
    waited = max(0.0, (view.now - last) * 1e3) if last < math.inf else 0.0
    # The look-ahead needs the longest remaining output only up to k_max: stop at the first
    # request that may still emit that many (nearly always the first one).
    end = view.config.context_length - 1  # a ready decode's sequence is num_computed + 1 tokens
    longest = 1
    for r in decoding:
        left = end - r.num_computed
        mn = r.params.max_new_tokens
        if mn is not None and mn - len(r.output_ids) < left:
            left = mn - len(r.output_ids)
        if left > longest:
            longest = left
            if longest >= k_max:
                break
    return Decodes(decoding, cached, min(longest, k_max), waited)


def projected_decodes(view, busy, left_ms: float, dec: Decodes, k_max: int) -> Decodes:
    """The decodes as a joint plan would see them when the decode lane's launch ends: the ready
    ones (`dec`, having waited `left_ms` more) and the busy lane's own, k steps further on."""
    more, cached, longest = [], dec.cached, dec.longest
    keep = more.append
    end = view.config.context_length - 1
    for w in busy.work:
        pos = w.start_pos + w.steps  # cached tokens after the launch
        if pos >= end:
            continue  # finishes on the lane (the context is full)
        cap = getattr(w.params, "max_new_tokens", None)
        if cap is not None:
            cap -= pos + 1 - len(w.prompt_ids)  # less the output tokens after the launch
            if cap <= 0:
                continue  # finishes on the lane (max_new_tokens)
        keep(w)
        cached += pos
        if longest < k_max:  # what it may still emit, once the longest is not yet k_max
            left = end - pos
            if cap is not None and cap < left:
                left = cap
            if left > longest:
                longest = left if left < k_max else k_max
    return Decodes(dec.reqs, cached, longest, dec.waited_ms + left_ms if dec.n else 0.0, more)


class Prefix:
    """An FCFS chunk list and its summaries cut at any token budget (what select_prefills gives
    for a smaller budget is a prefix of it, the last chunk shortened)."""

    def __init__(self, chunks: list[PrefillChunk], remaining: list[int]):
        """`remaining`: each chunk's request's remaining prefill (`select_prefills(remaining=...)`)."""
        self.chunks = chunks
        # prefix sums in plain Python (a handful of chunks), one array each
        cumL, prefA, prefK, prefC, starts = [], [0.0], [0.0], [0.0], []
        L = A = Kk = C = 0.0
        for c, rest in zip(chunks, remaining):
            s, n = c.start, c.length
            L += n
            A += n * (s + (n + 1) / 2)
            Kk += s + n
            C += n >= rest
            cumL.append(L)
            prefA.append(A)
            prefK.append(Kk)
            prefC.append(C)
            starts.append(float(s))
        starts.append(0.0)  # start of "the chunk after the last"
        # one array build for the five (n + 1)-long tables (plan() overhead is numpy call count)
        cumL0 = [0.0] + cumL  # tokens before chunk i
        self.table = np.array([prefA, prefK, prefC, starts, cumL0])  # rows read by index (not unpacked: slower)
        self.cumL = self.table[4, 1:]
        self._cumL, self._prefC = cumL, prefC  # the Python lists, for `completes`
        self.total = L

    def cut(self, budgets: np.ndarray, work: tuple[float, float], nonnegative: bool = False):
        """(X rows [T, R, A, K] per budget, whether the cut completes a request, F: per budget its
        work wT * T + wA * A (ms of ideal prefill compute, `work` = (wT, wA)) and T as two rows, one
        array build for X and F); `nonnegative`: the caller's budgets are >= 0 already."""
        b = np.minimum(budgets if nonnegative else np.maximum(budgets, 0.0), self.total)
        full = self.cumL.searchsorted(b, side="right")  # chunks wholly inside
        at = self.table.take(full, axis=1)  # prefix sums A, K, C, the chunk's start, tokens before it
        s = at[3]
        n = b - at[4]  # tokens of the partly taken chunk
        part = n > 0
        # (s + n) * part: s + n where a chunk is partly taken, else 0 (both are >= 0)
        A = at[0] + n * (s + (n + 1) / 2)
        Y = np.array([b * work[0] + work[1] * A, b, full + part, A, at[1] + (s + n) * part])
        return Y[1:].T, at[2] > 0, Y[:2]

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
    kept: tuple | None = field(default=None, init=False, repr=False, compare=False)  # (S_d, its best split or None)
    found: object = field(default=None, init=False, repr=False, compare=False)  # duet_scoring.Found (compiled)

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
        if len(m) <= 8:  # one partition's splits: plain floats beat numpy's per-call cost
            return _best_of(m.tolist(), self.score[lo:lo + len(m)].tolist(), lo)
        s = np.where(m, self.score[lo:lo + len(m)], -np.inf)
        top = float(s[s.argmax()]) if len(s) else -math.inf
        if top == -math.inf:  # nothing in the mask (scores are finite)
            return lo if m.any() else None
        return lo + int((s >= top - 1e-9 * max(1.0, abs(top))).argmax())

    def kept_decode_parts(self, k: int) -> tuple[float, float] | None:
        """`Priced.parts` of the kept partition's first k decode steps, when the compiled search read
        them (`decode_steps_at` of that partition), else None."""
        f = self.found
        if f is None or self.kept is None or not len(self.split_budgets):
            return None
        c, m = f.kept_parts[k - 1].tolist()
        return c, m

    def decode_steps_at(self, g: int | None) -> int | None:
        """The first of the priced rows of the decode lane's steps j = 1..K on partition g (the grid's
        g-th S_d), priced with the decode lane's calibration; None without split candidates."""
        nb = len(self.split_budgets)
        if g is None or not nb:
            return None
        na, G = len(self.agg_budgets), len(self.grid)
        return na + g * ((len(self.priced.t) - na - G * nb) // G)

    def parts_of(self, i: int) -> dict:
        """lane -> (compute ms, memory ms) of what candidate i launches, read off the search's own
        pricing (for calibration: no second pricing call)."""
        parts, cal = self.priced.parts, self.cal
        na, nb = len(self.agg_budgets), len(self.split_budgets)
        f = self.found
        if f is not None and i == f.best:  # read by the compiled search
            b = f.best_parts
            if i < na:
                return {LaneKind.AGGREGATED: (b[0], b[1])}
            return {LaneKind.PREFILL: (b[0], b[1]), LaneKind.DECODE: (b[2], b[3])}
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
        # .item(i): the Python number directly (no numpy scalar on the way)
        split = bool(self.split.item(i))
        prefix = self.prefix
        tokens = int(self.tokens.item(i))
        step, decode, k = self.step.item(i), self.decode.item(i), int(self.k.item(i))
        return Candidate(
            "split" if split else "aggregated", self.budget_of(i), tokens,
            decode_sms=self.sd_of(i) if split else None, k=k, step_ms=step,
            decode_ms=decode, first_ms=self.first.item(i), slowest_ms=self.slowest.item(i),
            joiner_ms=self.joiner.item(i), r_p=tokens / step if step > 0 else 0.0,
            pace_ms=decode / k, score=self.score.item(i),
            feasible=bool(self.feasible.item(i)), prefill=prefix.take(tokens) if prefix is not None and tokens else [],
        )


def _best_of(mask: list, score: list, lo: int) -> int | None:
    """`Search.best` on a few candidates in Python floats (the same comparisons, the same answer)."""
    top = -math.inf
    for ok, x in zip(mask, score):
        if ok and x > top:
            top = x
    if top == -math.inf:
        return lo if any(mask) else None
    cut = top - 1e-9 * max(1.0, abs(top))
    for i, (ok, x) in enumerate(zip(mask, score)):
        if ok and x >= cut:
            return lo + i
    return None  # not reached: top itself passes


class SearchTables:
    """What every search of one policy needs and no view changes, built once (plan() overhead is
    numpy call count): the budgets as arrays, the pricing factors and row layouts per search shape,
    index tables, and scratch a search fills and reads back before it returns."""

    def __init__(self, pricer, total_sms: int, grid: list[int], budgets: list[int], split_budgets: list[int],
                 k_max: int, splits: bool = True):
        self.pricer = pricer
        self.budgets, self.split_budgets, self.k_max, self.splits = budgets, split_budgets, k_max, splits
        self.grid = np.array(grid)
        self.budget_array = np.array(budgets, dtype=float)
        self.split_array = np.array(split_budgets, dtype=float)
        self.chunk_budget = int(max(budgets[-1], split_budgets[-1]))  # one chunk list serves every budget
        G, K = len(grid), k_max + 2  # K decode steps priced per partition
        self.prep_all = pricer.prepare(np.zeros(1, dtype=int))  # aggregated: all SMs
        self.prep_decode = pricer.prepare(self.grid)  # decode lane on S_d
        self.prep_prefill = pricer.prepare(total_sms - self.grid)  # prefill lane on the rest
        self.base_m = np.arange(G)[:, None] * (K + 1)  # flat index of (S_d, m = 0) in G x (K + 1)
        self.steps = np.zeros((G, 2 * K + 2))  # scratch: 0, cumulative steps, inf, then the steps
        self.steps[:, K + 1] = np.inf
        self.row = np.zeros(4)  # scratch: what the decodes add to a priced row
        nc = len(budgets) + len(split_budgets)
        self.no_cut = (np.zeros((nc, 4)), np.zeros(nc, dtype=bool), np.zeros((2, nc)))  # the cut of an empty queue
        self.empty_cum, self.empty_table = np.zeros(1), np.zeros((5, 2))  # the compiled cut's of an empty queue
        self._by_m: dict[int, np.ndarray] = {}
        steps = 1.0 + np.arange(k_max + 2)
        self.unit_template = np.stack([np.ones(len(steps)), np.ones(len(steps)), steps, steps], axis=1)
        self._cuts: dict[tuple, tuple] = {}  # (first and end budget row, nb) -> shape, budgets, which less n, aggregated budgets
        self._shapes: dict[tuple[int, int], SearchShape] = {}
        self._step_layouts: dict[tuple[int, int], object] = {}

    def shape_parts(self, n: int, total: float) -> tuple["SearchShape", np.ndarray, np.ndarray, np.ndarray]:
        """(the search's shape, the budgets to cut the chunk list at (the distinct aggregated ones,
        then the split ones), which of them the n decodes share (1.0) or not (0.0), the distinct
        aggregated budgets). Budget b cuts min(max(b - n, 0), total) prefill tokens; with
        the budgets sorted, a budget adds tokens over the previous one iff b - n > 0 and the
        previous one's b - n < total (the first budget always counts, with decodes or tokens); of
        the split budgets the first ones count, up to the first that takes the whole list."""
        budgets = self.budgets
        nb = 0
        if total > 0:
            lo = max(1, bisect.bisect_right(budgets, n))
            hi = min(len(budgets), bisect.bisect_left(budgets, total + n) + 1)
            if lo <= 1:
                lo = 1  # rows 0..hi
            elif lo >= hi:
                lo = hi = 1  # row 0 alone
            if n and self.splits:
                nb = min(len(self.split_budgets), bisect.bisect_left(self.split_budgets, total) + 1)
        else:
            lo = hi = 1 if n else 0  # row 0 (decodes only), or nothing
        # Cached by the rows taken, not by n: n changes from plan to plan in a real run (a cache per
        # n missed on a third of them). b - n for the aggregated budgets, b for the split ones.
        key = (lo, hi, nb)
        got = self._cuts.get(key)
        if got is None:
            rows = list(range(min(hi, 1))) + list(range(lo, hi))  # row 0, then lo..hi
            agg = self.budget_array[rows]
            budgets = np.concatenate([agg, self.split_array[:nb]])
            less_n = np.concatenate([np.ones(len(agg)), np.zeros(nb)])  # which budgets the decodes share
            got = self._cuts[key] = (self.search_shape(len(rows), nb), budgets, less_n, agg)
        return got

    def search_shape(self, na: int, nb: int) -> "SearchShape":
        got = self._shapes.get((na, nb))
        if got is None:
            got = self._shapes[(na, nb)] = SearchShape(self, na, nb)
        return got

    def by_m(self, k_cap: int) -> np.ndarray:
        """Columns of `steps` to gather for each m = 0..K decode steps within a prefill: the
        cumulative steps before the next one, the next step (the last one past K), and with
        k = clip(m, 1, k_cap) the cumulative k steps and the k-th step (cached per k_cap)."""
        got = self._by_m.get(k_cap)
        if got is None:
            K = self.k_max + 2
            cols = []
            for m in range(K + 1):
                k = min(max(m, 1), k_cap)
                cols += [m, K + 2 + min(m, K - 1), k, K + 2 + k - 1]
            got = self._by_m[k_cap] = np.array(cols)
        return got

    def decode_template(self, n: int) -> np.ndarray:
        """X rows [n, n, n * j, n * j] of decode steps j = 1..K (add the cached tokens to A and K):
        one product, exact (small integers), so nothing is cached per batch size (n changes from
        plan to plan in a real run; a cache per n missed on a quarter of them)."""
        return self.unit_template * float(n)

    def step_layout(self, sms: int, k: int):
        """The pricer's row layout of k decode steps on `sms` SMs (cached)."""
        got = self._step_layouts.get((sms, k))
        if got is None:
            got = self._step_layouts[(sms, k)] = self.pricer.layout([(0, k, self.pricer.prepare(np.array([sms])))])
        return got


class SearchShape:
    """What a search with na aggregated and nb split budgets reads by index, built once per shape:
    the pricer's row layout, where each candidate's step, decode, first and slowest come from in
    the priced rows (aggregated: its step; splits: the prefill's launch and the first decode step,
    decode and slowest written after), where its work and tokens come from in the cut, and which
    candidates are splits."""

    def __init__(self, tb: SearchTables, na: int, nb: int):
        G, K = len(tb.grid), tb.k_max + 2
        self.na, self.nb = na, nb
        self.N = na + G * nb
        self.rows = na + (K + nb if nb else 0)  # X's rows: aggregated, decode steps j = 1..K, split prefills
        blocks = [(0, na, tb.prep_all)]
        if nb:
            blocks += [(na, na + K, tb.prep_decode), (na + K, na + K + nb, tb.prep_prefill)]
        self.layout = tb.pricer.layout(blocks)
        agg = np.arange(na)
        g, b = np.divmod(np.arange(G * nb), nb) if nb else (np.zeros(0, dtype=int), np.zeros(0, dtype=int))
        prefill = na + G * K + g * nb + b  # the split's prefill row of the priced t
        first = na + g * K  # its decode lane's first step
        self.from_t = np.stack([np.concatenate([agg, prefill]), np.concatenate([agg, prefill]),
                                np.concatenate([agg, first]), np.concatenate([agg, first])])
        self.from_F = np.concatenate([agg, na + b])
        self.split = np.concatenate([np.zeros(na, dtype=bool), np.ones(G * nb, dtype=bool)])
        self.ones = np.ones(self.N, dtype=int)
