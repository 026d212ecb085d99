"""Pricing from batch summaries: the roofline's view of a batch as four sums, priced for many
candidate batches in one numpy expression (duet's search). Re-exported by `policies.base`."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from sglang_duet.policies import search_kernels_loader as search_kernels

# ---- pricing from batch summaries ---------------------------------------------------------------
#
# The roofline prices a batch from four sums over its requests (q new tokens, c cached): T = sum q,
# R = number of requests, A = sum q * (c + (q + 1) / 2) (causal attention pairs) and K = sum (c + q)
# (K/V tokens read). Every operator's FLOPs and bytes are affine in (T, R, A, K), so a search that
# prices hundreds of candidate batches can keep four numbers per batch and price them all in one
# numpy expression instead of walking request lists through the cost model per candidate.


@dataclass(frozen=True)
class Summary:
    """The roofline's view of one step of a batch: (T, R, A, K) as above."""

    T: float = 0.0
    R: float = 0.0
    A: float = 0.0
    K: float = 0.0

    def __add__(self, o: "Summary") -> "Summary":
        return Summary(self.T + o.T, self.R + o.R, self.A + o.A, self.K + o.K)

    @property
    def empty(self) -> bool:
        return self.R == 0

    @classmethod
    def of(cls, shape) -> "Summary":
        T = R = A = K = 0.0
        for q, c in shape:
            T += q
            R += 1
            A += q * (c + (q + 1) / 2)
            K += c + q
        return cls(T, R, A, K)

    @classmethod
    def decodes(cls, n: int, cached: float, step: int = 0) -> "Summary":
        """n decodes whose cached tokens sum to `cached`, `step` steps into a look-ahead launch."""
        a = cached + n * (1 + step)
        return cls(n, n, a, a)


def prefill_summary(chunks) -> Summary:
    return Summary.of([(c.length, c.start) for c in chunks])


def pairwise_sum(values: list[float]) -> float:
    """The sum of `values` as numpy adds a float64 array (np.add.reduce: eight running sums over
    blocks of up to 128, halves above that), for a few dozen numbers without numpy's per-call cost;
    the same float, bit for bit (tests/test_duet_policy.py checks it against numpy)."""
    n = len(values)
    if n < 8:
        s = 0.0
        for x in values:
            s += x
        return s
    if n > 128:
        half = n // 2
        half -= half % 8
        return pairwise_sum(values[:half]) + pairwise_sum(values[half:])
    # the eight running sums as locals, a block unpacked at a time (no indexing per number)
    r0, r1, r2, r3, r4, r5, r6, r7 = values[:8]
    end = n - n % 8
    for i in range(8, end, 8):
        a0, a1, a2, a3, a4, a5, a6, a7 = values[i:i + 8]
        r0 += a0; r1 += a1; r2 += a2; r3 += a3; r4 += a4; r5 += a5; r6 += a6; r7 += a7  # noqa: E702
    s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for x in values[end:]:
        s += x
    return s


