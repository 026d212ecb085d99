"""GPU description for the roofline cost model: peaks, SM-partition rules and per-SM-count
curves of achievable compute and memory bandwidth.

Pure Python + yaml (no torch) so that policies, the simulator and the emulated executor can
use it on any machine. The shipped files in `configs/hardware/` hold datasheet peaks and
ESTIMATED curves; a calibration file measured on the device replaces the curves (format in
docs/cost-model.md) and may set the step terms fitted to measured model steps (`StepTerms`'s
keys, `attention_efficiency`, `launch_overhead_s`: cost_model/fit.py).
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class HardwareSpecError(ValueError):
    pass


def configs_dir() -> Path:
    """The repository's `configs/` folder; SGLANG_DUET_CONFIG_DIR overrides it (installed
    packages do not ship configs)."""
    env = os.environ.get("SGLANG_DUET_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class Curve:
    """Piecewise-linear function of the SM count, from (sms, value) points.

    Below the first point the value falls linearly to 0 at 0 SMs (no SMs, no work); above
    the last point it stays flat (a curve is measured up to the whole GPU)."""

    points: tuple[tuple[float, float], ...]

    def __post_init__(self):
        pts = tuple((float(s), float(v)) for s, v in self.points)
        if not pts:
            raise HardwareSpecError("a curve needs at least one point")
        xs = [p[0] for p in pts]
        if any(b <= a for a, b in zip(xs, xs[1:])) or xs[0] < 0:
            raise HardwareSpecError(f"curve SM counts must be >= 0 and strictly increasing: {xs}")
        if any(v < 0 for _, v in pts):
            raise HardwareSpecError("curve values must be >= 0")
        object.__setattr__(self, "points", pts)
        # Split copies for bisect: a scalar lookup is on the policy's hot path, where
        # numpy's per-call overhead would dominate.
        object.__setattr__(self, "_xs", xs)
        object.__setattr__(self, "_ys", [p[1] for p in pts])

    def __call__(self, sms: float) -> float:
        xs, ys = self._xs, self._ys
        if sms <= xs[0]:
            return ys[0] * sms / xs[0] if xs[0] > 0 else ys[0]
        if sms >= xs[-1]:
            return ys[-1]
        i = bisect.bisect_right(xs, sms)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (sms - x0) / (x1 - x0)

    def scaled(self, factor: float) -> "Curve":
        return Curve(tuple((s, v * factor) for s, v in self.points))


@dataclass(frozen=True)
class Curves:
    compute: Curve  # achievable dense bf16 GEMM FLOP/s with S SMs
    bandwidth: Curve  # achievable HBM bytes/s (read + write) with S SMs


@dataclass(frozen=True)
class StepTerms:
    """What a forward pass costs beyond the operator inventory at the curves' rates (roofline.py
    applies them; calibration fits them). Each default leaves the roofline unchanged."""

    # The model's projection GEMMs (QKV, O, gate/up, down, LM head) reach this fraction of the
    # sweep's best large-GEMM FLOP/s: other shapes than the sweep's squares, epilogues, no tuning.
    gemm_efficiency: float = 1.0
    # A GEMM of M rows costs the compute of M + gemm_pad_rows rows: below a tile's height of rows
    # (decode batches) the tensor cores compute padding, so small-M GEMMs run far under the
    # curve's rate. Equivalently an efficiency of M / (M + pad) on top of gemm_efficiency.
    gemm_pad_rows: float = 0.0
    # GEMMs stream their operands (the weights, in decode) at this multiple of the copy curve's
    # bytes/s: a read-mostly stream on few SMs outruns a copy, which also writes.
    gemm_bandwidth_efficiency: float = 1.0
    # Bytes of the token-wise operators that are not GEMMs or attention (embedding, norms, RoPE,
    # SiLU*up) as a multiple of the inventory's one fused pass each: an unfused forward reads and
    # writes its [tokens, hidden] activations many times (fp32 norms, separate residual adds).
    activation_traffic: float = 1.0

    KEYS = ("gemm_efficiency", "gemm_pad_rows", "gemm_bandwidth_efficiency", "activation_traffic")

    def __post_init__(self):
        for k in ("gemm_efficiency", "gemm_bandwidth_efficiency"):
            if not getattr(self, k) > 0:
                raise HardwareSpecError(f"{k} must be > 0, got {getattr(self, k)}")
        for k in ("gemm_pad_rows", "activation_traffic"):
            if not getattr(self, k) >= 0:
                raise HardwareSpecError(f"{k} must be >= 0, got {getattr(self, k)}")

    @classmethod
    def from_dict(cls, d: dict) -> "StepTerms":
        return cls(**{k: float(d[k]) for k in cls.KEYS if d.get(k) is not None})

    def as_dict(self) -> dict:
        return {k: float(getattr(self, k)) for k in self.KEYS}


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    total_sms: int
    sm_granularity: int  # partitions are multiples of this (8 on Hopper)
    min_partition_sms: int  # smallest partition the driver grants (8 on Hopper)
    peak_flops_bf16: float  # datasheet, dense
    peak_bandwidth: float  # datasheet, bytes/s
    launch_overhead_s: float  # fixed cost per kernel
    curves: Curves
    # Attention kernels reach this fraction of the GEMM compute curve (FlashAttention-class
    # kernels are less efficient than cuBLAS GEMMs); a calibration may measure it.
    attention_efficiency: float = 1.0
    # How the model's own kernels differ from the sweep's large square GEMM and copy (fitted by
    # calibration from measured model steps, cost_model/fit.py). The defaults are the plain
    # roofline: every kernel at the curves' rates.
    step_terms: StepTerms = field(default_factory=StepTerms)
    # False where SM partitioning is only emulated (A100): the grid is a convention.
    green_contexts: bool = True
    memory_bytes: float = 0.0
    source: str = "estimate"  # "estimate" or the calibration file's path
    # GPU-to-GPU link of a TP group ({"name", "bandwidth": achievable bytes/s per direction,
    # "latency_s": per ring hop}); None: the file names none (cost_model/tp.py's default).
    link: dict | None = field(default=None, compare=False)
    measured: dict = field(default_factory=dict, compare=False)

    # -- curves ----------------------------------------------------------------------------
    def _check_sms(self, sms: float | None) -> float:
        if sms is None:
            return self.total_sms
        if not 0 < sms <= self.total_sms:
            raise HardwareSpecError(f"{self.name}: SM count {sms} outside (0, {self.total_sms}]")
        return sms

    def compute(self, sms: float | None = None) -> float:
        """Achievable bf16 FLOP/s of a large GEMM on `sms` SMs (None: the whole GPU)."""
        return self.curves.compute(self._check_sms(sms))

    def bandwidth(self, sms: float | None = None) -> float:
        """Achievable HBM bytes/s with `sms` SMs (None: the whole GPU)."""
        return self.curves.bandwidth(self._check_sms(sms))

    # -- partitions ------------------------------------------------------------------------
    def partition_grid(self) -> list[int]:
        """Valid decode-partition SM counts for a two-lane split.

        The decode lane gets S_d SMs (a multiple of the granularity, at least the minimum);
        the prefill lane gets the remainder, total - S_d, which must also reach the minimum.
        On H100/H200: 8, 16, ..., 120 (128 would leave 4 SMs)."""
        g, lo = self.sm_granularity, self.min_partition_sms
        first = -(-lo // g) * g
        return [s for s in range(first, self.total_sms + 1, g) if self.total_sms - s >= lo]

    def round_partition(self, sms: int) -> int:
        """The SM count the driver would grant for a request of `sms` (rounds up)."""
        g = self.sm_granularity
        return min(self.total_sms, max(self.min_partition_sms, -(-int(sms) // g) * g))

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> "HardwareSpec":
        """'h100' (a file in configs/hardware/) or a path to a YAML file; a file with
        `base: NAME_OR_PATH` starts from that spec and overrides what it sets (calibration)."""
        return cls.from_dict(_load_merged(name_or_path, seen=()), source=str(name_or_path))

    @classmethod
    def from_dict(cls, d: dict, source: str = "dict") -> "HardwareSpec":
        try:
            total = int(d["total_sms"])
            peak_f, peak_b = float(d["peak_flops_bf16"]), float(d["peak_bandwidth"])
            compute = _curve(d, "compute", peak_f, total)
            bandwidth = _curve(d, "bandwidth", peak_b, total)
            measured = dict(d.get("measured") or {})
            return cls(
                name=str(d["name"]),
                total_sms=total,
                sm_granularity=int(d.get("sm_granularity", 1)),
                min_partition_sms=int(d.get("min_partition_sms", 1)),
                peak_flops_bf16=peak_f,
                peak_bandwidth=peak_b,
                launch_overhead_s=float(d.get("launch_overhead_s", 0.0)),
                curves=Curves(compute=compute, bandwidth=bandwidth),
                attention_efficiency=float(d.get("attention_efficiency", 1.0)),
                step_terms=StepTerms.from_dict(d),
                green_contexts=bool(d.get("green_contexts", True)),
                memory_bytes=float(d.get("memory_bytes", 0.0)),
                source=source if measured else "estimate",
                measured=measured,
                link=_link(d),
            )
        except KeyError as e:
            raise HardwareSpecError(f"hardware spec {source}: missing key {e}") from None


def _link(d: dict) -> dict | None:
    """`link_bandwidth` (datasheet, per direction) x `link_efficiency`, `link_latency_s`, `link_name`."""
    if "link_bandwidth" not in d:
        return None
    link = {"bandwidth": float(d["link_bandwidth"]) * float(d.get("link_efficiency", 1.0))}
    if "link_latency_s" in d:
        link["latency_s"] = float(d["link_latency_s"])
    if "link_name" in d:
        link["name"] = str(d["link_name"])
    return link


def _curve(d: dict, kind: str, peak: float, total_sms: int) -> Curve:
    """An explicit measured `<kind>_curve` ([[sms, value/s], ...]) wins over the estimate
    `<kind>_efficiency * peak * <kind>_scaling(sms)`."""
    if d.get(f"{kind}_curve"):
        return Curve(tuple(tuple(p) for p in d[f"{kind}_curve"]))
    eff = float(d.get(f"{kind}_efficiency", 1.0))
    scaling = d.get(f"{kind}_scaling") or [[0, 0.0], [total_sms, 1.0]]
    return Curve(tuple((s, f * eff * peak) for s, f in scaling))


def _resolve(name_or_path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise HardwareSpecError(f"hardware file not found: {p}")
        return p
    cand = configs_dir() / "hardware" / f"{str(name_or_path).lower()}.yaml"
    if not cand.exists():
        known = sorted(f.stem for f in (configs_dir() / "hardware").glob("*.yaml"))
        raise HardwareSpecError(f"unknown hardware {name_or_path!r}; known: {known} or a YAML path")
    return cand


def _load_merged(name_or_path, seen: tuple) -> dict:
    path = _resolve(name_or_path)
    if path.resolve() in seen:
        raise HardwareSpecError(f"hardware file {path}: circular `base`")
    with open(path) as fh:
        d = yaml.safe_load(fh) or {}
    base = d.pop("base", None)
    if base is None:
        return d
    # A relative base path is relative to the file that names it.
    base_ref = base if not str(base).endswith((".yaml", ".yml")) or os.path.isabs(base) else path.parent / base
    merged = _load_merged(base_ref, seen + (path.resolve(),))
    if "compute_curve" in d:  # a measured curve replaces the estimate entirely
        merged.pop("compute_scaling", None)
    if "bandwidth_curve" in d:
        merged.pop("bandwidth_scaling", None)
    merged.update(d)
    return merged


def write_calibration(path, base: str, compute_curve, bandwidth_curve, measured: dict, **extra) -> None:
    """Write a calibration file in the documented format (used by the device calibration)."""
    d = {"base": base, "compute_curve": [[int(s), float(v)] for s, v in compute_curve],
         "bandwidth_curve": [[int(s), float(v)] for s, v in bandwidth_curve], **extra,
         "measured": dict(measured)}
    with open(path, "w") as fh:
        yaml.safe_dump(d, fh, sort_keys=False)
