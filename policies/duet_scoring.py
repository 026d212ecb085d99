"""duet's candidates priced and scored from one search's inputs (`DuetPolicy.search`), two ways
that give the same numbers bit for bit: `score_numpy`, the vectorised reference, and
`score_compiled`, the same operations in one compiled call (policies/search_kernels.py). The
policy runs the compiled one when numba is there."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sglang_duet.policies import search_kernels_loader as search_kernels
from sglang_duet.policies.pricing import Priced

_np_core = np._core if hasattr(np, "_core") else np.core
_clip = _np_core.umath.clip  # np.clip without its Python wrapper
_count_nonzero = _np_core.multiarray.count_nonzero  # np.count_nonzero without its Python wrapper


@dataclass
class SearchInputs:
    """What one search prices: the decodes (n, their cached tokens, look-ahead cap k_cap), the
    chunk list (`Prefix`, None without prompts), the SLO limits and the objective's weights."""

    n: int
    cached: int
    k_cap: int
    prefix: object  # duet_search.Prefix | None
    first_limit: float
    limit: float
    w_p: float
    tau: float
    weight: float  # decode_weight (read only with decodes)
    keep_g: int = -1  # a partition (grid index) whose best split the compiled search finds too (-1: none)


@dataclass
class Found:
    """What the compiled search finds besides the arrays (each equal to what `Search` and
    `Priced.parts` compute from the arrays when asked)."""

    best: int | None  # Search.best(): the best feasible candidate
    kept: int | None  # the best feasible split on partition keep_g that prefills (None: none)
    best_parts: list  # Search.parts_of(best): [compute, memory] of its lane, or prefill's then decode's
    kept_parts: np.ndarray  # row k - 1: Priced.parts of the kept partition's first k decode steps


def score_numpy(tb, pricer, scales: np.ndarray, work: tuple[float, float], x: SearchInputs, sh, budgets, less_n):
    """(C, k, feasible, score, priced, found): C's rows step, decode, first, slowest, joiner, work, tokens per
    candidate (aggregated ones first, then the splits by S_d, then budget), see policies/duet.py;
    found: what the compiled path reads off the same pass (`Found`); None here."""
    n, k_cap, prefix = x.n, x.k_cap, x.prefix
    na, nb, N = sh.na, sh.nb, sh.N
    cut_budgets = budgets - less_n * n  # exact: small integers
    np.maximum(cut_budgets, 0.0, out=cut_budgets)
    # the cut's rows: the aggregated budgets', then the split budgets'; F: each cut's work (ms of
    # ideal prefill compute) and tokens
    if prefix is not None:
        Xc, joins_c, F = prefix.cut(cut_budgets, work, nonnegative=True)
    else:
        Xc, joins_c, F = tb.no_cut
    G, K = len(tb.grid), tb.k_max + 2

    # one pricing call: aggregated steps, decode steps per (S_d, step j), prefill per (S_d, budget)
    X = np.empty((sh.rows, 4))
    row = tb.row  # scratch: what the decodes add to each aggregated batch
    row[0] = row[1] = n
    row[2] = row[3] = x.cached + n
    np.add(Xc[:na], row, out=X[:na])
    if nb:
        row[0] = row[1] = 0
        row[2] = row[3] = x.cached
        np.add(tb.decode_template(n), row, out=X[na:na + K])  # A = K = the cached tokens at step j
        X[na + K:] = Xc[na:na + nb]
    # every row has a request: the decodes (n > 0 with splits) or prefill tokens (n = 0 keeps those only)
    priced = pricer.ms_blocks(X, sh.layout, scales, nonempty=True)
    t = priced.t

    # the candidates, aggregated ones first: rows of C, gathered by index where they are read
    # off the priced rows and the cut (SearchShape), the splits' decode, slowest and joiner after
    C = np.empty((7, N))  # rows: step, decode, first, slowest, joiner, work, tokens (F's order)
    first, joiner, work_row = C[2], C[4], C[5]  # (indexing: unpacking all seven rows costs more)
    t.take(sh.from_t, out=C[0:4], mode="clip")  # aggregated: its step; splits: the prefill, first step
    if not n:
        C[2:4, :na] = 0.0
    joiner[:na] = 0.0
    F.take(sh.from_F, axis=1, out=C[5:7], mode="clip")
    kk = sh.ones.copy()  # k: 1 for aggregated (np.ones costs twice a copy)
    if nb:
        # The decode lane steps m times before the prefill (tp) ends, launching k = min(m, k_cap)
        # of them first; at tp it waits the rest r or steps past it (see policies/duet.py).
        td = t[na:na + G * K].reshape(G, K)
        tp = t[na + G * K:].reshape(G, nb)
        steps = tb.steps  # per S_d: 0, the cumulative steps, inf, then the steps (scratch)
        cum = steps[:, :K + 2]
        np.add.accumulate(td, axis=1, out=steps[:, 1:K + 1])
        steps[:, K + 2:] = td
        m = (cum[:, None, 1:] <= tp[:, :, None]).argmin(axis=2)  # G x nb: steps within tp (cum rises)
        # What each m needs, in one gather: the steps' end before it, the step after it, and
        # with k = clip(m, 1, k_cap) the launch's end and its last step
        at = steps.take(tb.by_m(k_cap), axis=1).reshape(G * (K + 1), 4).take(tb.base_m + m, axis=0)
        r = tp - at[:, :, 0]
        nxt = at[:, :, 1]
        longer = tp > cum[:, K:K + 1]
        if _count_nonzero(longer):
            # A prefill longer than the priced steps: extrapolate with the last one. There m = K
            # already gives k = k_cap and nxt = the last step; r is what is left of the step in
            # progress at tp: (x - floor(x)) * last with x = r / last (x % 1 is that, exactly).
            last = td[:, -1:]
            np.putmask(r, longer, np.remainder(r / last, 1.0) * last)
        j = np.minimum(r + nxt, 2 * nxt - r)
        never = m == 0
        if _count_nonzero(never):
            np.putmask(j, never, td[:, :1] - tp + td[:, 1:2])
        Cs = C[:, na:].reshape(7, G, nb)  # the splits' columns of C by (S_d, budget): one view for all rows
        # j > 0 (r < nxt), so j * joins is j where a request completes and 0 elsewhere
        np.multiply(j, joins_c[na:na + nb], out=Cs[4])  # joiner
        Cs[1] = at[:, :, 2]  # decode
        np.maximum(at[:, :, 3], nxt, out=Cs[3])  # slowest
        _clip(m, 1, k_cap, out=kk[na:].reshape(G, nb))
    if n:
        feasible = first <= x.first_limit
        later = C[3:5] <= x.limit  # slowest, joiner
        feasible &= later[0]
        feasible &= later[1]
    else:
        feasible = np.ones(N, dtype=bool)
    floor = np.maximum(C[0:2], 1e-9)  # step, decode
    score = work_row / floor[0]
    score *= x.w_p
    if n:
        pace = x.tau * kk / floor[1]
        gain = np.minimum(1.0, pace)
        if x.weight != 1.0:  # (times 1 is exact: skipped)
            gain *= x.weight
        gain += 1e-3 * pace
        score += gain
    return C, kk, feasible, score, priced, None  # the best candidate and the rest: found when asked (Search)


