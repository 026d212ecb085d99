"""duet's search as compiled loops (numba): the chunk list cut at every budget, the priced rows
(`SummaryPricer.ms_blocks`), and every candidate scored (policies/duet.py, `DuetPolicy.search`); and
the deadline walk over the waiting queue's columns that orders what the search takes (`deadline_walk`).

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

This module imports numba: load it through `search_kernels_loader.kernels()`, which says whether
numba is there (else the policy runs the numpy path) and imports it on first use. The first use
compiles (~5 s on 2 cores) into numba's on-disk cache; later processes load it (~0.6 s, numba's
import included).
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
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


@numba.njit(cache=True, nogil=True)
def price_rows(X, W, w_const, take, prep_rows, prep_of, block, scales, ops):
    """`SummaryPricer.ms_blocks` of the rows X = [[T, R, A, K], ...] (every row has a request): P,
    each priced row's scaled operator times, and t, its ms. The product is `SummaryPricer.product`'s,
    four products added in order. `scales`: a row per block, either `SummaryPricer.scale_rows` or
    the (compute_scale, bandwidth_scale) pairs they repeat."""
    width = W.shape[1]
    base = np.empty((X.shape[0], width))
    for r in range(X.shape[0]):
        x0, x1, x2, x3 = X[r, 0], X[r, 1], X[r, 2], X[r, 3]
        for c in range(width):
            b = x0 * W[0, c]
            b += x1 * W[1, c]
            b += x2 * W[2, c]
            b += x3 * W[3, c]
            base[r, c] = b + w_const[c]
    Pn = take.shape[0]
    P = np.empty((Pn, width))
    t = np.empty(Pn)
    v = np.empty(ops)
    pairs = scales.shape[1] == 2
    for i in range(Pn):
        src = take[i]
        bl = block[i]
        pr = prep_of[i]
        if pairs:  # scale_rows: compute_scale for the operators' compute, bandwidth_scale for the rest
            for c in range(width):
                P[i, c] = base[src, c] * prep_rows[pr, c] * scales[bl, 0 if c < ops else 1]
        else:
            for c in range(width):
                P[i, c] = base[src, c] * prep_rows[pr, c] * scales[bl, c]
        for c in range(ops):
            z, y = P[i, c], P[i, ops + c]
            v[c] = z if z >= y else y
        s = _block_sum(v, 0, ops) if ops <= 128 else pairwise_sum(v, 0, ops)  # numpy's pairwise sum of v
        t[i] = s + P[i, width - 1]
    return P, t


@numba.njit(cache=True, nogil=True)
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
    # Search.best(): the highest feasible score, ties (within 1e-9) to the lowest index; -1: none
    top = -np.inf
    for c in range(N):
        if feasible[c] and score[c] > top:
            top = score[c]
    best = -1
    if top != -np.inf:
        cut = top - 1e-9 * max(1.0, abs(top))
        for c in range(N):
            if feasible[c] and score[c] >= cut:
                best = c
                break
    return C, kk, feasible, score, best


@numba.njit(cache=True, nogil=True)
def _block_sum(v, lo, n):
    """numpy's sum of a block of n <= 128 numbers: in order below 8, else eight running sums."""
    if n < 8:
        s = 0.0
        for i in range(lo, lo + n):
            s += v[i]
        return s
    r0, r1, r2, r3, r4, r5, r6, r7 = v[lo], v[lo + 1], v[lo + 2], v[lo + 3], v[lo + 4], v[lo + 5], v[lo + 6], v[lo + 7]
    end = lo + n - n % 8
    for i in range(lo + 8, end, 8):
        r0 += v[i]
        r1 += v[i + 1]
        r2 += v[i + 2]
        r3 += v[i + 3]
        r4 += v[i + 4]
        r5 += v[i + 5]
        r6 += v[i + 6]
        r7 += v[i + 7]
    s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for i in range(end, lo + n):
        s += v[i]
    return s


