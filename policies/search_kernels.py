"""duet's search as compiled loops (numba): the chunk list cut at every budget, the priced rows
(`SummaryPricer.ms_blocks`), and every candidate scored (policies/duet.py, `DuetPolicy.search`).

Why compiled: the search prices ~230 rows, a few microseconds of arithmetic, but as numpy it is
~85 calls on small arrays, and in a serving loop the arrays are cold by the next plan: 0.5-0.6 ms
per plan at batch 256 against a 0.3 ms target (docs/results.md, "Plan overhead"). Here the same
operations run in three calls around the one matrix product, which stays in numpy (BLAS): numba's
own product may round differently, and every other number below is the numpy expression's,
operation for operation, so the plans are the same with or without numba
(tests/test_search_kernels.py compares every array bit for bit on random searches).

Each loop's comment names the numpy line it replaces (`duet_scoring.score_numpy`, `Prefix.cut`,
`SummaryPricer.ms_blocks`). Sums over a priced row's operators are numpy's pairwise sum (eight
running sums), which `add.reduce` applies along a contiguous axis.

Without numba (it is a dependency, but a GPU host may lack the wheel) or with
SGLANG_DUET_NUMPY_SEARCH=1, `AVAILABLE` is False and the policy runs the numpy path. The first
`compiled()` compiles (~5 s on 2 cores) into numba's on-disk cache; later processes load it
(~0.6 s, numba's import included). The functions are plain Python until then.
"""
from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import numpy as np

# numba is imported (and the kernels compiled or loaded from its cache) on first use, not with this
# module: the pricing imports it, and a CPU server that never runs duet should not pay for numba.
AVAILABLE = (os.environ.get("SGLANG_DUET_NUMPY_SEARCH", "") in ("", "0")
             and importlib.util.find_spec("numba") is not None)
_compiled: SimpleNamespace | None = None


def compiled() -> SimpleNamespace:
    """The kernels below, compiled (numba's on-disk cache makes that ~0.6 s after the first time)."""
    global _compiled
    if _compiled is None:
        import numba

        def jit(fn):
            return numba.njit(cache=True, nogil=True)(fn)
        _compiled = SimpleNamespace(cut_rows=jit(cut_rows), price_rows=jit(price_rows),
                                    score_candidates=jit(score_candidates))
    return _compiled


def cut_rows(budgets, less_n, n, cached, has_prefix, cumL, table, total, w_t, w_a, unit_template, na, nb):
    """X (the priced rows' [T, R, A, K]), joins (whether each cut completes a request) and F (each
    cut's work and tokens), as `duet_scoring.score_numpy` builds them from `SearchTables.shape` and
    `Prefix.cut`. X's rows: na aggregated batches (the cut plus the n decodes), then when nb > 0
    the K decode steps (`unit_template` * n plus the cached tokens), then nb split prefills."""
    nc = na + nb
    K = unit_template.shape[0]
    rows = na + (K + nb if nb else 0)
    X = np.empty((rows, 4))
    F = np.zeros((2, nc))
    joins = np.zeros(nc, dtype=np.bool_)
    nf = float(n)
    for i in range(nc):
        # SearchTables.shape: cut = budgets - less_n * n, at least 0
        b = budgets[i] - less_n[i] * nf
        if b < 0.0:
            b = 0.0
        x0 = x1 = x2 = x3 = 0.0
        if has_prefix:
            # Prefix.cut: the chunks wholly inside, then the part of the next one
            if b > total:
                b = total
            full = np.searchsorted(cumL, b, side="right")
            s = table[3, full]
            m = b - table[4, full]  # tokens of the partly taken chunk
            part = 1.0 if m > 0 else 0.0
            A = table[0, full] + m * (s + (m + 1) / 2)
            F[0, i] = b * w_t + w_a * A
            F[1, i] = b
            x0, x1, x2, x3 = b, float(full) + part, A, table[1, full] + (s + m) * part
            joins[i] = table[2, full] > 0
        if i < na:  # the decodes join every aggregated batch: np.add(Xc[:na], row)
            X[i, 0] = x0 + nf
            X[i, 1] = x1 + nf
            X[i, 2] = x2 + (cached + nf)
            X[i, 3] = x3 + (cached + nf)
        else:
            r = K + i
            X[r, 0], X[r, 1], X[r, 2], X[r, 3] = x0, x1, x2, x3
    if nb:
        for j in range(K):  # np.add(unit_template * n, [0, 0, cached, cached])
            X[na + j, 0] = unit_template[j, 0] * nf + 0.0
            X[na + j, 1] = unit_template[j, 1] * nf + 0.0
            X[na + j, 2] = unit_template[j, 2] * nf + cached
            X[na + j, 3] = unit_template[j, 3] * nf + cached
    return X, joins, F


