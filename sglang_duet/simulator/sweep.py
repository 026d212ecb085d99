"""Goodput sweeps: for each policy, the highest request rate at which >= 90% of requests attain the SLO.

DistServe's procedure: sweep the rate and interpolate the crossing of the target attainment.
Here the sweep is adaptive per policy and per attainment definition: grow the rate
geometrically from `start` until attainment drops below the target (or shrink it until it
passes, down to start/64), then bisect the bracket
a few times, then interpolate linearly between the highest passing rate and the lowest
failing rate above it. Every run uses the same workload seed, so at every rate all policies
see the same request lengths (common random numbers); arrivals stretch with the rate.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sglang_duet.simulator.loop import SimConfig, build_cost_model, simulate
from sglang_duet.simulator.metrics import RunMetrics, all_gaps, summarize

METRICS = ("attainment", "attainment_max_tbt")


@dataclass(frozen=True)
class PolicySpec:
    """`name`, `name:BUDGET` (a chunked_prefill_size for that policy alone), and policy options
    after `+`: `static-split:8192+decode_sms=40+ttft_order=deadline` (values parsed as int or
    float when they look like one)."""

    label: str
    policy: str
    chunked_prefill_size: int | None = None
    options: tuple[tuple[str, object], ...] = ()

    @classmethod
    def parse(cls, text: str) -> "PolicySpec":
        head, *opts = text.strip().split("+")
        name, _, budget = head.partition(":")
        options = []
        for o in opts:
            k, eq, v = o.partition("=")
            if not eq or not k.strip():
                raise ValueError(f"policy option {o!r} in {text!r} is not KEY=VALUE")
            options.append((k.strip(), _option_value(v.strip())))
        label = f"{name}-{budget}" if budget else name
        label += "".join(f"-{k}={v}" if k not in _SHORT else f"-{_SHORT[k]}{v}" for k, v in options)
        return cls(label, name, int(budget) if budget else None, tuple(options))


_SHORT = {"decode_sms": "sd"}  # label shorthands: static-split-8192-sd40


def _option_value(v: str):
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def spec_config(base: SimConfig, spec: PolicySpec) -> SimConfig:
    """`base` running `spec`'s policy, budget and options (over base's options)."""
    return dataclasses.replace(base, policy=spec.policy,
                               chunked_prefill_size=spec.chunked_prefill_size or base.chunked_prefill_size,
                               policy_options={**base.policy_options, **dict(spec.options)})


@dataclass
class PolicySweep:
    spec: PolicySpec
    runs: dict[float, RunMetrics] = field(default_factory=dict)  # rate -> metrics
    goodput: dict[str, float] = field(default_factory=dict)  # metric -> req/s
    bounded: dict[str, str] = field(default_factory=dict)  # metric -> "" | "<" | ">" (outside the swept range)


def crossing(points: list[tuple[float, float]], target: float) -> tuple[float, str]:
    """Interpolated rate where attainment first falls below `target`, from (rate, attainment) points.

    Returns (rate, flag): flag '<' when even the lowest rate fails (interpolated from
    attainment 1 at rate 0), '>' when no swept rate fails (the highest rate swept)."""
    pts = sorted(points)
    prev_r, prev_a = 0.0, 1.0
    for r, a in pts:
        if a < target:  # prev_a >= target > a: a proper bracket
            x = prev_r + (r - prev_r) * (prev_a - target) / (prev_a - a)
            return x, "<" if prev_r == 0 else ""
        prev_r, prev_a = r, a
    return prev_r, ">"


def sweep_policy(base: SimConfig, spec: PolicySpec, start: float, growth: float = 1.6, refine: int = 3,
                 max_rate: float = 200.0, target: float = 0.9, cost_model=None, log=print,
                 metrics: tuple[str, ...] = METRICS) -> PolicySweep:
    """Goodput of one policy for each of `metrics` (one search each; runs are shared between them)."""
    cfg = spec_config(base, spec)
    out = PolicySweep(spec)

    def run(rate: float) -> RunMetrics:
        rate = round(rate, 4)
        if rate not in out.runs:
            res = simulate(dataclasses.replace(cfg, rate=rate), cost_model=cost_model)
            m = summarize(res)
            out.runs[rate] = m
            log(f"  {spec.label:>16s} rate {rate:7.3f}: attainment {m.attainment:.3f} "
                f"(max-TBT {m.attainment_max_tbt:.3f}), TTFT p99 {m.ttft_p99_ms:.0f} ms, TBT p99 "
                f"{m.tbt_p99_ms:.1f} ms, max {m.tbt_max_ms:.0f} ms, {m.throughput_tok_s:.0f} tok/s "
                f"[{res.wall_s:.1f}s]")
        return out.runs[rate]

    for metric in metrics:
        lo, hi, rate = None, None, start
        while rate <= max_rate:
            if getattr(run(rate), metric) >= target:
                lo, rate = rate, rate * growth
            else:
                hi = rate
                break
        while lo is None and hi is not None and hi > start / 64:  # even `start` fails: go down
            rate = hi / growth
            if getattr(run(rate), metric) >= target:
                lo = rate
            else:
                hi = rate
        if lo is not None and hi is not None:
            for _ in range(refine):
                mid = (lo + hi) / 2
                if getattr(run(mid), metric) >= target:
                    lo = mid
                else:
                    hi = mid
        g, flag = crossing([(r, getattr(m, metric)) for r, m in out.runs.items()], target)
        out.goodput[metric], out.bounded[metric] = g, flag
    return out


def sweep(base: SimConfig, specs: list[PolicySpec], start: float = 1.0, target: float = 0.9, refine: int = 3,
          growth: float = 1.6, log=print) -> list[PolicySweep]:
    cm = build_cost_model(base.model, base.hardware, base.tp_size)
    results = []
    for spec in specs:
        log(f"sweeping {spec.label} on {base.workload} ({base.model} on {base.hardware})")
        results.append(sweep_policy(base, spec, start, growth, refine, target=target, cost_model=cm, log=log))
    return results


def tbt_samples(base: SimConfig, specs: list[PolicySpec], rate: float) -> dict[str, object]:
    """Every token gap (s) of each policy at one rate, for the TBT CDF."""
    cm = build_cost_model(base.model, base.hardware, base.tp_size)
    out = {}
    for spec in specs:
        cfg = dataclasses.replace(spec_config(base, spec), rate=rate)
        out[spec.label] = all_gaps(simulate(cfg, cost_model=cm).records)
    return out


def markdown_table(results: list[PolicySweep], baseline: str | None = None) -> str:
    """Goodput per policy and definition, with ratios to `baseline` (a label; default the first)."""
    base = next((r for r in results if r.spec.label == baseline), results[0]) if results else None
    lines = ["| policy | goodput (TTFT + TPOT), req/s | vs " + (base.spec.label if base else "-") +
             " | goodput (TTFT + max TBT), req/s | vs " + (base.spec.label if base else "-") + " |",
             "|---|---|---|---|---|"]
    for r in results:
        cells = [r.spec.label]
        for metric in METRICS:
            g, flag = r.goodput[metric], r.bounded[metric]
            if flag == "<":  # never reached the target: only a bound, no ratio
                cells += [f"< {min(r.runs):.3g} (not reached)", "n/a"]
                continue
            cells.append(f"{flag}{g:.2f}")
            ok = base is not None and base.bounded[metric] != "<" and base.goodput[metric] > 0
            cells.append(f"{g / base.goodput[metric]:.2f}x" if ok else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def points_table(results: list[PolicySweep]) -> str:
    lines = ["| policy | rate | attainment | max-TBT attainment | TTFT p99 ms | TBT p99 ms | TBT max ms | "
             "TPOT mean ms | output tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for rate in sorted(r.runs):
            m = r.runs[rate]
            lines.append(f"| {r.spec.label} | {rate:.3f} | {m.attainment:.3f} | {m.attainment_max_tbt:.3f} | "
                         f"{m.ttft_p99_ms:.0f} | {m.tbt_p99_ms:.1f} | {m.tbt_max_ms:.0f} | {m.tpot_mean_ms:.1f} | "
                         f"{m.throughput_tok_s:.0f} |")
    return "\n".join(lines)