def score_compiled(tb, pricer, scales: np.ndarray, work: tuple[float, float], x: SearchInputs, sh, budgets, less_n):
    """`score_numpy` in one compiled call (search_kernels.search); the same arrays, bit for bit,
    and the best candidate. `scales` may be the (compute_scale, bandwidth_scale) pairs instead of
    the scale rows."""
    prefix = x.prefix
    if prefix is not None:
        cum, table, total = prefix.cumL, prefix.table, float(prefix.total)
    else:
        cum, table, total = tb.empty_cum, tb.empty_table, 0.0
    W, w_const, ops = pricer.weights
    lay = sh.layout
    C, kk, feasible, score, best, here, P, t, best_parts, kept_parts = search_kernels.kernels().search(
        budgets, less_n, x.n, float(x.cached), prefix is not None, cum, table, total, work[0], work[1], tb.unit_template,
        sh.na, sh.nb, W, w_const, lay.take, lay.prep_rows, lay.prep_of, lay.block, scales, ops, sh.from_t, sh.from_F,
        len(tb.grid), x.k_cap, tb.by_m(x.k_cap), tb.steps, float(x.first_limit), float(x.limit), float(x.w_p), float(x.tau),
        float(x.weight), x.keep_g)
    found = Found(None if best < 0 else best, None if here < 0 else here, best_parts.tolist(), kept_parts)
    return C, kk, feasible, score, Priced(t, P, ops, compiled=True), found


def score(tb, pricer, scales, work, x: SearchInputs, sh, budgets, less_n, compiled: bool):
    """The compiled path when asked for and possible (an exact pricer: its rows are affine), else numpy."""
    if compiled and search_kernels.AVAILABLE and pricer.exact:
        return score_compiled(tb, pricer, scales, work, x, sh, budgets, less_n)
    return score_numpy(tb, pricer, scales, work, x, sh, budgets, less_n)


def warm_up(tb, pricer, scales, work) -> None:
    """Compile (or load from numba's cache) the kernels now, on a one-decode search, so that the
    first plan does not pay for it; the argument types are those of every later call."""
    if not (search_kernels.AVAILABLE and pricer.exact):
        return
    sh, budgets, less_n, _ = tb.shape_parts(1, 0.0)
    got = score_compiled(tb, pricer, scales, work, SearchInputs(1, 1, 1, None, 1.0, 1.0, 1.0, 1.0, 1.0), sh, budgets,
                         less_n)
    got[4].parts(0, 1, 1.0, 1.0)
    W, w_const, ops = pricer.weights
    layout = tb.step_layout(int(tb.grid[0]), 1)
    search_kernels.kernels().decode_steps(tb.unit_template, 1, 1.0, 1, W, w_const, layout.take, layout.prep_rows,
                                          layout.prep_of, layout.block, scales[1:2].copy(), ops)
    ints = np.zeros(2, dtype=np.int64)  # the waiting queue's columns (core/waiting_queue.py)
    search_kernels.kernels().deadline_walk(np.zeros(2), ints, ints, ints, 0.0, 0.0, 1.0, 1.0, 1.0)
