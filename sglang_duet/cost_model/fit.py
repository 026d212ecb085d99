"""Fit the roofline's step terms to measured model steps (numpy only, no torch).

The device calibration measures GEMM and copy rates per SM count (the curves) and then real
forward passes of the model on a few partition sizes (rows: decode steps of B requests at context
C, prefills of N tokens). The curves alone under-predict those steps (the model's kernels are not
the sweep's square GEMM and copy) or, with only a launch overhead fitted, miss systematically. This
module fits the few named terms `roofline.CostModel` adds (`hardware.StepTerms`, the attention
efficiency and the launch overhead) to the rows.

The roofline is linear in six parameters once each operator's side of its max() is fixed:

    theta[0] = 1 / gemm_efficiency              x a GEMM's FLOP time at the compute curve's rate
    theta[1] = gemm_pad_rows / gemm_efficiency  x the FLOP time of one of its rows
    theta[2] = 1 / gemm_bandwidth_efficiency    x a GEMM's byte time at the copy curve's rate
    theta[3] = 1 / attention_efficiency         x attention's FLOP time at the compute curve's rate
    theta[4] = activation_traffic               x the byte time of the token-wise operators' one pass
    theta[5] = launch_overhead_s                x the inventory's kernels (the fixed time per step)

so the fit alternates: pick each operator's bound side at the current parameters, solve a bounded
non-negative least squares on the relative errors (every row counts by its error in percent, not in
milliseconds), repeat until the sides stop changing. Bounds say what is physical: no kernel runs
faster than the datasheet (theta[0], theta[3] >= curve peak / datasheet FLOP/s; theta[2] >= the copy's
best / datasheet bytes/s), nothing is negative.

Held-out errors refit without some rows and predict them: leave-one-SM-count-out (every partition
size predicted by a fit that never saw it) and leave-one-shape-out (every (kind, batch, tokens)
predicted by a fit that never saw that shape on any size).
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from .hardware import HardwareSpec, StepTerms
from .roofline import CostModel

GEMM_OPS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
PARAMS = ("gemm_time", "gemm_pad_time", "gemm_byte_time", "attention_time", "activation_bytes", "kernel_s")
_N = len(PARAMS)


@dataclass(frozen=True)
class StepRow:
    """One measured forward pass: `batch` decode rows at `tokens` context, or a prefill of `tokens`."""

    kind: str  # decode | prefill
    sms: int  # granted SM count (the whole GPU: total_sms)
    batch: int
    tokens: int
    measured_ms: float
    source: str = ""  # which file it came from (report rows, step-latency rows)

    def __post_init__(self):
        if self.kind not in ("decode", "prefill"):
            raise ValueError(f"row kind must be decode or prefill, got {self.kind!r}")
        if not (self.measured_ms > 0 and self.batch >= 1 and self.tokens >= 1 and self.sms >= 1):
            raise ValueError(f"bad measured row {self}")

    def shape(self) -> list[tuple[int, int]]:
        if self.kind == "decode":
            return [(1, self.tokens)] * self.batch
        return [(self.tokens, 0)] * self.batch

    @property
    def key(self) -> tuple:
        return (self.kind, self.batch, self.tokens)


# ---- the roofline as a linear function of theta, per side of each max() ---------------------------

@dataclass
class _RowFeatures:
    """sum over ops of max(vc @ theta + cc, vm @ theta + cm), plus va @ theta: seconds."""

    vc: np.ndarray  # ops x N
    cc: np.ndarray  # ops
    vm: np.ndarray
    cm: np.ndarray
    va: np.ndarray  # N

    def predict(self, theta: np.ndarray) -> float:
        return float(np.maximum(self.vc @ theta + self.cc, self.vm @ theta + self.cm).sum() + self.va @ theta)

    def design(self, theta: np.ndarray) -> tuple[np.ndarray, float]:
        """(x, c) with prediction x @ theta + c on each op's currently larger side."""
        comp = self.vc @ theta + self.cc >= self.vm @ theta + self.cm
        x = np.where(comp[:, None], self.vc, self.vm).sum(axis=0) + self.va
        c = float(np.where(comp, self.cc, self.cm).sum())
        return x, c


def bare(spec: HardwareSpec) -> HardwareSpec:
    """`spec`'s curves with every fitted term neutral: the plain inventory at the curves' rates."""
    return dataclasses.replace(spec, step_terms=StepTerms(), attention_efficiency=1.0, launch_overhead_s=0.0)


