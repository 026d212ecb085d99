"""Workloads for benchmarks and the simulator: request lengths plus arrival times.

A workload file in `configs/workloads/` names a length source (published quantiles, fixed
lengths, uniform ranges, or a CSV trace replayed by path) and an arrival process (Poisson,
gamma with a given CV, or the trace's own times). `Workload.sample(n, rate, seed)` turns it
into `RequestSpec`s, deterministically per seed. Pure Python + numpy + yaml.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

# Where trace CSVs are looked up when a workload names one by file name. The traces are
# shared data, not part of the repository.
TRACE_DIR_ENV = "SGLANG_DUET_TRACE_DIR"
DEFAULT_TRACE_DIR = "/work/shared/traces"


class WorkloadError(ValueError):
    pass


def configs_dir() -> Path:
    env = os.environ.get("SGLANG_DUET_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float
    input_len: int
    output_len: int


# -- length distributions ---------------------------------------------------------------------
@dataclass(frozen=True)
class QuantileLengths:
    """Piecewise-linear inverse CDF through published (percent, length) points."""

    percents: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self):
        p = self.percents
        if p[0] != 0 or p[-1] != 100 or any(b <= a for a, b in zip(p, p[1:])):
            raise WorkloadError(f"quantile percents must rise strictly from 0 to 100: {p}")
        if any(b < a for a, b in zip(self.values, self.values[1:])):
            raise WorkloadError(f"quantile values must not decrease: {self.values}")

    @classmethod
    def from_pairs(cls, pairs) -> "QuantileLengths":
        return cls(tuple(float(p) for p, _ in pairs), tuple(float(v) for _, v in pairs))

    def quantile(self, percent: float) -> float:
        return float(np.interp(percent, self.percents, self.values))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        x = np.interp(rng.random(n) * 100.0, self.percents, self.values)
        return np.maximum(np.rint(x), 1).astype(np.int64)


@dataclass(frozen=True)
class FixedLengths:
    value: int

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)


@dataclass(frozen=True)
class UniformLengths:
    lo: int  # inclusive
    hi: int  # inclusive

    def __post_init__(self):
        if not 1 <= self.lo <= self.hi:
            raise WorkloadError(f"uniform range needs 1 <= lo <= hi, got [{self.lo}, {self.hi}]")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.lo, self.hi + 1, size=n, dtype=np.int64)


# -- traces -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trace:
    path: str
    input_lens: np.ndarray = field(repr=False)
    output_lens: np.ndarray = field(repr=False)
    arrivals: np.ndarray | None = field(repr=False)  # seconds, or None (lengths only)

    def __len__(self) -> int:
        return len(self.input_lens)

    @property
    def mean_rate(self) -> float | None:
        """Recorded requests per second over the whole trace."""
        if self.arrivals is None or len(self.arrivals) < 2:
            return None
        span = float(self.arrivals[-1] - self.arrivals[0])
        return (len(self.arrivals) - 1) / span if span > 0 else math.inf


@lru_cache(maxsize=8)
def read_trace(path: str) -> Trace:
    """A CSV with num_prefill_tokens, num_decode_tokens and optionally arrived_at (s)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "num_prefill_tokens" not in rows[0] or "num_decode_tokens" not in rows[0]:
        raise WorkloadError(f"{path}: need columns num_prefill_tokens, num_decode_tokens")
    ins = np.array([int(float(r["num_prefill_tokens"])) for r in rows], dtype=np.int64)
    outs = np.array([int(float(r["num_decode_tokens"])) for r in rows], dtype=np.int64)
    arr = None
    if "arrived_at" in rows[0]:
        arr = np.array([float(r["arrived_at"]) for r in rows])
        if np.any(np.diff(arr) < 0):
            order = np.argsort(arr, kind="stable")
            ins, outs, arr = ins[order], outs[order], arr[order]
    # Zero lengths would be degenerate requests; a request has at least one token each way.
    return Trace(path, np.maximum(ins, 1), np.maximum(outs, 1), arr)