def price_rows(base, w_const, take, prepared, block, scales, ops):
    """`SummaryPricer.ms_blocks` from the product `base` = X @ W (every row has a request): P, each
    priced row's scaled operator times, and t, its ms."""
    Pn = take.shape[0]
    width = base.shape[1]
    P = np.empty((Pn, width))
    t = np.empty(Pn)
    v = np.empty(ops)
    end = ops - ops % 8
    for i in range(Pn):
        src = take[i]
        bl = block[i]
        for c in range(width):
            P[i, c] = (base[src, c] + w_const[c]) * prepared[i, c] * scales[bl, c]
        for c in range(ops):
            z, y = P[i, c], P[i, ops + c]
            v[c] = z if z >= y else y
        # numpy's pairwise sum of v (`pricing.pairwise_sum`; ops <= 128): eight running sums
        if ops < 8:
            s = 0.0
            for c in range(ops):
                s += v[c]
        else:
            r0, r1, r2, r3, r4, r5, r6, r7 = v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
            for c in range(8, end, 8):
                r0 += v[c]
                r1 += v[c + 1]
                r2 += v[c + 2]
                r3 += v[c + 3]
                r4 += v[c + 4]
                r5 += v[c + 5]
                r6 += v[c + 6]
                r7 += v[c + 7]
            s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
            for c in range(end, ops):
                s += v[c]
        t[i] = s + P[i, width - 1]
    return P, t


def score_candidates(t, joins, F, from_t, from_F, na, nb, G, K, n, k_cap, by_m, steps,
                     first_limit, limit, w_p, tau, weight):
    """C (rows: step, decode, first, slowest, joiner, work, tokens), k, feasible and score of every
    candidate from the priced rows t (`duet_scoring.score_numpy`, from `t.take(sh.from_t, ...)` on)."""
    N = na + G * nb
    C = np.empty((7, N))
    kk = np.ones(N, dtype=np.int64)
    for c in range(N):
        for r in range(4):
            C[r, c] = t[from_t[r, c]]
        C[4, c] = 0.0
        C[5, c] = F[0, from_F[c]]
        C[6, c] = F[1, from_F[c]]
    if n == 0:
        for c in range(na):
            C[2, c] = 0.0
            C[3, c] = 0.0
    if nb:
        for g in range(G):
            # steps[g]: 0, the cumulative decode steps (np.add.accumulate), inf, then the steps
            acc = 0.0
            for j in range(K):
                x = t[na + g * K + j]
                acc = x if j == 0 else acc + x
                steps[g, 1 + j] = acc
                steps[g, K + 2 + j] = x
            for b in range(nb):
                tp = t[na + G * K + g * nb + b]
                m = 0  # steps that end within the prefill: argmin of cum[1:] <= tp (cum rises, then inf)
                while m < K and steps[g, 1 + m] <= tp:
                    m += 1
                o = 4 * m
                at0 = steps[g, by_m[o]]
                nxt = steps[g, by_m[o + 1]]
                at2 = steps[g, by_m[o + 2]]
                at3 = steps[g, by_m[o + 3]]
                r = tp - at0
                if tp > steps[g, K]:  # longer than the priced steps: the rest of the step in progress
                    last = steps[g, K + 2 + K - 1]
                    x = r / last
                    mod = np.fmod(x, 1.0)  # np.remainder(x, 1.0), in its steps
                    if mod != 0.0:
                        if mod < 0.0:
                            mod += 1.0
                    else:
                        mod = 0.0
                    r = mod * last
                a, bb = r + nxt, 2 * nxt - r
                j = a if a <= bb else bb  # np.minimum
                if m == 0:
                    j = steps[g, K + 2] - tp + steps[g, K + 3]
                col = na + g * nb + b
                C[4, col] = j * (1.0 if joins[na + b] else 0.0)
                C[1, col] = at2
                C[3, col] = at3 if at3 >= nxt else nxt
                kk[col] = 1 if m < 1 else (k_cap if m > k_cap else m)
    feasible = np.ones(N, dtype=np.bool_)
    score = np.empty(N)
    for c in range(N):
        if n:
            feasible[c] = C[2, c] <= first_limit and C[3, c] <= limit and C[4, c] <= limit
        f0 = C[0, c] if C[0, c] >= 1e-9 else 1e-9
        s = C[5, c] / f0
        s *= w_p
        if n:
            f1 = C[1, c] if C[1, c] >= 1e-9 else 1e-9
            pace = tau * float(kk[c]) / f1
            gain = 1.0 if 1.0 <= pace else pace
            if weight != 1.0:
                gain *= weight
            gain += 1e-3 * pace
            s += gain
        score[c] = s
    return C, kk, feasible, score