@numba.njit(cache=True, nogil=True)
def pairwise_sum(v, lo, hi):
    """`pricing.pairwise_sum` of v[lo:hi] (numpy's summation order): blocks of up to 128, and above
    that the two halves (the first a multiple of 8) summed apart and added, here with an explicit
    stack (numba compiles a recursive function called from another one unreliably)."""
    if hi - lo <= 128:
        return _block_sum(v, lo, hi - lo)
    at = np.empty(64, dtype=np.int64)  # each open range: its start, length, and how far it got
    size = np.empty(64, dtype=np.int64)
    stage = np.empty(64, dtype=np.int64)
    sums = np.empty(64)
    sp = vp = 0
    at[0], size[0], stage[0] = lo, hi - lo, 0
    sp = 1
    while sp:
        top = sp - 1
        a, n = at[top], size[top]
        if n <= 128:
            sums[vp] = _block_sum(v, a, n)
            vp += 1
            sp -= 1
            continue
        half = n // 2
        half -= half % 8
        if stage[top] == 0:  # the first half next
            stage[top] = 1
            at[sp], size[sp], stage[sp] = a, half, 0
            sp += 1
        elif stage[top] == 1:  # then the second
            stage[top] = 2
            at[sp], size[sp], stage[sp] = a + half, n - half, 0
            sp += 1
        else:  # both done: their sum
            vp -= 1
            sums[vp - 1] = sums[vp - 1] + sums[vp]
            sp -= 1
    return sums[0]


@numba.njit(cache=True, nogil=True)
def parts_of_ranges(P, t, ops, ranges):
    """`Priced.parts_of_ranges`: per row range (lo, hi, compute_scale, bandwidth_scale), the compute-
    bound and the memory-bound ms of its nonempty rows, unscaled."""
    out = np.empty((ranges.shape[0], 2))
    width = P.shape[1]
    for q in range(ranges.shape[0]):
        lo, hi = max(0, int(ranges[q, 0])), min(P.shape[0], int(ranges[q, 1]))  # as a slice would
        hi = max(lo, hi)
        comp = np.empty((hi - lo) * ops)
        mem = np.empty((hi - lo) * ops)
        over = np.empty(hi - lo)
        nc = nm = no = 0
        for i in range(lo, hi):
            if not t[i] > 0:
                continue  # an empty row counts nothing
            for c in range(ops):
                z, y = P[i, c], P[i, ops + c]
                if z >= y:
                    comp[nc] = z
                    nc += 1
                else:
                    mem[nm] = y
                    nm += 1
            over[no] = P[i, width - 1]
            no += 1
        out[q, 0] = pairwise_sum(comp, 0, nc) / ranges[q, 2]
        out[q, 1] = (pairwise_sum(mem, 0, nm) + pairwise_sum(over, 0, no)) / ranges[q, 3]
    return out


@numba.njit(cache=True, nogil=True)
def search(budgets, less_n, n, cached, has_prefix, cumL, table, total, w_t, w_a, unit_template, na, nb,
           W, w_const, take, prep_rows, prep_of, block, scales, ops, from_t, from_F, G, k_cap, by_m, steps,
           first_limit, limit, w_p, tau, weight, keep_g):
    """A whole search in one call (`duet_scoring.score_compiled`): `cut_rows`, `price_rows`,
    `score_candidates`, and with keep_g >= 0 the best feasible split that prefills on partition
    keep_g (`OneLaneBusy._partition_stays`; -1: none)."""
    X, joins, F = cut_rows(budgets, less_n, n, cached, has_prefix, cumL, table, total, w_t, w_a, unit_template, na, nb)
    P, t = price_rows(X, W, w_const, take, prep_rows, prep_of, block, scales, ops)
    C, kk, feasible, score, best = score_candidates(t, joins, F, from_t, from_F, na, nb, G, unit_template.shape[0], n,
                                                    k_cap, by_m, steps, first_limit, limit, w_p, tau, weight)
    here = -1
    if keep_g >= 0 and nb:  # Search.best over the partition's nb splits (`_best_of`: the same comparisons)
        lo = na + keep_g * nb
        top = -np.inf
        some = False
        for c in range(lo, lo + nb):
            if feasible[c] and C[6, c] > 0:
                some = True
                if score[c] > top:
                    top = score[c]
        if top == -np.inf:
            here = lo if some else -1
        else:
            cut = top - 1e-9 * max(1.0, abs(top))
            for c in range(lo, lo + nb):
                if feasible[c] and C[6, c] > 0 and score[c] >= cut:
                    here = c
                    break
    # What a launch calibrates on (`Search.parts_of`, `Priced.parts`), read now rather than by another
    # call: the best candidate's lanes (aggregated: [0:2]; split: prefill [0:2], decode [2:4]), and the
    # kept partition's first k decode steps for every k (the decode lane beside a running prefill).
    K = unit_template.shape[0]
    bcol = 1 if scales.shape[1] == 2 else ops  # the bandwidth scale: a pair's second, a scale row's after the ops
    ranges = np.empty((2, 4))
    best_parts = np.zeros(4)
    if best >= 0:
        if best < na:
            ranges[0, 0], ranges[0, 1], ranges[0, 2], ranges[0, 3] = best, best + 1, scales[0, 0], scales[0, bcol]
            got = parts_of_ranges(P, t, ops, ranges[:1])
            best_parts[0], best_parts[1] = got[0, 0], got[0, 1]
        else:
            g, bi = (best - na) // nb, (best - na) % nb
            p, d = na + G * K + g * nb + bi, na + g * K
            ranges[0, 0], ranges[0, 1], ranges[0, 2], ranges[0, 3] = p, p + 1, scales[2, 0], scales[2, bcol]
            ranges[1, 0], ranges[1, 1], ranges[1, 2], ranges[1, 3] = d, d + kk[best], scales[1, 0], scales[1, bcol]
            got = parts_of_ranges(P, t, ops, ranges)
            best_parts[0], best_parts[1], best_parts[2], best_parts[3] = got[0, 0], got[0, 1], got[1, 0], got[1, 1]
    kept_parts = np.zeros((K, 2))
    if keep_g >= 0 and nb:
        d = na + keep_g * K
        for k in range(1, K + 1):
            ranges[0, 0], ranges[0, 1], ranges[0, 2], ranges[0, 3] = d, d + k, scales[1, 0], scales[1, bcol]
            got = parts_of_ranges(P, t, ops, ranges[:1])
            kept_parts[k - 1, 0], kept_parts[k - 1, 1] = got[0, 0], got[0, 1]
    return C, kk, feasible, score, best, here, P, t, best_parts, kept_parts