def resolve_trace_path(name: str) -> str:
    p = Path(name).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        dirs = [os.environ.get(TRACE_DIR_ENV), DEFAULT_TRACE_DIR]
        candidates = [Path(d) / name for d in dirs if d] + [p]
    for c in candidates:
        if c.is_file():
            return str(c)
    raise FileNotFoundError(
        f"trace file {name!r} not found (looked at: {', '.join(map(str, candidates))}). "
        f"Set {TRACE_DIR_ENV} to the folder holding it or pass trace_path=...; "
        "traces are read by path and are not shipped in the repository."
    )


# -- workloads --------------------------------------------------------------------------------
_PROCESSES = ("poisson", "gamma", "trace")


@dataclass(frozen=True)
class Workload:
    name: str
    input: QuantileLengths | FixedLengths | UniformLengths | None  # None: from the trace
    output: QuantileLengths | FixedLengths | UniformLengths | None
    process: str = "poisson"  # poisson | gamma | trace
    cv: float = 1.0  # inter-arrival coefficient of variation (gamma)
    default_rate: float | None = None  # req/s when sample() gets no rate
    trace: Trace | None = None
    trace_order: str = "sequential"  # sequential | shuffle (trace rows)
    trace_start: int = 0  # first trace row replayed (sequential)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike, **overrides) -> "Workload":
        """'azure-conv' (a file in configs/workloads/) or a YAML path. Keyword overrides
        replace file keys, e.g. load('fixed', input_len=2048), load('azure-conv-trace',
        trace_path='/data/x.csv'), load('azure-conv', arrival={'process': 'gamma', 'cv': 2})."""
        p = Path(name_or_path)
        if p.suffix not in (".yaml", ".yml") and not p.exists():
            p = configs_dir() / "workloads" / f"{name_or_path}.yaml"
            if not p.exists():
                known = sorted(f.stem for f in (configs_dir() / "workloads").glob("*.yaml"))
                raise WorkloadError(f"unknown workload {name_or_path!r}; known: {known} or a YAML path")
        with open(p) as fh:
            d = yaml.safe_load(fh) or {}
        d.update(overrides)
        d.setdefault("name", p.stem)
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "Workload":
        kind = d.get("kind")
        trace = None
        if kind == "quantiles":
            inp = QuantileLengths.from_pairs(d["input_quantiles"])
            out = QuantileLengths.from_pairs(d["output_quantiles"])
        elif kind == "fixed":
            inp, out = FixedLengths(int(d["input_len"])), FixedLengths(int(d["output_len"]))
        elif kind == "uniform":
            inp, out = UniformLengths(*map(int, d["input_range"])), UniformLengths(*map(int, d["output_range"]))
        elif kind == "trace":
            inp = out = None
            path = d.get("trace_path") or resolve_trace_path(str(d["trace"]))
            if not os.path.isfile(path):
                raise FileNotFoundError(f"trace file not found: {path} (traces are read by path "
                                        "and are not shipped in the repository)")
            trace = read_trace(str(path))
        else:
            raise WorkloadError(f"workload {d.get('name')!r}: unknown kind {kind!r} "
                                "(quantiles | fixed | uniform | trace)")
        arrival = dict(d.get("arrival") or {})
        process = arrival.get("process", "poisson")
        if process not in _PROCESSES:
            raise WorkloadError(f"unknown arrival process {process!r}; one of {_PROCESSES}")
        if process == "trace" and (trace is None or trace.arrivals is None):
            raise WorkloadError(f"workload {d.get('name')!r}: arrival process 'trace' needs a trace with arrived_at")
        cv = float(arrival.get("cv", 1.0))
        if cv <= 0:
            raise WorkloadError(f"arrival cv must be > 0, got {cv}")
        rate = arrival.get("rate")
        order = d.get("order", "sequential")
        if order not in ("sequential", "shuffle"):
            raise WorkloadError(f"trace order must be sequential or shuffle, got {order!r}")
        return cls(name=str(d["name"]), input=inp, output=out, process=process, cv=cv,
                   default_rate=None if rate is None else float(rate), trace=trace,
                   trace_order=order, trace_start=int(d.get("start", 0)))

    # -- sampling -----------------------------------------------------------------------------
    def sample(self, n: int, rate: float | None = None, seed: int = 0) -> list[RequestSpec]:
        """n requests with arrival times (s, first at 0) at `rate` req/s.

        rate None: the workload's default (for a trace: as recorded); math.inf: all at t=0
        (an offline batch, bench_serving's --request-rate inf). Lengths and arrivals come
        from independent streams of the seed, so the same seed and rate give the same
        arrival times whatever the length source."""
        if n < 0:
            raise ValueError("n must be >= 0")
        r_in, r_out, r_arr = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
        ins, outs, rec = self._lengths(n, r_in, r_out)
        arrivals = self._arrivals(n, rate, r_arr, rec)
        return [RequestSpec(float(a), int(i), int(o)) for a, i, o in zip(arrivals, ins, outs)]

    def _lengths(self, n: int, r_in: np.random.Generator, r_out: np.random.Generator):
        """Input lengths, output lengths and, for a sequential trace, its arrival times."""
        if self.trace is None:
            return self.input.sample(r_in, n), self.output.sample(r_out, n), None
        tr = self.trace
        N = len(tr)
        if self.trace_order == "shuffle":
            # Rows without repetition while they last, then with.
            idx = r_in.permutation(N)[:n] if n <= N else r_in.integers(0, N, size=n)
        else:
            idx = (self.trace_start + np.arange(n)) % N
        rec = None
        if tr.arrivals is not None and self.trace_order == "sequential":
            # Wrapping past the end continues time after the trace, one mean gap later.
            t = tr.arrivals - tr.arrivals[0]
            gap = 1.0 / tr.mean_rate if tr.mean_rate else 0.0
            laps = (self.trace_start + np.arange(n)) // N
            rec = t[idx] + laps * (t[-1] + gap)
            rec = rec - rec[0] if n else rec
        return tr.input_lens[idx], tr.output_lens[idx], rec

    def _arrivals(self, n: int, rate: float | None, rng: np.random.Generator, recorded) -> np.ndarray:
        if n == 0:
            return np.zeros(0)
        if self.process == "trace":
            if recorded is None:
                raise WorkloadError("trace arrival times need sequential replay (order: sequential)")
            if rate is None:
                return recorded
            if math.isinf(rate):
                return np.zeros(n)
            # Compress or stretch the recorded times so the whole trace's mean rate becomes
            # `rate`, keeping its burstiness.
            return recorded * (self.trace.mean_rate / rate)
        rate = self.default_rate if rate is None else rate
        if rate is None:
            raise WorkloadError(f"workload {self.name!r} has no default rate: pass rate=")
        if rate <= 0:
            raise ValueError("rate must be > 0")
        if math.isinf(rate):
            return np.zeros(n)
        if self.process == "poisson":
            gaps = rng.exponential(1.0 / rate, size=n)
        else:
            # Gamma with shape k = 1/cv^2 and mean 1/rate has exactly that CV.
            k = 1.0 / (self.cv * self.cv)
            gaps = rng.gamma(k, 1.0 / (rate * k), size=n)
        gaps[0] = 0.0  # the first request opens the run
        return np.cumsum(gaps)


# -- SLO presets ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SloPreset:
    name: str
    ttft_s: float | None = None
    tpot_s: float | None = None
    tbt_s: float | None = None
    tbt_percentile: float | None = None  # None: every gap; 99: the p99 gap
    attainment: float | None = None  # fraction of requests that must meet all SLOs
    max_median_scheduling_delay_s: float | None = None
    source: str = ""


def load_slo_presets(path: str | os.PathLike | None = None) -> dict[str, SloPreset]:
    with open(path or configs_dir() / "slo.yaml") as fh:
        d = yaml.safe_load(fh) or {}
    return {name: SloPreset(name=name, **v) for name, v in d.items()}


def load_slo(name: str) -> SloPreset:
    presets = load_slo_presets()
    if name not in presets:
        raise WorkloadError(f"unknown SLO preset {name!r}; known: {sorted(presets)}")
    return presets[name]