@dataclass
class Priced:
    """What `SummaryPricer.ms_prepared` priced: ms per row, and per row each operator's scaled
    compute ms, then its scaled memory ms, then the scaled launch overheads (None when the pricer
    is not exact)."""

    t: np.ndarray
    P: np.ndarray | None
    ops: int
    compiled: bool = False  # parts from the compiled loop (the same numbers)

    def parts(self, lo: int, hi: int, compute_scale: float, bandwidth_scale: float) -> tuple[float, float]:
        """(compute-bound ms, memory-bound ms) of rows lo..hi, unscaled: what a calibration regresses
        measured times on (the whole time counts as compute for a pricer that is not exact)."""
        return self.parts_of_ranges([(lo, hi, compute_scale, bandwidth_scale)])[0]

    def parts_of_ranges(self, ranges) -> list[tuple[float, float]]:
        """`parts` of several (lo, hi, compute_scale, bandwidth_scale) row ranges. In Python: a
        launch's rows are a few dozen numbers, fewer than numpy's per-call cost, summed as numpy
        sums them (`pairwise_sum`), so the numbers are those of the numpy expression in `_parts`."""
        if self.P is None:
            return [(float(self.t[lo:hi].sum()) / max(a, b), 0.0) for lo, hi, a, b in ranges]
        if self.compiled:
            out = search_kernels.kernels().parts_of_ranges(self.P, self.t, self.ops, np.array(ranges, dtype=float))
            return [(c, m) for c, m in out.tolist()]
        ops = self.ops
        out = []
        for lo, hi, a, b in ranges:
            comp, mem, over = [], [], []
            for row, t in zip(self.P[lo:hi].tolist(), self.t[lo:hi].tolist()):
                if not t > 0:
                    continue  # an empty row counts nothing
                for z, y in zip(row[:ops], row[ops:2 * ops]):
                    if z >= y:
                        comp.append(z)
                    else:
                        mem.append(y)
                over.append(row[-1])
            out.append((pairwise_sum(comp) / a, (pairwise_sum(mem) + pairwise_sum(over)) / b))
        return out

    def _parts(self, lo: int, hi: int, compute_scale: float, bandwidth_scale: float) -> tuple[float, float]:
        """`parts` as one numpy expression (the reference the Python sums equal, for tests)."""
        rows = self.P[lo:hi][self.t[lo:hi] > 0]
        Z, Y = rows[:, :self.ops], rows[:, self.ops:2 * self.ops]
        bound = Z >= Y
        return (float(Z[bound].sum()) / compute_scale,
                (float(Y[~bound].sum()) + float(rows[:, -1].sum())) / bandwidth_scale)


@dataclass
class BlockLayout:
    """`SummaryPricer.layout`: which of X's rows each priced row is, its `prepare` factors, and the
    priced rows of each block."""

    take: np.ndarray
    prepared: np.ndarray
    spans: list
    block: np.ndarray  # each priced row's block
    identity: bool = False  # one block, one SM count, from row 0: the priced rows are X's first rows
    # `prepared` as its distinct rows (each block's `prepare` rows, in order) and each priced row's
    # index among them: what the compiled search reads (a few KB instead of a row per priced row)
    prep_rows: np.ndarray | None = None
    prep_of: np.ndarray | None = None
    _scales: np.ndarray | None = None  # the last scale rows seen, and them per priced row
    _scale: np.ndarray | None = None

    def scale(self, scales: np.ndarray) -> np.ndarray:
        """The scale row of each priced row's block (`scales` one row per block), rebuilt only when
        `scales` is another array (callers pass the same array while their calibration stands)."""
        if scales is not self._scales:
            self._scales, self._scale = scales, scales.take(self.block, axis=0)
        return self._scale


