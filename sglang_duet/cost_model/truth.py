"""The emulated GPU's ground truth, kept apart from what a policy believes.

A policy plans with the plain `CostModel` it is given (its belief). The emulated executor times
launches with a `TruthPricer` built from a `TruthConfig`, which by default differs from that
belief in the ways a real GPU does, so that a policy cannot win by knowing the emulator exactly:

- hardware: the truth's own hardware file (default: the planning one), with its compute and
  bandwidth curves optionally scaled (`perturb`, e.g. (0.85, 1.15));
- noise: each launch's device time times a mean-one lognormal factor (sigma, seeded);
- host time per step: `host_base_s + host_per_req_s * requests`, serial with the device (the
  host syncs on each step, processes its tokens, and the next step or launch starts after);
- a partition-switch cost when a split launch's SM count differs from its lane's previous one;
- HBM contention per operator phase (the executor applies it; this module prices the phases);
- attention priced per request (a sum of per-request rooflines instead of one roofline over the
  batch's summed FLOPs and bytes).

Three more effects a GPU showed (benchmark/results/gpu/h200-2026-11-30/lease3/emulator-vs-gpu.md),
off by default (the emulator's tables do not move) and set from a measured file (`file=...`):
- `host_hidden`: whether a launch queued behind its lane's running one hides its host time
  (overlap scheduling, the emulator's default). False: every step's host time is serial with the
  device, as on the H200, whose lane worker prepares, replays and syncs each step in turn;
- `prefill_step_scale`: the device time of a step with a multi-token row (a prefill chunk or a
  mixed batch: an eager forward, attention over a cached prefix) times this. The calibration fits
  graph-replayed decode steps and cold single prefills; chunks ran ~1.09x that on the H200;
- `contention="measured"` with `contention_points`: two lanes' slowdowns read from a measurement
  instead of the bandwidth model: [(decode SMs, decode x, prefill x), ...], interpolated linearly
  in the decode lane's SM count (clamped at the ends). The H200 measured x1.32 / x1.09 (32 / 100
  SMs) and x1.21 / x1.15 (64 / 68), where the phase model says x1.03 / x1.07 and x1.06 / x1.08.

All constants are ESTIMATES; docs/cost-model.md says where they come from.
`TruthConfig.exact()` switches everything off: the truth is then the belief, op for op.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .hardware import Curves, HardwareSpec
from .roofline import CostModel

CONTENTION_MODES = ("phase", "bandwidth", "none", "measured")
# The fields added for a measured truth, with the defaults that leave the emulator as it was:
# `describe()` leaves them out at these values (results files name the truth by describe()).
_MEASURED_DEFAULTS = {"host_hidden": True, "prefill_step_scale": 1.0, "contention_points": ()}


@dataclass(frozen=True)
class TruthConfig:
    hardware: str | None = None  # name or path; None: the planning hardware
    perturb: tuple[float, float] = (1.0, 1.0)  # (compute, bandwidth) multipliers on the truth's curves
    noise_sigma: float = 0.03  # lognormal sigma of the per-launch factor on device time; 0: off
    seed: int = 0
    host_base_s: float = 100e-6  # per step: sync, launch, scheduler bookkeeping (ESTIMATE)
    host_per_req_s: float = 10e-6  # per request per step: token processing, stop checks, output (ESTIMATE)
    switch_s: float = 30e-6  # a split launch whose SM count differs from its lane's previous one (ESTIMATE)
    contention: str = "phase"  # HBM contention between overlapping lanes: phase | bandwidth | none
    per_request_attention: bool = True
    # Measured on a GPU (see the module docstring); the defaults are the emulator as it was.
    host_hidden: bool = True  # a queued launch's host time hides behind the running one (overlap)
    prefill_step_scale: float = 1.0  # device time of a step with a multi-token row (eager forward), times
    # contention="measured": ((decode SMs, decode slowdown, prefill slowdown), ...) while both split lanes run
    contention_points: tuple = ()

    def __post_init__(self):
        if self.contention not in CONTENTION_MODES:
            raise ValueError(f"contention must be one of {CONTENTION_MODES}, got {self.contention!r}")
        pts = tuple(sorted((float(sd), float(xd), float(xp)) for sd, xd, xp in self.contention_points))
        if any(sd <= 0 or xd < 1 or xp < 1 for sd, xd, xp in pts):
            raise ValueError(f"contention_points are (decode SMs > 0, decode x >= 1, prefill x >= 1), got {pts}")
        if self.contention == "measured" and not pts:
            raise ValueError("contention=measured needs contention_points (decode SMs, decode x, prefill x)")
        object.__setattr__(self, "contention_points", pts)
        if not self.prefill_step_scale > 0:
            raise ValueError(f"prefill_step_scale must be > 0, got {self.prefill_step_scale}")
        c, b = (float(x) for x in self.perturb)
        if not (c > 0 and b > 0):
            raise ValueError(f"perturb factors must be > 0, got {self.perturb}")
        object.__setattr__(self, "perturb", (c, b))
        for name in ("noise_sigma", "host_base_s", "host_per_req_s", "switch_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def exact(cls, contention: str = "bandwidth", **kw) -> "TruthConfig":
        """The truth is the belief: no noise, host time or switch cost, attention as the cost
        model prices it; HBM contention as given ('bandwidth': the launch-averaged model)."""
        return cls(noise_sigma=0.0, host_base_s=0.0, host_per_req_s=0.0, switch_s=0.0, contention=contention,
                   per_request_attention=False, **kw)

    def host_s(self, requests: int) -> float:
        return self.host_base_s + self.host_per_req_s * requests if requests else 0.0

    def lane_slowdowns(self, decode_sms: float) -> tuple[float, float]:
        """contention=measured: (decode lane's, prefill lane's) slowdown while both run, the decode
        lane on `decode_sms` SMs: `contention_points` interpolated linearly, clamped at the ends."""
        pts = self.contention_points
        if decode_sms <= pts[0][0]:
            return pts[0][1], pts[0][2]
        for (s0, d0, p0), (s1, d1, p1) in zip(pts, pts[1:]):
            if decode_sms <= s1:
                w = (decode_sms - s0) / (s1 - s0)
                return d0 + w * (d1 - d0), p0 + w * (p1 - p0)
        return pts[-1][1], pts[-1][2]

    def describe(self) -> dict:
        d = dataclasses.asdict(self)
        d["perturb"] = list(self.perturb)
        for k, default in _MEASURED_DEFAULTS.items():
            if d[k] == default:
                del d[k]  # as before these fields existed: results that name the truth do not change
        if "contention_points" in d:
            d["contention_points"] = [list(p) for p in d["contention_points"]]
        return d

    @classmethod
    def from_file(cls, path, **defaults) -> "TruthConfig":
        """The truth a measured file describes: its `truth:` mapping (or the whole file) in `parse`'s
        keys over `defaults`, e.g. configs/truth/h200-2026-11-30.yaml."""
        import yaml

        doc = yaml.safe_load(open(path)) or {}
        items = doc.get("truth", doc) if isinstance(doc, dict) else None
        if not isinstance(items, dict):
            raise ValueError(f"truth file {path}: expected a mapping (under 'truth:'), got {type(items).__name__}")
        items = dict(items)
        inner = items.get("file")
        if inner is not None:  # a truth file built on another: its path is relative to this file's folder
            near = Path(path).parent / str(inner)
            items["file"] = str(near if near.exists() else inner)
        return cls.parse(items, **defaults)

    @classmethod
    def parse(cls, text: str | dict | None, **defaults) -> "TruthConfig | None":
        """'on' (the defaults), 'off' (exact), or 'key=value,...' over the defaults, e.g.
        'hardware=h200,perturb=0.85:1.15,noise=0.05,seed=3,host_us=100:10,switch_us=30,
        contention=phase,attention=per-request' (a dict with the same keys works too), and the measured
        keys 'host_hidden=0,prefill_step_scale=1.09,contention=measured,
        contention_points=32:1.32:1.09/64:1.21:1.15'; 'file=PATH' reads a truth file's keys first."""
        if text is None or (isinstance(text, str) and text.strip().lower() in ("", "on", "true", "1")):
            return cls(**defaults)
        if isinstance(text, str) and text.strip().lower() in ("off", "false", "0", "exact"):
            return cls.exact(**{k: v for k, v in defaults.items() if k in ("hardware", "perturb", "seed")})
        items = text.items() if isinstance(text, dict) else (
            kv.split("=", 1) for kv in text.split(",") if kv.strip())
        kw = dict(defaults)
        items = list(items)
        for k, v in items:  # a file's keys first, so the string's own keys override them
            if k.strip() == "file":
                kw = dataclasses.asdict(cls.from_file(str(v).strip(), **kw))
        for k, v in items:
            k = k.strip().replace("-", "_")
            v = v.strip() if isinstance(v, str) else v
            if k == "file":
                continue
            if k in ("off", "exact") and str(v).lower() in ("1", "true"):
                kw.update(noise_sigma=0.0, host_base_s=0.0, host_per_req_s=0.0, switch_s=0.0,
                          per_request_attention=False)
            elif k == "hardware":
                kw["hardware"] = v or None
            elif k == "perturb":
                kw["perturb"] = _pair(v)
            elif k in ("noise", "noise_sigma"):
                kw["noise_sigma"] = float(v)
            elif k == "seed":
                kw["seed"] = int(v)
            elif k == "host_us":
                base, per = _pair(v)
                kw["host_base_s"], kw["host_per_req_s"] = base * 1e-6, per * 1e-6
            elif k == "switch_us":
                kw["switch_s"] = float(v) * 1e-6
            elif k == "contention":
                kw["contention"] = str(v)
            elif k == "host_hidden":
                kw["host_hidden"] = _bool(v, k)
            elif k == "prefill_step_scale":
                kw["prefill_step_scale"] = float(v)
            elif k == "contention_points":
                kw["contention_points"] = _points(v)
            elif k == "attention":
                if v not in ("per-request", "summed"):
                    raise ValueError(f"truth attention must be per-request or summed, got {v!r}")
                kw["per_request_attention"] = v == "per-request"
            else:
                raise ValueError(f"unknown truth option {k!r}")
        return cls(**kw)


def _bool(v, name: str) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(f"truth {name} must be a boolean, got {v!r}")
    return text in ("1", "true", "yes", "on")


def _points(v) -> tuple:
    """'32:1.32:1.09/64:1.21:1.15' or [[32, 1.32, 1.09], ...] -> ((32.0, 1.32, 1.09), ...)."""
    rows = v if isinstance(v, (list, tuple)) else [p for p in str(v).split("/") if p.strip()]
    out = []
    for p in rows:
        vals = p if isinstance(p, (list, tuple)) else str(p).split(":")
        if len(vals) != 3:
            raise ValueError(f"truth contention_points: each point is decode_sms:decode_x:prefill_x, got {p!r}")
        out.append(tuple(float(x) for x in vals))
    return tuple(out)


def _pair(v) -> tuple[float, float]:
    if isinstance(v, (tuple, list)):
        a, b = v
    else:
        a, b = str(v).replace(":", ",").split(",")
    return float(a), float(b)


def perturbed(hw: HardwareSpec, compute: float = 1.0, bandwidth: float = 1.0) -> HardwareSpec:
    """`hw` with its compute and bandwidth curves scaled (the peaks are datasheet facts: unchanged)."""
    if compute == 1.0 and bandwidth == 1.0:
        return hw
    return dataclasses.replace(hw, name=f"{hw.name}*c{compute:g}b{bandwidth:g}",
                               curves=Curves(compute=hw.curves.compute.scaled(compute),
                                             bandwidth=hw.curves.bandwidth.scaled(bandwidth)))


def truth_cost_model(belief: CostModel, cfg: TruthConfig) -> CostModel:
    """The cost model the truth prices with: the belief's own object when the hardware is the same."""
    if cfg.hardware is None and cfg.perturb == (1.0, 1.0):
        return belief
    # A belief for one GPU of several (a TP group) keeps its per-GPU hardware and rebuilds itself on
    # the truth's (`on_hardware`); a plain cost model is rebuilt here.
    own = getattr(belief, "base_hw", belief.hw)
    hw = HardwareSpec.load(cfg.hardware) if cfg.hardware is not None else own
    hw = perturbed(hw, *cfg.perturb)
    if hasattr(belief, "on_hardware"):
        return belief.on_hardware(hw)
    return CostModel(belief.model, hw, belief.b)