def _features(cm: CostModel, row: StepRow) -> _RowFeatures:
    hw = cm.hw
    sms = None if row.sms >= hw.total_sms else row.sms
    comp, bw = hw.compute(sms), hw.bandwidth(sms)
    shape = row.shape()
    T, R = sum(q for q, _ in shape), len(shape)
    ops = cm._ops(shape)
    n = len(ops)
    vc, vm = np.zeros((n, _N)), np.zeros((n, _N))
    cc, cmem = np.zeros(n), np.zeros(n)
    va = np.zeros(_N)
    for i, (name, flops, nbytes, kernels, is_attn) in enumerate(ops):
        va[5] += kernels
        if name in GEMM_OPS:
            rows = R if name == "lm_head" else T
            vc[i, 0] = flops / comp
            vc[i, 1] = flops / rows / comp
            vm[i, 2] = nbytes / bw
        elif is_attn:
            vc[i, 3] = flops / comp
            cmem[i] = nbytes / bw
        else:
            cc[i] = flops / comp
            vm[i, 4] = nbytes / bw
    return _RowFeatures(vc, cc, vm, cmem, va)


def theta_of(spec: HardwareSpec) -> np.ndarray:
    """The parameter vector a spec's terms amount to."""
    t = spec.step_terms
    return np.array([1 / t.gemm_efficiency, t.gemm_pad_rows / t.gemm_efficiency, 1 / t.gemm_bandwidth_efficiency,
                     1 / spec.attention_efficiency, t.activation_traffic, spec.launch_overhead_s])


def params_of(theta: Sequence[float]) -> dict:
    """The hardware-file keys of a parameter vector."""
    t = [float(x) for x in theta]
    return {"gemm_efficiency": 1 / t[0], "gemm_pad_rows": t[1] / t[0], "gemm_bandwidth_efficiency": 1 / t[2],
            "attention_efficiency": 1 / t[3], "activation_traffic": t[4], "launch_overhead_s": t[5]}


def apply(spec: HardwareSpec, params: dict) -> HardwareSpec:
    """`spec` with fitted terms (the keys of `params_of`) in place of its own."""
    terms = StepTerms.from_dict({**spec.step_terms.as_dict(), **params})
    return dataclasses.replace(spec, step_terms=terms, attention_efficiency=float(params["attention_efficiency"]),
                               launch_overhead_s=float(params["launch_overhead_s"]))


def lower_bounds(spec: HardwareSpec) -> np.ndarray:
    """Nothing faster than the datasheet: a GEMM or attention FLOP costs at least curve peak /
    datasheet peak of a curve second, a streamed byte at least the copy's best / datasheet bytes/s."""
    c = spec.compute() / spec.peak_flops_bf16 if spec.peak_flops_bf16 > 0 else 0.0
    b = spec.bandwidth() / spec.peak_bandwidth if spec.peak_bandwidth > 0 else 0.0
    c, b = max(c, 1e-3), max(b, 1e-3)  # the efficiencies stay finite
    return np.array([c, 0.0, b, c, 0.0, 0.0])


# ---- bounded non-negative least squares -----------------------------------------------------------

def nnls(A: np.ndarray, y: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """argmin ||A x - y|| subject to x >= 0 (Lawson and Hanson's active-set method)."""
    m, n = A.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = A.T @ (y - A @ x)
    tol = 10 * np.finfo(float).eps * max(1.0, float(np.abs(A).max(initial=0.0))) * max(m, n)
    for _ in range(max_iter or 3 * n + 10):
        if passive.all() or w[~passive].max(initial=-np.inf) <= tol:
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], y, rcond=None)[0]
            if (z[passive] > tol).all():
                break
            # step back to the boundary: the first passive variable to reach zero leaves
            bad = passive & (z <= tol)
            alpha = np.min(x[bad] / np.maximum(x[bad] - z[bad], 1e-300))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
            if not passive.any():
                z = np.zeros(n)
                break
        x = z
        w = A.T @ (y - A @ x)
    return x


# ---- the fit ---------------------------------------------------------------------------------------

@dataclass
class Fit:
    theta: np.ndarray
    params: dict  # hardware-file keys
    rows: list[StepRow]
    predicted_ms: list[float]  # in sample
    iterations: int
    free: tuple[str, ...] = PARAMS

    @property
    def errors(self) -> list[float]:
        return [(p - r.measured_ms) / r.measured_ms for p, r in zip(self.predicted_ms, self.rows)]

    @property
    def median_abs_error(self) -> float | None:
        return median_abs(self.errors)


def median_abs(values: Iterable[float]) -> float | None:
    v = [abs(x) for x in values]
    return statistics.median(v) if v else None