@numba.njit(cache=True, nogil=True)
def decode_steps(unit_template, n, cached, k, W, w_const, take, prep_rows, prep_of, block, scales, ops):
    """(P, t) of k decode steps of n requests holding `cached` tokens (`DuetPolicy._decode_steps`):
    the rows unit_template[:k] * n plus [0, 0, cached, cached], priced."""
    X = np.empty((k, 4))
    nf = float(n)
    for j in range(k):
        X[j, 0] = unit_template[j, 0] * nf + 0.0
        X[j, 1] = unit_template[j, 1] * nf + 0.0
        X[j, 2] = unit_template[j, 2] * nf + cached
        X[j, 3] = unit_template[j, 3] * nf + cached
    return price_rows(X, W, w_const, take, prep_rows, prep_of, block, scales, ops)


@numba.njit(cache=True, nogil=True)
def deadline_walk(arrival, seq_len, out_len, computed, start, now, limit, tokens_per_ms, ttft_slo_ms):
    """`base.deadline_order`'s one pass, over the waiting queue's columns (core/waiting_queue.py) instead
    of its request objects: the same numbers in the same order (n = seq_len - computed, pending being 0
    for a waiting request), so the same answer. Returns (the indices set aside, in the order they were,
    and whether everyone makes the SLO in FCFS order anyway).

    The heap holds keys -n * size + i as `heapq` does there; any valid min-heap pops the same keys
    (they are distinct), so the walk sets the same requests aside."""
    size = arrival.shape[0]
    heap = np.empty(size, dtype=np.int64)
    hn = 0
    late = np.empty(size, dtype=np.int64)
    nl = 0
    t = start
    total = 0
    first = np.inf
    for i in range(size):
        n = seq_len[i] - computed[i]
        total += n
        a = arrival[i]
        if a < first:
            first = a
        t += n / tokens_per_ms
        a *= 1e3
        if out_len[i] or now - a > limit:
            continue
        key = -n * size + i
        if t > a + ttft_slo_ms:  # heappushpop: the smallest of the heap and the key comes out
            if hn and heap[0] < key:
                key, heap[0] = heap[0], key
                _sift_down(heap, hn, 0)
            j = key % size
            late[nl] = j
            nl += 1
            t += (key - j) // size / tokens_per_ms
        else:  # heappush
            heap[hn] = key
            c = hn
            hn += 1
            while c > 0:
                p = (c - 1) >> 1
                if heap[p] <= heap[c]:
                    break
                heap[p], heap[c] = heap[c], heap[p]
                c = p
    return late[:nl], start + total / tokens_per_ms <= first * 1e3 + ttft_slo_ms


@numba.njit(cache=True, nogil=True)
def _sift_down(heap, hn, c):
    """Restore the min-heap below c after heap[c] grew."""
    while True:
        m = c
        left = 2 * c + 1
        if left < hn and heap[left] < heap[m]:
            m = left
        if left + 1 < hn and heap[left + 1] < heap[m]:
            m = left + 1
        if m == c:
            return
        heap[m], heap[c] = heap[c], heap[m]
        c = m