# ---- pricing ------------------------------------------------------------------------------------


class LaunchCost:
    """A launch's alone time on its SMs, by step and by operator phase (before noise and host time).

    Phases, for HBM contention: the memory-bound operators (time `mem_tm` at full bandwidth, which
    stretches as 1/share, plus their kernel overhead) and the compute-bound ones (`comp`: per
    operator name, summed FLOP time and byte time; each stretches as max(tc, tm/share)). Bytes
    per phase give each phase's bandwidth demand."""

    __slots__ = ("step_s", "mem_tm", "mem_fixed", "mem_bytes", "comp", "comp_fixed", "comp_bytes", "fixed",
                 "step_reqs")

    def __init__(self):
        self.step_s: list[float] = []  # device time of each step, alone
        self.step_reqs: list[int] = []  # requests in each step (host time)
        self.mem_tm = self.mem_fixed = self.mem_bytes = 0.0
        self.comp: dict[str, list[float]] = {}
        self.comp_fixed = self.comp_bytes = 0.0
        self.fixed = 0.0  # time no HBM share changes (e.g. a TP all-reduce on the link)

    @property
    def device_s(self) -> float:
        return sum(self.step_s)

    def scale_first_step(self, f: float) -> None:
        """Stretch the first step's device time by f (a truth's `prefill_step_scale`: only a launch's
        first step can hold a multi-token row, and it is then its only step). Bytes stay: a slower
        step asks less bandwidth."""
        if len(self.step_s) != 1:
            raise ValueError("scale_first_step: a launch with a multi-token row has one step")
        self.step_s[0] *= f
        self.mem_tm *= f
        self.mem_fixed *= f
        self.comp_fixed *= f
        self.fixed *= f
        for acc in self.comp.values():
            acc[0] *= f
            acc[1] *= f

    @property
    def bytes(self) -> float:
        return self.mem_bytes + self.comp_bytes

    def device_time(self, share: float) -> float:
        """Device time of the whole launch when it gets `share` of the HBM bandwidth it would alone."""
        t = self.mem_tm / share + self.mem_fixed + self.comp_fixed + self.fixed
        for tc, tm in self.comp.values():
            t += tc if tc >= tm / share else tm / share
        return t