def fit(rows: Sequence[StepRow], cm: CostModel, free: Sequence[str] = PARAMS, max_iter: int = 50) -> Fit:
    """Fit the step terms of `cm.hw` (its curves are kept; the terms not in `free` keep their values)
    to the measured rows. `cm`: the model the rows ran, on the calibrated curves."""
    rows = list(rows)
    if not rows:
        raise ValueError("fit: no measured rows")
    unknown = set(free) - set(PARAMS)
    if unknown:
        raise ValueError(f"fit: unknown terms {sorted(unknown)}; known: {PARAMS}")
    spec = cm.hw
    bcm = CostModel(cm.model, bare(spec), cm.b)
    feats = [_features(bcm, r) for r in rows]
    y = np.array([r.measured_ms / 1e3 for r in rows])
    mask = np.array([p in free for p in PARAMS])
    lb = np.where(mask, lower_bounds(spec), 0.0)
    theta = np.maximum(theta_of(spec), lb)
    best, best_obj = theta.copy(), _objective(feats, y, theta)
    it = 0
    for it in range(1, max_iter + 1):
        X = np.empty((len(rows), _N))
        c = np.empty(len(rows))
        for i, f in enumerate(feats):
            X[i], c[i] = f.design(theta)
        # relative residuals: (X theta + c - y) / y, theta = lb + phi on the free terms
        fixed = np.where(mask, lb, theta)
        A = X[:, mask] / y[:, None]
        rhs = (y - c - X @ fixed) / y
        new = fixed.copy()
        new[mask] += nnls(A, rhs)
        obj = _objective(feats, y, new)
        if obj < best_obj:
            best, best_obj = new.copy(), obj
        if np.allclose(new, theta, rtol=1e-12, atol=0.0):
            break
        theta = new
    predicted = [f.predict(best) * 1e3 for f in feats]
    return Fit(best, params_of(best), rows, predicted, it, tuple(free))


def _objective(feats, y, theta) -> float:
    return float(sum(((f.predict(theta) - t) / t) ** 2 for f, t in zip(feats, y)))


def held_out(rows: Sequence[StepRow], cm: CostModel, group: Callable[[StepRow], object],
             free: Sequence[str] = PARAMS) -> list[float | None]:
    """Each row's prediction (ms) by a fit on the rows of the other groups (None where the rest is
    empty): every group left out once."""
    rows = list(rows)
    out: list[float | None] = [None] * len(rows)
    groups = {group(r) for r in rows}
    if len(groups) < 2:
        return out
    for g in groups:
        train = [r for r in rows if group(r) != g]
        f = fit(train, cm, free)
        model = CostModel(cm.model, apply(cm.hw, f.params), cm.b)
        for i, r in enumerate(rows):
            if group(r) == g:
                out[i] = predict_ms(model, r)
    return out


def predict_ms(cm: CostModel, row: StepRow) -> float:
    sms = None if row.sms >= cm.hw.total_sms else row.sms
    return cm.batch_time(row.shape(), sms) * 1e3


def rel_errors(predicted: Sequence[float | None], rows: Sequence[StepRow]) -> list[float | None]:
    return [None if p is None else (p - r.measured_ms) / r.measured_ms for p, r in zip(predicted, rows)]


@dataclass
class Evaluation:
    """A fit and its held-out checks, row by row (ms)."""

    fit: Fit
    before_ms: list[float]  # the uncalibrated (shipped) model
    held_out_size_ms: list[float | None]  # leave-one-SM-count-out
    held_out_shape_ms: list[float | None]  # leave-one-(kind, batch, tokens)-out
    summary: dict = field(default_factory=dict)


def evaluate(rows: Sequence[StepRow], cm: CostModel, before: CostModel, free: Sequence[str] = PARAMS) -> Evaluation:
    """Fit on all rows, and the two held-out protocols; `before`: the model before calibration."""
    rows = list(rows)
    f = fit(rows, cm, free)
    ev = Evaluation(f, [predict_ms(before, r) for r in rows], held_out(rows, cm, lambda r: r.sms, free),
                    held_out(rows, cm, lambda r: r.key, free))
    ev.summary = {
        "rows": len(rows),
        "median_abs_error_before": median_abs(rel_errors(ev.before_ms, rows)),
        "median_abs_error_in_sample": f.median_abs_error,
        "median_abs_error_held_out_sm_count": median_abs(
            e for e in rel_errors(ev.held_out_size_ms, rows) if e is not None),
        "median_abs_error_held_out_shape": median_abs(
            e for e in rel_errors(ev.held_out_shape_ms, rows) if e is not None),
        "max_abs_error_in_sample": max(abs(e) for e in f.errors),
    }
    return ev


# ---- measurement files -----------------------------------------------------------------------------

def rows_from_report(report: dict, source: str = "calibrate") -> list[StepRow]:
    """The model-step rows of a calibration report (`<out>.report.json` of the device run)."""
    return [StepRow(r["kind"], int(r["sms"]), int(r["batch"]), int(r["tokens"]), float(r["measured_ms"]), source)
            for r in report.get("rows") or [] if r.get("measured_ms")]


def rows_from_step_latency(results: dict, total_sms: int, source: str = "step_latency") -> list[StepRow]:
    """The rows of benchmark/step_latency.py's results.json: whole-GPU steps (skipped rows dropped)."""
    return [StepRow(r["kind"], total_sms, int(r["batch"]), int(r["tokens"]), float(r["measured_ms"]), source)
            for r in results.get("rows") or [] if r.get("measured_ms")]