class SummaryPricer:
    """Milliseconds per step from batch summaries: the cost model's `batch_time`, vectorised.

    The per-operator affine coefficients are read off the cost model's own operator inventory on
    a few probe batches and checked against `batch_time` on random batches at construction. A cost
    model that is not affine in the summary (or has no operator inventory) is priced through
    `batch_time` on a representative shape per row instead (`exact` is then False: slower, exact
    for batches of equal requests, approximate for others)."""

    _PROBES = ([(1, 0)], [(1, 100)], [(2, 0)], [(1, 0), (1, 0)], [(10, 5)])

    def __init__(self, cost_model):
        self.cm = cost_model
        self.hw = cost_model.hw
        total = self.hw.total_sms
        # (compute, attention compute, bandwidth) per ms on s SMs, s = 0..total (0 means all SMs)
        self._rates = np.array([self._rate(s or None) for s in range(total + 1)])
        self._overhead_ms = 0.0
        self.exact = False
        try:
            self._fit()
            self.exact = True  # so that _check prices through the fit
            self.exact = self._check()
        except Exception:  # noqa: BLE001 - any mismatch: fall back to the cost model itself
            self.exact = False

    def _rate(self, sms):
        comp = self.hw.compute(sms) / 1e3
        return comp, comp * self.hw.attention_efficiency, self.hw.bandwidth(sms) / 1e3

    def _fit(self) -> None:
        rows, vals = [], []
        for shape in self._PROBES:
            s = Summary.of(shape)
            rows.append([1.0, s.T, s.R, s.A, s.K])
            vals.append([(f, b) for _, f, b, _, _ in self.cm._ops(shape)])
        X = np.array(rows)
        if np.linalg.matrix_rank(X) < 5:
            raise ValueError("probe batches do not span the summary space")
        ops = self.cm._ops(self._PROBES[0])
        F = np.array([[v[i][0] for v in vals] for i in range(len(ops))])  # ops x probes
        B = np.array([[v[i][1] for v in vals] for i in range(len(ops))])
        Xi = np.linalg.inv(X)
        self._cf = np.ascontiguousarray((F @ Xi.T).T)  # 5 x ops: flops = [1, T, R, A, K] @ _cf
        self._cb = np.ascontiguousarray((B @ Xi.T).T)
        self._attn = np.array([bool(o[4]) for o in ops])
        self._overhead_ms = float(sum(o[3] for o in ops)) * self.hw.launch_overhead_s * 1e3
        # `ms_fused`'s one matrix: per operator flops | bytes, then a constant column for the
        # kernel launch overheads (its factor is overhead ms times the bandwidth scale)
        one = np.zeros((5, 1))
        one[0, 0] = 1.0
        self._w = np.ascontiguousarray(np.concatenate([self._cf, self._cb, one], axis=1))
        self._w_const, self._w_rows = self._w[0], self._w[1:]  # views, kept: ms_blocks runs every plan

    def _check(self) -> bool:
        rng = random.Random(1234)
        grid = self.hw.partition_grid()
        for _ in range(6):
            shape = [(rng.choice([1, 1, 1, rng.randint(1, 4000)]), rng.randint(0, 30000))
                     for _ in range(rng.randint(1, 40))]
            s = Summary.of(shape)
            for sms in (None, grid[0], grid[-1]):
                want = self.cm.batch_time(shape, sms) * 1e3
                got = float(self.ms(np.array([[s.T, s.R, s.A, s.K]]), np.array([sms or 0]))[0])
                if abs(got - want) > 1e-9 * max(1.0, want):
                    return False
        return True

    def ms(self, X: np.ndarray, sms: np.ndarray) -> np.ndarray:
        """Milliseconds of one step per row of X = [[T, R, A, K], ...] on sms[i] SMs (0: all SMs);
        0 for an empty row (R = 0)."""
        X = np.asarray(X, dtype=float)
        sms = np.asarray(sms, dtype=int)
        if not self.exact:
            return np.array([self._slow(x, int(m)) for x, m in zip(X, sms)])
        r = self._rates[sms]  # n x 3
        Z = X @ self._cf[1:] + self._cf[0]  # flops, n x ops
        Y = X @ self._cb[1:] + self._cb[0]  # bytes
        comp = np.where(self._attn, r[:, 1:2], r[:, 0:1])
        t = np.maximum(Z / comp, Y / r[:, 2:3]).sum(axis=1) + self._overhead_ms
        return np.where(X[:, 1] > 0, t, 0.0)

    def prepare(self, sms: np.ndarray) -> np.ndarray:
        """Per-row factors for `ms_prepared` (cache them when the same SM pattern recurs): for each
        operator 1/compute rate, then for each 1/bandwidth, then the kernel launch overheads in ms
        (the SM counts themselves for a pricer that is not exact)."""
        sms = np.asarray(sms, dtype=int)
        if not self.exact:
            return sms
        r = self._rates[sms]
        ops = len(self._attn)
        return np.concatenate([1.0 / np.where(self._attn, r[:, 1:2], r[:, 0:1]), np.repeat(1.0 / r[:, 2:3], ops, axis=1),
                               np.full((len(r), 1), self._overhead_ms)], axis=1)

    def scale_rows(self, scales) -> np.ndarray:
        """One factor row per (compute_scale, bandwidth_scale): a device whose compute takes
        compute_scale and whose memory traffic (and kernel overheads, fixed per kernel like host
        time) take bandwidth_scale times the model's."""
        if not self.exact:
            return np.array([[max(a, b)] for a, b in scales])
        ops = len(self._attn)
        return np.repeat(np.array(scales, dtype=float), (ops, ops + 1), axis=1)

    @property
    def weights(self) -> tuple[np.ndarray, np.ndarray, int]:
        """(W, the constant row, operators per row): what `product` multiplies, for the compiled search."""
        return self._w_rows, self._w_const, len(self._attn)

    def product(self, X: np.ndarray) -> np.ndarray:
        """Each operator's flops | bytes | overhead column of the rows X = [[T, R, A, K], ...]: X @ W
        plus the constant row, as four products added in order (no BLAS: a matrix product's
        rounding depends on the library and on the matrix's shape), so every row gives the same
        numbers alone or in any batch, on any machine, and in the compiled search
        (search_kernels.price_rows, which adds them in the same order)."""
        W = self._w_rows
        P = X[:, 0:1] * W[0]
        P += X[:, 1:2] * W[1]
        P += X[:, 2:3] * W[2]
        P += X[:, 3:4] * W[3]
        P += self._w_const
        return P

    def ms_prepared(self, X: np.ndarray, prepared, scale) -> "Priced":
        """`ms(X, sms)` with `prepared = prepare(sms)`, each row scaled by `scale` (a row of
        `scale_rows`, or one per row of X), in a few whole-array operations (plan() overhead is numpy
        call count). The result keeps each operator's scaled times for `Priced.parts`."""
        if not self.exact:  # a scale row here is one factor (scale_rows): it broadcasts over the rows
            return Priced(self.ms(X, prepared) * np.ravel(scale), None, 0)
        P = self.product(X)
        P *= prepared
        P *= scale
        ops = len(self._attn)
        t = np.maximum(P[:, :ops], P[:, ops:2 * ops]).sum(axis=1)
        t += P[:, -1]
        t[X[:, 1] <= 0] = 0.0
        return Priced(t, P, ops)

    def layout(self, blocks) -> "BlockLayout":
        """The rows `ms_blocks` prices for blocks (lo, hi, prepared): rows lo..hi of its X on each
        row of `prepared` (`prepare` of SM counts), block by block, then by SM count, then by row.
        Build it once per shape and reuse it (plan() overhead is numpy call count)."""
        take, prep, spans, at = [], [], [], 0
        rows, of, first = [], [], 0
        for lo, hi, p in blocks:
            p = np.asarray(p)
            take.append(np.tile(np.arange(lo, hi), len(p)))
            prep.append(np.repeat(p, hi - lo, axis=0))
            rows.append(p)
            of.append(np.repeat(np.arange(first, first + len(p)), hi - lo))
            first += len(p)
            spans.append((at, at + len(p) * (hi - lo)))
            at += len(p) * (hi - lo)
        block = np.repeat(np.arange(len(spans)), [hi - lo for lo, hi in spans])
        empty = np.zeros((0,) + np.shape(self.prepare(np.zeros(0, int)))[1:])
        return BlockLayout(np.concatenate(take) if take else np.zeros(0, dtype=int),
                           np.concatenate(prep) if prep else empty,
                           spans, block, len(blocks) == 1 and blocks[0][0] == 0 and len(blocks[0][2]) == 1,
                           prep_rows=np.ascontiguousarray(np.concatenate(rows)) if rows else empty,
                           prep_of=np.concatenate(of) if of else np.zeros(0, dtype=int))

    def ms_blocks(self, X: np.ndarray, layout: "BlockLayout", scales: np.ndarray, nonempty: bool = False) -> "Priced":
        """`ms_prepared` of the rows of `layout` (X's rows once per SM count of their block), block
        i scaled by the scale row scales[i]. X's rows are multiplied out once, not once per SM
        count: a row's product does not depend on the other rows (`product`), so the numbers are
        those of `ms_prepared` on the expanded rows. `nonempty`: the
        caller knows every row has a request (R > 0), so none is zeroed. search_kernels.price_rows is
        the same, compiled."""
        if not self.exact:  # a scale row is one factor here (`scale_rows`)
            return Priced(self.ms(X.take(layout.take, axis=0), layout.prepared) * layout.scale(scales)[:, 0], None, 0)
        base = self.product(X)
        P = base if layout.identity and len(base) == len(layout.take) else base.take(layout.take, axis=0)
        P *= layout.prepared
        # each block by its scale row, in place: the calibration moves after every launch, so a
        # per-row scale array gathered for the layout would be rebuilt for nearly every plan
        for (lo, hi), scale in zip(layout.spans, scales):
            P[lo:hi] *= scale
        ops = len(self._attn)
        t = np.add.reduce(np.maximum(P[:, :ops], P[:, ops:2 * ops]), axis=1)
        t += P[:, -1]
        if not nonempty:
            empty = X[:, 1] <= 0
            if np.count_nonzero(empty):
                t[empty.take(layout.take)] = 0.0
        return Priced(t, P, ops)

    def work_weights(self) -> tuple[float, float]:
        """(ms per new token, ms per causal attention pair) of compute on the whole GPU: a prefill's
        work in ms of ideal compute is wT * T + wA * A, whatever its chunking and wherever it runs
        (each token's GEMMs and its attention to every earlier token are done once)."""
        comp, attn, _ = self._rates[0]
        if not self.exact:
            if not hasattr(self.cm, "_ops"):
                return self._work_from_batch_time()
            T = self.cm._ops([(1, 0)])
            return sum(f for _, f, _, _, a in T if not a) / comp, 4 * self.cm.H * self.cm.hd * self.cm.L / attn
        return float(self._cf[1, ~self._attn].sum()) / comp, float(self._cf[3, self._attn].sum()) / attn

    def _work_from_batch_time(self, n: int = 1024, cached: int = 4096) -> tuple[float, float]:
        """`work_weights` of a cost model that only answers `batch_time` (no operator inventory:
        e.g. `constant.ConstantCostModel`, whose every step costs the same): fitted on two n-token
        prefills on the whole GPU, one fresh and one after `cached` tokens, which differ only in
        attention pairs. A model whose time does not grow with context gets wA = 0 (its work is
        its tokens); neither weight is negative, and wT stays positive so work still orders batches."""
        fresh = self.cm.batch_time([(n, 0)]) * 1e3
        late = self.cm.batch_time([(n, cached)]) * 1e3
        pairs_fresh, pairs_late = n * (n + 1) / 2, n * (cached + (n + 1) / 2)
        w_a = max(0.0, (late - fresh) / (pairs_late - pairs_fresh))
        w_t = max((fresh - w_a * pairs_fresh) / n, 1e-12)
        return w_t, w_a

    def summary_ms(self, s: Summary, sms: int | None = None) -> float:
        return float(self.ms(np.array([[s.T, s.R, s.A, s.K]]), np.array([sms or 0]))[0])

    def _slow(self, x, sms: int) -> float:
        T, R, A, K = x
        if R <= 0:
            return 0.0
        n = int(round(R))
        q = max(1, int(round(T / n)))
        c = max(0, int(round(K / n)) - q)
        return self.cm.batch_time([(q, c)] * n, sms or None) * 1e3