class TruthPricer:
    """Prices launches op by op for the emulated GPU.

    Per step, the operators other than attention depend only on (new tokens T, requests R, SMs):
    they are priced once per such key through `cost_model.breakdown` (so a subclass's extra
    operators, e.g. a TP all-reduce, come along) and cached. Attention is priced per step from the
    step's requests: one roofline over the summed FLOPs and bytes (as the cost model does), or,
    with `per_request_attention`, a sum of per-request rooflines. Decode rows (one new token) are
    memory-bound on any GPU this project models (checked per hardware), so their sum is exact."""

    def __init__(self, cm: CostModel, per_request_attention: bool = True, cache_size: int = 200_000):
        self.cm = cm
        self.per_request = per_request_attention
        self._cache: dict = {}
        self._cache_size = cache_size
        self._rates: dict = {}
        L, H, hd, kvs, qs, b = cm.L, cm.H, cm.hd, cm.kvs, cm.qs, cm.b
        self._af = 4 * H * hd * L  # attention FLOPs per (query, key) pair, all layers
        self._kvb = 2 * kvs * b * L  # K+V bytes per token, all layers
        self._qob = 2 * qs * b * L  # q read + o write per new token, all layers
        self._attn_kernels = 2 * L

    def rates(self, sms):
        r = self._rates.get(sms)
        if r is None:
            comp, bw, ac, ovh = self.cm._rates(sms, 1.0)
            # A decode row's arithmetic intensity is below af / kvb: when that is under the ridge
            # point, every decode row's attention is memory-bound and rows can be summed.
            decode_mem_bound = self._af / self._kvb <= ac / bw
            r = self._rates[sms] = (comp, bw, ac, ovh, decode_mem_bound)
        return r

    def _other_ops(self, T: int, R: int, sms):
        key = (T, R, sms)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        comp, bw, _, ovh, _ = self.rates(sms)
        shape = [(T - R + 1, 0)] + [(1, 0)] * (R - 1)
        mem_tm = mem_fixed = mem_bytes = comp_fixed = comp_bytes = fixed = 0.0
        comp_ops = []
        for op in self.cm.breakdown(shape, sms):
            if op.name == "attention":
                continue
            if op.flops == 0 and op.bytes == 0:
                fixed += op.time
                continue
            tc, tm, ko = op.flops / comp, op.bytes / bw, op.kernels * ovh
            if tc > tm:
                comp_ops.append((op.name, tc, tm))
                comp_fixed += ko
                comp_bytes += op.bytes
            else:
                mem_tm += tm
                mem_fixed += ko
                mem_bytes += op.bytes
        total = mem_tm + mem_fixed + comp_fixed + fixed + sum(tc for _, tc, _ in comp_ops)
        hit = (mem_tm, mem_fixed, mem_bytes, tuple(comp_ops), comp_fixed, comp_bytes, fixed, total)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[key] = hit
        return hit

    def _add_step(self, lc: LaunchCost, T: int, R: int, sms, n1: int, c1: int, multi: list) -> None:
        """Add one step: T new tokens of R requests; n1 one-token rows with c1 cached tokens in
        all, and `multi` = [(q, c)] of the rows with more than one new token."""
        comp, bw, ac, ovh, decode_mem = self.rates(sms)
        mem_tm, mem_fixed, mem_bytes, comp_ops, comp_fixed, comp_bytes, fixed, t = self._other_ops(T, R, sms)
        lc.mem_tm += mem_tm
        lc.mem_fixed += mem_fixed
        lc.mem_bytes += mem_bytes
        lc.comp_fixed += comp_fixed
        lc.comp_bytes += comp_bytes
        lc.fixed += fixed
        for name, tc, tm in comp_ops:
            acc = lc.comp.get(name)
            if acc is None:
                lc.comp[name] = [tc, tm]
            else:
                acc[0] += tc
                acc[1] += tm
        # attention: KV read of c + q tokens, KV write of q, q read + o write of q, per row
        af, kvb, qob = self._af, self._kvb, self._qob
        ko = self._attn_kernels * ovh
        parts = []  # (flops, bytes) rooflines
        f1 = af * (c1 + n1)  # a one-token row attends to c + 1 keys
        b1 = kvb * (c1 + 2 * n1) + qob * n1
        if not self.per_request:
            f, by = f1, b1
            for q, c in multi:
                f += af * q * (c + (q + 1) / 2)
                by += kvb * (c + 2 * q) + qob * q
            parts.append((f, by))
        else:
            if n1:
                if decode_mem:
                    parts.append((f1, b1))  # every row memory-bound: the sum of rooflines is the roofline of the sum
                else:
                    raise NotImplementedError("per-request attention on a GPU whose decode rows are compute-bound")
            for q, c in multi:
                parts.append((af * q * (c + (q + 1) / 2), kvb * (c + 2 * q) + qob * q))
        att = 0.0
        for f, by in parts:
            tc, tm = f / ac, by / bw
            if tc > tm:
                acc = lc.comp.get("attention")
                if acc is None:
                    lc.comp["attention"] = [tc, tm]
                else:
                    acc[0] += tc
                    acc[1] += tm
                lc.comp_bytes += by
                att += tc
            else:
                lc.mem_tm += tm
                lc.mem_bytes += by
                att += tm
        lc.mem_fixed += ko  # attention kernels' overhead, with the memory phase (decode's usual case)
        lc.step_s.append(t + att + ko)
        lc.step_reqs.append(R)

    def price(self, work, sms) -> LaunchCost:
        """A launch's cost: `work` = [(new tokens, start position, steps)], one per request."""
        return self.price_rows(*work_columns(work), sms)

    def price_rows(self, q: list[int], c: list[int], s: list[int], sms) -> LaunchCost:
        """`price` of the rows given column by column (new tokens, start positions, steps): a decode
        batch is summed in C (sum, count), with no Python work per row."""
        lc = LaunchCost()
        n = len(q)
        T = sum(q)
        n1 = q.count(1)
        if n1 == n:  # every row one token (decode): nothing to split
            c1, multi = sum(c), ()
        else:
            c1, multi = 0, []
            for qi, ci in zip(q, c):
                if qi == 1:
                    c1 += ci
                else:
                    multi.append((qi, ci))
        self._add_step(lc, T, n, sms, n1, c1, multi)
        steps = max(s)
        if steps > 1:
            # Step j of a look-ahead decode: each row still stepping has one more cached token.
            by_steps: dict[int, list[int]] = {}
            for si, ci in zip(s, c):
                e = by_steps.setdefault(si, [0, 0])
                e[0] += 1
                e[1] += ci
            for j in range(1, steps):
                n = cs = 0
                for si, (cnt, csum) in by_steps.items():
                    if si > j:
                        n += cnt
                        cs += csum
                self._add_step(lc, n, n, sms, n, cs + j * n, ())
        return lc


