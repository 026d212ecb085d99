"""A cost model that describes the CPU the server runs on, fitted from timed forward passes.

The shipped hardware files describe GPUs. On a CPU, `--policy duet` priced a step with the H100's
roofline and believed a 6000-token prefill takes ~30 ms when it takes tens of seconds, so its TBT
SLO promised nothing. Here, at start-up, a few forward passes of the actual model (prefill chunks
of several lengths, decode batches of several sizes and contexts) are timed, and three numbers are
fitted so that the roofline's own formula (plus two host terms) reproduces them:

    step time = sum over operators of max(FLOPs / rate, bytes / bandwidth) + per_step + per_request * R

with rate = `compute` (FLOP/s of the matmuls: the time per prefill token) or, for attention,
`attention` (FLOP/s of the CPU attention kernel, far below the matmuls': how a step grows with
context); `bandwidth` (bytes/s: weights and KV read per step); `per_step` and `per_request` (host
time: Python and dispatch per forward pass, and per request of the batch R, which dominate a small
model's decode on a CPU). They
replace the base hardware's curves (scaled to the fitted whole-device values; its SM grid is kept
so every policy's code runs unchanged), so `CostModel` and every policy helper that reads the
hardware (SummaryPricer, LatencyModel) plan with CPU times.

A shared machine's load only ever adds time, in bursts: each shape is timed in several interleaved
rounds and its time is the minimum (`measure`), the host terms are bounded by the fastest step
(`fit`). How long the process's threads waited for a CPU during a run (the kernel's run delay)
tells an undisturbed run from one another process slowed; a shape is re-timed until one run is undisturbed,
within a time limit, and a fit with a shape that never was, or whose points disagree, is used but
not cached. The fit is cached by (model config,
dtype, threads, CPU, attention backend, torch version, TP size and nodes) in
~/.cache/sglang_duet/cpu-calibration/, so only the first start with a model on a machine pays the
timing (a few seconds). EngineCore builds its policy with it (`calibrated_cost_model`), once.

SGLANG_DUET_CPU_COST_MODEL=0 keeps the configured (GPU) hardware file instead. With no --policy, a
CPU server runs `chunked` with a budget sized from this fit (`cpu_budget.py`).
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from .hardware import Curves, HardwareSpec, StepTerms
from .roofline import CostModel

logger = logging.getLogger(__name__)

COST_MODEL_ENV = "SGLANG_DUET_CPU_COST_MODEL"  # "0": no calibration, the --hardware file stays
CALIBRATION_VERSION = 3  # 3: interleaved rounds, minimum per shape, long-context shapes, bounded host terms
# Policies that plan with the cost model (the others get the calibrated one too if asked, but a
# start-up of the default policy does not pay for timing it does not use).
CALIBRATED_POLICIES = frozenset({"chunked", "duet", "duet-paper", "static-split"})
PREFILL_LENGTHS = (16, 128, 512)
DECODE_SHAPES = ((1, 32), (8, 32), (8, 512), (32, 128))  # (batch, context)
CACHED_PREFILLS = ((64, 448),)  # (new, cached): attention of a chunk after earlier ones
# After LONG_CONTEXT cached tokens (or what the pool allows): a 32-token chunk and a batch of 4
# decodes. Without them attention was extrapolated from 448 cached tokens, and a fit made under
# load priced a 32-token chunk after 2968 tokens at 0.38 s or at 1.1 s when it took 0.58 s.
LONG_CONTEXT = 2048
LONG_SHAPES = ((32, 1), (1, 4))  # (new tokens, batch)
TIME_BUDGET_S = 8.0  # stop adding (longer) points once the timing took this long...
MIN_POINTS = 8  # ...but not before this many: the fit has 5 parameters
# Every shape is timed once per round, the rounds interleaved, and its time is the minimum: load on
# a shared machine only ever adds time, and a burst of it (another process's seconds of work) then
# slows one round of every shape instead of every run of a few shapes. MIN_ROUNDS rounds (2 once
# the timing took 3 budgets: a large model), then the shapes without a clean run (below) again, up
# to MAX_ROUNDS runs each and while the timing took less than 3 budgets.
MIN_ROUNDS = 3
MAX_ROUNDS = 6
# A run is clean when this process's threads together waited for a CPU (runnable, another process
# on it) at most this long per second of the run: on the 2-core test machine, runs that other
# processes slowed 2-50x waited 0.5-1.3 s per second (2 threads). A shape's time is its fastest
# clean run.
CLEAN_DELAY = 0.2
# A fit whose median relative error exceeds this is used for this run but not cached (the next
# start times again): the points disagree with each other, as when the machine was busy throughout.
MAX_CACHED_ERR = 0.25


@dataclass
class CpuCalibration:
    key: str
    compute: float  # FLOP/s of the matmuls
    attention: float  # FLOP/s of attention
    bandwidth: float  # bytes/s
    per_step_s: float  # host time of a forward pass whatever its size
    per_request_s: float  # host time per request in the batch (metadata, per-request attention calls)
    points: list = field(default_factory=list)  # [{"reqs": [[q, c], ...], "seconds": t}, ...]
    median_rel_err: float = 0.0  # of the fitted model on the points
    created: str = ""
    rounds: int = 0  # timed runs of each shape (its time is their minimum)
    load_avg: float = 0.0  # the 1-minute load average when the timing ended
    cpus: int = 0  # os.cpu_count() then
    busy_shapes: int = 0  # shapes none of whose runs had the CPU to itself (such a fit is not cached)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "CpuCalibration":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class CpuCostModel(CostModel):
    """The roofline with the CPU's fitted rates, plus two host-time operators a GPU model has no
    need of: a fixed time per forward pass and a time per request in the batch. They are expressed
    as operators (bytes at the device's bandwidth) so that everything reading the operator
    inventory (policies' SummaryPricer) prices exactly what `batch_time` does."""

    def __init__(self, model, hw: HardwareSpec, dtype_bytes: int, per_step_s: float, per_request_s: float):
        super().__init__(model, hw, dtype_bytes)
        bw = hw.bandwidth()
        self._step_bytes = per_step_s * bw
        self._request_bytes = per_request_s * bw

    def _ops(self, reqs):
        ops = super()._ops(reqs)
        if reqs:
            ops = ops + [("cpu_host_step", 0.0, self._step_bytes, 0, False),
                         ("cpu_host_requests", 0.0, self._request_bytes * len(reqs), 0, False)]
        return ops


# ---- fitting (pure Python) ------------------------------------------------------------------


def _features(cm: CostModel, reqs) -> tuple[list, int]:
    return [(f, b, a) for _, f, b, _, a in cm._ops(reqs)], len(reqs)


def _predict(feat, p) -> float:
    ops, n = feat
    compute, attention, bandwidth, per_step, per_req = p
    return sum(max(f / (attention if a else compute), b / bandwidth) for f, b, a in ops) + per_step + per_req * n


def _rel_errs(feats, times, p) -> list[float]:
    return [abs(_predict(ft, p) - t) / t for ft, t in zip(feats, times)]


def fit(cm: CostModel, points) -> tuple[tuple[float, ...], float]:
    """(compute, attention, bandwidth, per_step_s, per_request_s) minimising the relative error of
    the CPU roofline on `points` [(reqs, seconds, ...)] (cm: the base roofline, for the operators'
    FLOPs and bytes), and its median relative error. A start from the additive model's
    non-negative least squares, then a multiplicative coordinate search under the max().

    The host terms are bounded by what was measured: per_step + per_request * R never exceeds a
    point's time (host time cannot be longer than the step it is part of). Without the bound, points
    that disagree (a busy machine) were "explained" by a host time longer than the fastest step, as
    in a fit of 312 ms per step and nothing per token when a decode step took 58 ms."""
    feats = [_features(cm, p[0]) for p in points]
    times = [p[1] for p in points]
    sizes = [n for _, n in feats]
    rows = []
    for (ops, n), t in zip(feats, times):
        F = sum(f for f, _, a in ops if not a)
        A = sum(f for f, _, a in ops if a)
        B = sum(b for _, b, _ in ops)
        rows.append((F / t, A / t, B / t, 1.0 / t, n / t))
    best = None
    for mask in range(1, 32):  # non-negative least squares by trying each support set
        cols = [j for j in range(5) if mask >> j & 1]
        sol = _lstsq([[r[j] for j in cols] for r in rows], [1.0] * len(rows))
        if sol is None or any(x <= 0 for x in sol):
            continue
        coef = [0.0] * 5
        for j, x in zip(cols, sol):
            coef[j] = x
        err = sum((sum(r[j] * coef[j] for j in range(5)) - 1.0) ** 2 for r in rows)
        if best is None or err < best[0]:
            best = (err, coef)
    coef = best[1] if best else [1e-11, 1e-11, 1e-10, 1e-3, 1e-4]
    inv = [1.0 / c if c > 0 else 1e16 for c in coef[:3]]
    p = [inv[0], inv[1], inv[2], max(coef[3], 1e-6), max(coef[4], 1e-7)]

    def host_ok(q) -> bool:
        return all(q[3] + q[4] * n <= t for n, t in zip(sizes, times))

    def score(q):
        if not host_ok(q):
            return math.inf
        return statistics.fmean(e * e for e in _rel_errs(feats, times, q))

    def search(p):
        cur = score(p)
        for _ in range(200):
            improved = False
            for i in range(5):  # big steps too: under max() a rate far off sits on a plateau
                for f in (1e-3, 1e-2, 0.1, 0.3, 0.5, 0.7, 0.85, 0.95, 1.05, 1.2, 1.4, 2.0, 3.0, 10.0, 100.0, 1e3):
                    trial = list(p)
                    trial[i] *= f
                    sc = score(trial)
                    if sc < cur:
                        p, cur, improved = trial, sc, True
            if not improved:
                break
        return cur, p

    # from the least squares, and from a device where every term matters (a second basin under max())
    t_min = min(times)
    starts = [p, [p[0], p[1], p[2] if p[2] < 1e15 else 1e10, t_min / 2, t_min / 20]]
    best_score, p = min((search(_within_host_bound(q, sizes, times)) for q in starts), key=lambda r: r[0])
    return tuple(p), statistics.median(_rel_errs(feats, times, p))


def _within_host_bound(p: list, sizes: list[int], times: list[float]) -> list:
    """p with its host terms shrunk until per_step + per_request * R stays below every point's time
    (0.9 of it: the search starts inside the bound, where the other terms still have room)."""
    q = list(p)
    q[3] = min(q[3], 0.45 * min(times))
    q[4] = min([q[4]] + [(0.9 * t - q[3]) / n for n, t in zip(sizes, times)])
    return q


def _lstsq(a: list[list[float]], y: list[float]) -> list[float] | None:
    """Normal equations for a few columns (Gaussian elimination); None when singular."""
    n = len(a[0])
    m = [[sum(r[i] * r[j] for r in a) for j in range(n)] + [sum(r[i] * v for r, v in zip(a, y))] for i in range(n)]
    for i in range(n):
        p = max(range(i, n), key=lambda r: abs(m[r][i]))
        if abs(m[p][i]) < 1e-300:
            return None
        m[i], m[p] = m[p], m[i]
        for r in range(n):
            if r != i:
                k = m[r][i] / m[i][i]
                m[r] = [x - k * z for x, z in zip(m[r], m[i])]
    return [m[i][n] / m[i][i] for i in range(n)]


def cpu_spec(base: HardwareSpec, cal: CpuCalibration) -> HardwareSpec:
    """`base` with its curves scaled to the CPU's fitted values (its SM grid kept as a convention)."""
    return dataclasses.replace(
        base, name=f"cpu-calibrated ({platform.machine()})",
        curves=Curves(compute=base.curves.compute.scaled(cal.compute / base.compute()),
                      bandwidth=base.curves.bandwidth.scaled(cal.bandwidth / base.bandwidth())),
        launch_overhead_s=0.0, attention_efficiency=cal.attention / cal.compute, green_contexts=False,
        step_terms=StepTerms(),  # a GPU calibration's fitted terms describe its kernels, not the CPU's
        source=f"cpu-calibration:{cal.key}",
        measured={"compute": cal.compute, "attention": cal.attention, "bandwidth": cal.bandwidth,
                  "per_step_s": cal.per_step_s, "per_request_s": cal.per_request_s,
                  "median_rel_err": cal.median_rel_err, "points": len(cal.points)})


def cpu_cost_model(model_config, base: HardwareSpec, cal: CpuCalibration, dtype_bytes: int) -> CpuCostModel:
    return CpuCostModel(model_config, cpu_spec(base, cal), dtype_bytes, cal.per_step_s, cal.per_request_s)


# ---- timing the model -----------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform says (also for benchmark reports)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibration_key(model_config, dtype: str, attn_name: str, tp_size: int = 1, nnodes: int = 1,
                    cpu_paths: tuple[str, ...] = ()) -> str:
    """What the timings depend on: the model, its dtype, the threads per rank, the CPU, the attention
    backend, torch's version, the tensor-parallel layout (a rank's shard shrinks with the TP size, and
    every forward pays its all-reduces over gloo, on one host or across several), and the CPU fast paths
    the executor runs (`cpu_paths`: "packed", oneDNN's blocked weights, a 16-request step 1.5x faster;
    "compiled", the torch.compile'd decode step, 10-20% faster again)."""
    import torch

    cfg = dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else vars(model_config)
    cfg = {k: v for k, v in cfg.items() if k not in ("name", "path", "model_path")}
    blob = json.dumps({"v": CALIBRATION_VERSION, "cfg": cfg, "dtype": dtype, "threads": torch.get_num_threads(),
                       "cpu": cpu_name(), "attn": attn_name, "torch": torch.__version__, "tp": int(tp_size),
                       "nnodes": int(nnodes), **({"paths": sorted(cpu_paths)} if cpu_paths else {})},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir() -> str:
    from sglang_duet.model_loader.embedded import cache_root

    return os.path.join(cache_root(), "cpu-calibration")


class TimedShape(NamedTuple):
    reqs: list  # [(new, cached), ...]
    seconds: float  # the minimum of the clean samples (of all samples when none is clean)
    samples: list  # one time per run
    delays: list = []  # per run: seconds this process's threads waited for a CPU, per second of it

    @property
    def clean(self) -> bool:
        """Whether one run had the CPU to itself (or no wait clock was read)."""
        return not self.delays or min(self.delays) <= CLEAN_DELAY


def calibration_shapes(capacity: int, context_length: int) -> list[list]:
    """The batches to time, cheapest first: [(new, cached), ...] each."""
    limit = min(capacity, context_length) - 1
    shapes = [[(t, 0)] for t in PREFILL_LENGTHS if t <= limit]
    # A batch never holds more KV than the pool (nor than the two-lane executor's static decode
    # buffers, sized from the pool): a small pool shortens the decode contexts instead.
    decode_ctx = [(b, min(c, capacity // b - 1, limit - 1)) for b, c in DECODE_SHAPES]
    shapes += [[(1, c)] * b for b, c in decode_ctx if c >= 1]
    shapes += [[(q, c)] for q, c in CACHED_PREFILLS if q + c <= limit]
    for q, b in LONG_SHAPES:
        c = min(LONG_CONTEXT, capacity // b - q, limit - q)
        if c > CACHED_PREFILLS[0][1] + CACHED_PREFILLS[0][0]:  # longer than the cached-prefill shape's
            shapes.append([(q, c)] * b)
    shapes.sort(key=lambda reqs: sum(q for q, _ in reqs) + sum(c for _, c in reqs) / 16)  # cheap first
    return shapes


def run_delay_s() -> float:
    """Seconds this process's threads have spent runnable but waiting for a CPU (Linux schedstat:
    the second field of /proc/self/task/*/schedstat, in ns): what other processes took from it."""
    total = 0
    for path in glob.glob("/proc/self/task/*/schedstat"):
        try:
            with open(path) as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that just ended
            pass
    return total / 1e9


def wait_clock():
    """run_delay_s where the kernel reports it, else None (then no run is known to be disturbed)."""
    return run_delay_s if glob.glob("/proc/self/task/*/schedstat") else None


def measure(executor, capacity: int, context_length: int, budget_s: float = TIME_BUDGET_S,
            clock=time.perf_counter, delay_clock=None) -> list[TimedShape]:
    """Timed forward passes of the executor's model, one TimedShape per batch shape.

    Uses KV slots 1..n of the (still empty) pool; every decode row of a batch reuses the same slots
    (the timing does not depend on what the KV holds). The first round takes the shapes cheapest
    first until `budget_s` (and at least MIN_POINTS); then whole rounds of those shapes, in the same
    order (MIN_ROUNDS), then the shapes that have no clean run yet, within the limits above. The
    first round is also every shape's warm-up: the minimum discards it unless it was the fastest. `delay_clock` (None: not read) is `run_delay_s` or a stand-in: what each run waited."""
    from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, ReqWork
    from sglang_duet.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=1)
    shapes = calibration_shapes(capacity, context_length)
    works = [[ReqWork(f"calib-{n}-{i}", [7] * q, c, list(range(1, c + q + 1)), True, 1, 0, params, [], [7])
              for i, (q, c) in enumerate(reqs)] for n, reqs in enumerate(shapes)]
    launch_ids = iter(range(10_000_000, 20_000_000))
    samples: list[list[float]] = []
    delays: list[list[float]] = []

    def timed(n: int) -> None:
        launch = Launch(next(launch_ids), LaneKind.AGGREGATED, LaneBatch(), works[n])
        w0 = delay_clock() if delay_clock else 0.0
        t0 = clock()
        executor.run(launch)
        dt = clock() - t0
        if n == len(samples):
            samples.append([])
            delays.append([])
        samples[n].append(dt)
        if delay_clock:
            delays[n].append((delay_clock() - w0) / max(dt, 1e-12))

    def clean(n: int) -> bool:
        return not delay_clock or min(delays[n]) <= CLEAN_DELAY

    start = clock()
    for n in range(len(shapes)):
        if len(samples) >= MIN_POINTS and clock() - start > budget_s:
            break
        timed(n)
    for rnd in range(1, MAX_ROUNDS):
        if rnd >= 2 and clock() - start > 3 * budget_s:
            break
        todo = [n for n in range(len(samples)) if rnd < MIN_ROUNDS or not clean(n)]
        if not todo:
            break
        for n in todo:
            timed(n)
    out = []
    for n, reqs in enumerate(shapes[:len(samples)]):
        ok = [t for t, d in zip(samples[n], delays[n]) if d <= CLEAN_DELAY] if delay_clock else samples[n]
        out.append(TimedShape(reqs, min(ok or samples[n]), samples[n], delays[n]))
    return out


def cpu_paths(executor) -> tuple[str, ...]:
    """The CPU fast paths this executor's steps take (calibration_key)."""
    step = getattr(executor, "decode_step", None)
    return (("packed",) * bool(getattr(executor.model, "has_packed_weights", False))
            + ("compiled",) * bool(step is not None and step.active))


def load_or_calibrate(engine, cm: CostModel) -> CpuCalibration:
    executor = engine.executor
    executor = getattr(executor, "_agg", executor)  # the two-lane executor's synchronous one
    dtype = str(next(executor.model.parameters()).dtype)
    args = engine.args
    key = calibration_key(engine.model_config, dtype, type(executor.attn).__name__,
                          getattr(args, "tp_size", 1), getattr(args, "nnodes", 1), cpu_paths(executor))
    path = os.path.join(cache_dir(), f"{key}.json")
    try:
        with open(path) as fh:
            cal = CpuCalibration.from_json(fh.read())
        logger.info("CPU cost model from %s", path)
        return cal
    except (OSError, ValueError, TypeError):
        pass
    t0 = time.monotonic()
    # Under TP the followers' processes share the CPU by design: waiting for one is no disturbance.
    single = getattr(args, "tp_size", 1) == 1 and getattr(args, "nnodes", 1) == 1
    points = measure(executor, engine.kv_slots - 1, engine.context_length,
                     delay_clock=wait_clock() if single else None)
    (compute, attention, bandwidth, per_step, per_req), err = fit(cm, points)
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    busy = [p for p in points if not p.clean]
    cal = CpuCalibration(key, compute, attention, bandwidth, per_step, per_req,
                         [{"reqs": p.reqs, "seconds": p.seconds, "samples": p.samples, "delays": p.delays}
                          for p in points], err, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         min(len(p.samples) for p in points), load, cpus, len(busy))
    logger.info("CPU cost model calibrated in %.1f s (%d shapes, %d+ runs each, %d never undisturbed; load %.1f on "
                "%d CPUs): %.3g FLOP/s (attention %.3g), %.3g B/s, %.3g ms per step, %.3g ms per request, median "
                "error %.0f%%", time.monotonic() - t0, len(points), cal.rounds, len(busy), load, cpus, compute,
                attention, bandwidth, per_step * 1e3, per_req * 1e3, err * 100)
    if err > MAX_CACHED_ERR or busy:
        why = (f"{len(busy)} of {len(points)} shapes never ran undisturbed (other processes held the CPU)" if busy
               else f"the points disagree (median error {err:.0%})")
        logger.warning("CPU calibration: %s; load %.1f on %d CPUs. The policy's step times may be too long; not "
                       "cached, so the next start times the model again", why, load, cpus)
        return cal
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            fh.write(cal.to_json())
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not cache the CPU calibration in %s: %s", path, e)
    return cal


def calibrated_cost_model(engine, hardware: HardwareSpec | None, policy: str | None = None) -> CpuCostModel | None:
    """The cost model of this CPU for the policy EngineCore is about to build (`policy`, default
    --policy; called after the executor exists, from `EngineCore._policy_context` and, for the CPU
    default policy's budget, before it): on a CPU with the real model and a policy that plans with
    the cost model, fitted from timed forward passes (or the cached fit); None elsewhere (the
    configured hardware file stays). The fit is timed once per engine: a second call returns the
    model the first built (`engine.cpu_cost_model`)."""
    built = getattr(engine, "cpu_cost_model", None)
    if built is not None:
        return built
    args = engine.args
    if (getattr(args, "executor", "") != "model" or not str(getattr(engine, "device", "")).startswith("cpu")
            or (policy or args.policy) not in CALIBRATED_POLICIES or hardware is None
            or os.environ.get(COST_MODEL_ENV, "1") == "0"):
        return None
    executor = getattr(engine.executor, "_agg", engine.executor)
    dtype_bytes = next(executor.model.parameters()).element_size()
    base_cm = CostModel(engine.model_config, hardware, dtype_bytes)
    cal = load_or_calibrate(engine, base_cm)
    engine.cpu_cost_model = cpu_cost_model(engine.model_config, hardware, cal, dtype_bytes)
    return engine.cpu_cost_model