def work_columns(work) -> tuple[list[int], list[int], list[int]]:
    """[(q, c, s), ...] -> ([q...], [c...], [s...])."""
    work = list(work)
    return [q for q, _, _ in work], [c for _, c, _ in work], [s for _, _, s in work]


class BreakdownPricer:
    """Prices launches through any cost model's `breakdown` (e.g. `constant.ConstantCostModel`):
    per step, a memory-bound operator's time stretches under contention, any other is fixed."""

    def __init__(self, cm):
        self.cm = cm

    def price(self, work, sms) -> LaunchCost:
        return self.price_rows(*work_columns(work), sms)

    def price_rows(self, q: list[int], c: list[int], s: list[int], sms) -> LaunchCost:
        lc = LaunchCost()
        for j in range(max(s)):
            shape = list(zip(q, c)) if j == 0 else [(1, ci + j) for ci, si in zip(c, s) if si > j]
            t = 0.0
            for op in self.cm.breakdown(shape, sms):
                t += op.time
                if op.bound == "memory" and op.bytes > 0:
                    lc.mem_tm += op.time
                    lc.mem_bytes += op.bytes
                else:
                    lc.fixed += op.time
                    lc.comp_bytes += op.bytes
            lc.step_s.append(t)
            lc.step_reqs.append(len(shape))
        return lc


def make_pricer(cm, per_request_attention: bool = True):
    """A TruthPricer for a roofline CostModel (or subclass); the cost model's own pricer where it
    has one (`truth_pricer()`, e.g. constant.ConstantCostModel's); a BreakdownPricer for anything else."""
    if isinstance(cm, CostModel):
        return TruthPricer(cm, per_request_attention)
    own = getattr(cm, "truth_pricer", None)
    if own is not None:
        return own()
    return BreakdownPricer(cm)


def lognormal_factor(rng, sigma: float) -> float:
    """A mean-one lognormal draw (1.0 when sigma is 0)."""
    if sigma <= 0:
        return 1.0
    return math.exp(rng.gauss(0.0, sigma) - sigma * sigma / 2)
