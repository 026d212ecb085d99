"""One goodput table per workload: every baseline family tuned, then mean and 95% interval over seeds.

    python -m sglang_duet.simulator.goodput_table --workload azure-conv-trace --hardware h100 \\
        --model qwen3-8b --out benchmark/results/sim-emulated-h100-qwen3-8b-azure-conv-trace

1. Tuning (cheap): each baseline family is swept on seed 0 with `--tune-requests` requests per
   point, strict attainment only: chunked over `--chunked-budgets` (512 ... 8192) and static-split
   over `--static-sms` decode SMs (8 ... 64), in FCFS order; the best of them is then tried with
   duet's deadline queue order too (`--baseline-orders`), so a baseline is not behind by queue
   order alone. The member with the highest strict goodput is the family's representative; the
   table says which it was and lists every member's tuning goodput.
2. Goodput per seed: the best member of each family, aggregated:8192 (SGLang's default) and the
   `--contenders` (duet-paper:8192, duet:8192), each on `--seeds` seeds with `--num-requests`
   requests per point, both attainment definitions (strict: TTFT and every token gap within the
   SLO; DistServe: TTFT and the mean TPOT within it). A seed is a different sample of request
   lengths and arrivals (for a trace replayed row by row: a different window of the trace, rows
   from seed x num_requests) and a different noise stream of the emulated GPU's truth; every
   policy sees the same requests per seed (common random numbers), so ratios are paired per seed.
3. The table: goodput mean and 95% t-interval over seeds per policy and definition, and duet's
   ratio to each other policy (mean of the per-seed ratios and its t-interval).

`--truth-perturb C,B` runs on a perturbed truth, `--truth-file` on a measured one (configs/truth/); with `--tuned-from TABLE.json` the baselines are
the members tuned there (e.g. on the unperturbed curves) instead of being tuned again.
`--reuse TABLE.json --rerun duet-8192` keeps that table's tuning and per-seed runs of every other
policy and simulates only the named ones again (after a change to them; same settings assumed).
Goodput search (`find_goodput`): geometric growth (or shrink) from a start rate until the target
attainment is bracketed, bisection until the bracket is within `--rel-tol`, then the linear
interpolation of the crossing (sweep.crossing). The strict goodput is found first; since a request
that meets the strict SLO meets the DistServe one, the DistServe search starts from its bracket.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

from scipy import stats as sps

from sglang_duet.cost_model.truth import TruthConfig
from sglang_duet.simulator.loop import SimConfig, build_cost_model, simulate
from sglang_duet.simulator.metrics import RunMetrics, summarize
from sglang_duet.simulator.sweep import PolicySpec, crossing, spec_config
from sglang_duet.workloads import Workload

STRICT, DISTSERVE = "attainment_max_tbt", "attainment"
METRIC_NAMES = {STRICT: "strict (every gap)", DISTSERVE: "DistServe (mean TPOT)"}
AGGREGATED = "aggregated:8192"
DEFAULT_CONTENDERS = "duet-paper:8192,duet:8192"
DUET = "duet-8192"


# ---- statistics ---------------------------------------------------------------------------------


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean; (x, x, x) for a single value."""
    n = len(values)
    m = statistics.fmean(values)
    if n < 2:
        return m, m, m
    half = sps.t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return m, m - half, m + half


def fmt_interval(v: tuple[float, float, float], digits: int = 2, suffix: str = "") -> str:
    m, lo, hi = v
    return f"{m:.{digits}f}{suffix} [{lo:.{digits}f}, {hi:.{digits}f}]"


# ---- goodput search -----------------------------------------------------------------------------


@dataclass
class Goodput:
    rate: float
    flag: str  # "" bracketed; "<" even the lowest rate failed; ">" no rate failed up to max_rate


def find_goodput(attain, start: float, target: float = 0.9, growth: float = 1.5, rel_tol: float = 0.06,
                 max_rate: float = 400.0, min_rate: float | None = None, known: dict | None = None) -> Goodput:
    """Highest rate with attainment >= target. `attain(rate)` -> attainment (cache it: rates are
    rounded to 4 digits and may repeat); `known`: rate -> attainment already measured."""
    pts: dict[float, float] = dict(known or {})
    min_rate = start / 64 if min_rate is None else min_rate

    def at(rate: float) -> float:
        rate = round(rate, 4)
        if rate not in pts:
            pts[rate] = attain(rate)
        return pts[rate]

    def bracket():
        fails = sorted(r for r, a in pts.items() if a < target)
        hi = fails[0] if fails else None
        passes = [r for r, a in pts.items() if a >= target and (hi is None or r < hi)]
        return (max(passes) if passes else None), hi

    lo, hi = bracket()
    if lo is None and hi is None:
        at(start)
        lo, hi = bracket()
    while hi is None and lo * growth <= max_rate:  # grow
        at(lo * growth)
        lo, hi = bracket()
    while lo is None and hi / growth >= min_rate:  # shrink
        at(hi / growth)
        lo, hi = bracket()
    while lo is not None and hi is not None and hi - lo > rel_tol * hi:
        at((lo + hi) / 2)
        lo, hi = bracket()
    rate, flag = crossing(list(pts.items()), target)
    return Goodput(rate, flag)


@dataclass
class SeedRun:
    """One policy on one seed: its goodput per definition and every point simulated."""

    seed: int
    goodput: dict[str, Goodput] = field(default_factory=dict)
    points: dict[float, RunMetrics] = field(default_factory=dict)


def seed_config(base: SimConfig, seed: int, num_requests: int) -> SimConfig:
    """`base` on seed `seed`: the workload's and the truth's noise seeds, and for a trace replayed
    row by row its window (rows from seed x num_requests)."""
    opts = dict(base.workload_options)
    wl = Workload.load(base.workload, **({"arrival": dict(base.arrival)} if base.arrival else {}))
    if wl.trace is not None and wl.trace_order == "sequential":
        opts["start"] = int(opts.get("start", 0)) + seed * num_requests
    truth = dataclasses.replace(base.truth, seed=seed) if base.truth is not None else None
    return dataclasses.replace(base, seed=seed, num_requests=num_requests, workload_options=opts, truth=truth)


def goodput_run(base: SimConfig, spec: PolicySpec, seed: int, num_requests: int, start: float,
                metrics=(STRICT, DISTSERVE), target: float = 0.9, rel_tol: float = 0.06, cost_model=None,
                log=print, min_rate: float | None = None) -> SeedRun:
    """`min_rate`: stop shrinking below it (goodput '<' it); default start / 64."""
    cfg = spec_config(seed_config(base, seed, num_requests), spec)
    out = SeedRun(seed)

    def run(rate: float) -> RunMetrics:
        rate = round(rate, 4)
        if rate not in out.points:
            t0 = time.perf_counter()
            m = summarize(simulate(dataclasses.replace(cfg, rate=rate), cost_model=cost_model))
            out.points[rate] = m
            log(f"    {spec.label:>24s} seed {seed} n={num_requests} rate {rate:7.3f}: strict {m.attainment_max_tbt:.3f}"
                f" distserve {m.attainment:.3f} TTFT p99 {m.ttft_p99_ms:.0f} ms TBT p99 {m.tbt_p99_ms:.1f} ms"
                f" [{time.perf_counter() - t0:.1f}s]")
        return out.points[rate]

    for metric in metrics:
        known = {r: getattr(m, metric) for r, m in out.points.items()}
        out.goodput[metric] = find_goodput(lambda r, k=metric: getattr(run(r), k), start, target, rel_tol=rel_tol,
                                           known=known, min_rate=min_rate)
    return out


# ---- tuning -------------------------------------------------------------------------------------


def families(chunked_budgets: list[int], static_sms: list[int], static_budget: int) -> dict[str, list[PolicySpec]]:
    return {"chunked": [PolicySpec.parse(f"chunked:{b}") for b in chunked_budgets],
            "static-split": [PolicySpec.parse(f"static-split:{static_budget}+decode_sms={s}") for s in static_sms]}


def tune(base: SimConfig, fams: dict[str, list[PolicySpec]], num_requests: int, start: float,
         target: float = 0.9, cost_model=None, log=print, orders: tuple[str, ...] = ("deadline",),
         known: dict | None = None) -> dict[str, dict]:
    """Each family's members by strict goodput on seed 0: {family: {"best": label, "members": {label: rate}}}.
    The grid runs with each policy's own queue order (FCFS); the best member is then tried with each
    of `orders` (ttft_order, e.g. duet's "deadline") too, and keeps it if that serves more.
    `known`: an earlier tuning's result whose members are not measured again."""
    out = {}
    done = {label: m for t in (known or {}).values() for label, m in t["members"].items()}

    def measure(spec: PolicySpec, guess: float, best: float = 0.0) -> Goodput:
        if spec.label in done:
            return Goodput(done[spec.label]["goodput"], done[spec.label]["flag"])
        log(f"  tuning {spec.label}")
        # A member below a quarter of the family's best so far cannot be its best: stop there
        # (low rates are the slowest to simulate).
        return goodput_run(base, spec, 0, num_requests, guess, metrics=(STRICT,), target=target, rel_tol=0.08,
                           cost_model=cost_model, log=log, min_rate=best / 4 if best > 0 else None).goodput[STRICT]

    def rank(m: dict) -> tuple:
        return (m["flag"] != "<", m["goodput"])

    for fam, specs in fams.items():
        members, guess = {}, start
        for spec in specs:
            best = max((m["goodput"] for m in members.values() if m["flag"] != "<"), default=0.0)
            g = measure(spec, guess, best)
            members[spec.label] = {"goodput": g.rate, "flag": g.flag, "spec": _spec_text(spec)}
            if g.flag != "<" and g.rate > 0:
                guess = g.rate  # neighbours are close: start there
        best = max(members, key=lambda k: rank(members[k]))
        for order in orders:
            spec = PolicySpec.parse(members[best]["spec"] + f"+ttft_order={order}")
            g = measure(spec, members[best]["goodput"] or start)
            members[spec.label] = {"goodput": g.rate, "flag": g.flag, "spec": _spec_text(spec)}
        best = max(members, key=lambda k: rank(members[k]))
        out[fam] = {"best": best, "members": members}
        log(f"  {fam}: best {best} ({members[best]['goodput']:.2f} req/s strict, seed 0, {num_requests} requests)")
    return out


def _spec_text(spec: PolicySpec) -> str:
    head = spec.policy + (f":{spec.chunked_prefill_size}" if spec.chunked_prefill_size else "")
    return head + "".join(f"+{k}={v}" for k, v in spec.options)


# ---- the table ----------------------------------------------------------------------------------


def build_table(base: SimConfig, policies: list[PolicySpec], seeds: list[int], num_requests: int,
                starts: dict[str, float], target: float = 0.9, rel_tol: float = 0.06, log=print) -> dict:
    cm = build_cost_model(base.model, base.hardware, base.tp_size)
    runs: dict[str, list[SeedRun]] = {}
    for spec in policies:
        start = starts.get(spec.label, 4.0)
        runs[spec.label] = []
        for seed in seeds:
            log(f"  {spec.label} seed {seed} (start {start:.2f} req/s)")
            r = goodput_run(base, spec, seed, num_requests, start, target=target, rel_tol=rel_tol, cost_model=cm,
                            log=log)
            runs[spec.label].append(r)
            if r.goodput[STRICT].flag != "<":
                start = r.goodput[STRICT].rate
    return runs


def summarise_table(runs: dict[str, list[SeedRun]], duet: str = DUET) -> dict:
    out = {}
    for label, rs in runs.items():
        row = {}
        for metric in (STRICT, DISTSERVE):
            vals = [r.goodput[metric].rate for r in rs]
            row[metric] = {"per_seed": vals, "flags": [r.goodput[metric].flag for r in rs],
                           "mean_ci": t_interval(vals)}
            if duet in runs and label != duet:
                ratios = [d.goodput[metric].rate / b.goodput[metric].rate if b.goodput[metric].rate > 0 else math.inf
                          for d, b in zip(runs[duet], rs)]
                row[metric]["duet_ratio_per_seed"] = ratios
                row[metric]["duet_ratio_ci"] = t_interval(ratios) if all(map(math.isfinite, ratios)) else None
        out[label] = row
    return out


def markdown(summary: dict, roles: dict[str, str], duet: str = DUET, tp_size: int = 1) -> str:
    """The table; under TP (`tp_size` GPUs per emulated group) also the strict goodput per GPU."""
    per_gpu = tp_size > 1
    lines = ["| policy | role | strict goodput, req/s (mean [95% CI]) | duet / it, strict | "
             "DistServe goodput, req/s | duet / it, DistServe |"
             + (f" strict per GPU (/{tp_size}) |" if per_gpu else ""),
             "|---|---|---|---|---|---|" + ("---|" if per_gpu else "")]
    for label, row in summary.items():
        cells = [label, roles.get(label, "")]
        for metric in (STRICT, DISTSERVE):
            r = row[metric]
            flags = "".join(sorted(set(r["flags"]) - {""}))
            cells.append(fmt_interval(r["mean_ci"]) + (f" ({flags} on some seed)" if flags else ""))
            ci = r.get("duet_ratio_ci")
            cells.append("-" if label == duet else (fmt_interval(ci, suffix="x") if ci else "n/a"))
        if per_gpu:
            cells.append(fmt_interval(tuple(x / tp_size for x in row[STRICT]["mean_ci"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def points_markdown(runs: dict[str, list[SeedRun]]) -> str:
    lines = ["| policy | seed | rate | strict | DistServe | TTFT p99 ms | TBT p99 ms | TBT max ms | output tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, rs in runs.items():
        for r in rs:
            for rate in sorted(r.points):
                m = r.points[rate]
                lines.append(f"| {label} | {r.seed} | {rate:.3f} | {m.attainment_max_tbt:.3f} | {m.attainment:.3f} | "
                             f"{m.ttft_p99_ms:.0f} | {m.tbt_p99_ms:.1f} | {m.tbt_max_ms:.0f} | {m.throughput_tok_s:.0f} |")
    return "\n".join(lines)


class _StoredPoint:
    """A point read back from table.json (the fields `_point` keeps)."""

    def __init__(self, d: dict):
        self.__dict__.update(d)


def load_runs(data: dict, labels) -> dict[str, list[SeedRun]]:
    """The per-seed runs of `labels` stored in a table.json's data."""
    out = {}
    for label in labels:
        out[label] = [SeedRun(r["seed"], {k: Goodput(**g) for k, g in r["goodput"].items()},
                              {float(rate): _StoredPoint(m) for rate, m in r["points"].items()})
                      for r in data["points"][label]]
    return out


def _point(m: RunMetrics) -> dict:
    return {k: round(getattr(m, k), 4) for k in ("attainment_max_tbt", "attainment", "ttft_p99_ms", "tbt_p99_ms",
                                                   "tbt_max_ms", "throughput_tok_s")}


def headline(paths: list[str]) -> str:
    """One row per table.json: duet's strict goodput, the best tuned baseline and duet's ratios."""
    def ci(c):
        return f"{c[0]:.2f} [{c[1]:.2f}, {c[2]:.2f}]"

    lines = ["| table | duet strict goodput, req/s | best tuned baseline (strict) | duet / best | duet / aggregated |",
             "|---|---|---|---|---|"]
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        s, roles = d["summary"], d["roles"]
        if DUET not in s:
            continue
        best = [k for k in s if roles.get(k, "").startswith("best")]
        bb = max(best, key=lambda k: s[k][STRICT]["mean_ci"][0]) if best else None

        def ratio(k):
            c = s[k][STRICT].get("duet_ratio_ci") if k in s else None
            return ci(c).replace(" [", "x [") if c else "-"

        lines.append(f"| {os.path.basename(os.path.dirname(path)) or path} | {ci(s[DUET][STRICT]['mean_ci'])} | "
                     + (f"{bb} {ci(s[bb][STRICT]['mean_ci'])} | {ratio(bb)}" if bb else "- | -")
                     + f" | {ratio('aggregated-8192')} |")
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sglang_duet.simulator.goodput_table",
                                description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="azure-conv-trace")
    p.add_argument("--arrival", default=None, help="override the workload's arrivals: poisson, or gamma:CV")
    p.add_argument("--hardware", default="h100")
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1,
                   help="GPUs of each emulated tensor-parallel group (cost_model/tp.py prices its all-reduces; the "
                        "policies plan with the same model); the table adds goodput per GPU")
    p.add_argument("--tbt-slo-ms", type=float, default=100.0)
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per policy")
    p.add_argument("--num-requests", type=int, default=1000, help="requests per point of the per-seed goodputs")
    p.add_argument("--tune-requests", type=int, default=600, help="requests per point while tuning (seed 0)")
    p.add_argument("--chunked-budgets", default="512,1024,2048,4096,8192")
    p.add_argument("--static-sms", default="8,16,24,32,40,48,64", help="decode SMs tried for static-split")
    p.add_argument("--static-budget", type=int, default=8192, help="static-split's prefill chunk budget")
    p.add_argument("--baseline-orders", default="deadline",
                   help="queue orders (ttft_order) also tried for each family's best member ('' for none)")
    p.add_argument("--contenders", default=DEFAULT_CONTENDERS, help="policies run as given (duet must be one)")
    p.add_argument("--no-aggregated", action="store_true", help="leave out aggregated:8192")
    p.add_argument("--tuned-from", default=None, help="a table.json whose tuned members to use (no tuning)")
    p.add_argument("--reuse", default=None, help="a table.json whose tuning and runs to keep (see --rerun)")
    p.add_argument("--rerun", default=DUET, help="with --reuse: comma-separated labels to simulate again")
    p.add_argument("--retune", action="store_true",
                   help="with --reuse: tune again (members tuned there are not measured again; new ones are)")
    p.add_argument("--start-rate", type=float, default=4.0)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--rel-tol", type=float, default=0.06, help="bisect until the bracket is this narrow")
    p.add_argument("--truth", choices=("on", "off"), default="on")
    p.add_argument("--truth-perturb", default=None, metavar="COMPUTE,BANDWIDTH")
    p.add_argument("--truth-file", default=None, metavar="PATH",
                   help="a measured truth (configs/truth/*.yaml) in place of --truth's; --truth-perturb applies over it")
    p.add_argument("--out", default=None, help="folder for table.md and table.json (required unless --collect)")
    p.add_argument("--collect", nargs="+", default=None, metavar="TABLE.json",
                   help="print the headline rows of these tables and exit")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.tp_size < 1:
        p.error(f"--tp-size must be >= 1, got {a.tp_size}")
    return a


def base_config(a) -> SimConfig:
    if a.truth_file:
        truth = TruthConfig.from_file(a.truth_file)
    else:
        truth = TruthConfig() if a.truth == "on" else TruthConfig.exact()
    if a.truth_perturb:
        truth = dataclasses.replace(truth, perturb=tuple(float(x) for x in a.truth_perturb.split(",")))
    arrival = None
    if a.arrival:
        kind, _, cv = a.arrival.partition(":")
        arrival = {"process": kind, **({"cv": float(cv)} if cv else {})}
    return SimConfig(hardware=a.hardware, model=a.model, workload=a.workload, tbt_slo_ms=a.tbt_slo_ms,
                     ttft_slo_ms=a.ttft_slo_ms, truth=truth, arrival=arrival, tp_size=a.tp_size)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    log = (lambda *x: None) if a.quiet else (lambda s: print(s, flush=True))
    if a.collect:
        print(headline(a.collect))
        return 0
    if not a.out:
        raise SystemExit("goodput_table: --out FOLDER is required (or --collect TABLE.json ...)")
    t0 = time.perf_counter()
    base = base_config(a)
    cm = build_cost_model(a.model, a.hardware, a.tp_size)
    reused = None
    if a.reuse:
        with open(a.reuse) as f:
            reused = json.load(f)
    if reused is not None and not a.tuned_from and not a.retune:
        tuned = reused["tuning"]
        log(f"tuned members from {a.reuse}: " + ", ".join(f"{k} {v['best']}" for k, v in tuned.items()))
    elif a.tuned_from:
        with open(a.tuned_from) as f:
            tuned = json.load(f)["tuning"]
        log(f"tuned members from {a.tuned_from}: " + ", ".join(f"{k} {v['best']}" for k, v in tuned.items()))
    else:
        log(f"tuning on {a.workload} ({a.model} on {a.hardware})")
        fams = families(_ints(a.chunked_budgets), _ints(a.static_sms), a.static_budget)
        orders = tuple(x.strip() for x in a.baseline_orders.split(",") if x.strip())
        tuned = tune(base, fams, a.tune_requests, a.start_rate, a.target, cm, log, orders,
                     known=reused["tuning"] if reused is not None else None)
    policies, roles, starts = [], {}, {}
    for fam, t in tuned.items():
        spec = PolicySpec.parse(t["members"][t["best"]]["spec"])
        policies.append(spec)
        roles[spec.label] = f"best {fam} (tuned)"
        starts[spec.label] = max(t["members"][t["best"]]["goodput"], a.start_rate / 4)
    if not a.no_aggregated:
        policies.append(PolicySpec.parse(AGGREGATED))
        roles[policies[-1].label] = "SGLang default"
    for text in a.contenders.split(","):
        if text.strip():
            policies.append(PolicySpec.parse(text))
            roles.setdefault(policies[-1].label, "contender")
    best_fixed = max((s.label for s in policies if roles.get(s.label, "").startswith("best")),
                     key=lambda k: starts[k], default=None)
    for s in policies:
        starts.setdefault(s.label, starts.get(best_fixed, a.start_rate))
    log(f"goodput over {a.seeds} seeds: " + ", ".join(s.label for s in policies))
    keep = set()
    if reused is not None:
        rerun = {x.strip() for x in a.rerun.split(",")}
        keep = {s.label for s in policies if s.label not in rerun and s.label in reused["points"]}
        log(f"reusing the runs of {sorted(keep)} from {a.reuse}")
    fresh = build_table(base, [s for s in policies if s.label not in keep], list(range(a.seeds)), a.num_requests,
                        starts, a.target, a.rel_tol, log)
    stored = load_runs(reused, keep) if keep else {}
    runs = {s.label: stored[s.label] if s.label in stored else fresh[s.label] for s in policies}
    summary = summarise_table(runs)
    cmd = "python -m sglang_duet.simulator.goodput_table " + " ".join(shlex.quote(x) for x in argv)
    truth = base.truth.describe() if base.truth else "exact"
    title = (f"{a.model} on emulated {a.hardware}" + (f" x {a.tp_size} (tensor parallel)" if a.tp_size > 1 else "")
             + f", {a.workload}" + (f" ({a.arrival} arrivals)" if a.arrival else "")
             + (f", truth {os.path.basename(a.truth_file)}" if a.truth_file else "")
             + (f", truth perturbed {a.truth_perturb}" if a.truth_perturb else ""))
    tune_lines = []
    for fam, t in tuned.items():
        members = ", ".join(f"{k} {v['flag']}{v['goodput']:.2f}" for k, v in t["members"].items())
        tune_lines.append(f"- {fam}: best **{t['best']}**; strict goodput of each member (seed 0): {members}")
    md = [f"# Goodput: {title}", "", f"Command: `{cmd}`", "",
          f"TBT SLO {a.tbt_slo_ms:g} ms (delivery-time gaps), TTFT SLO {a.ttft_slo_ms:g} ms, target {a.target:.0%} "
          f"attainment; {a.seeds} seeds x {a.num_requests} requests per point; mean and 95% t-interval over seeds; "
          "ratios are per-seed (paired) duet / policy. Emulated GPU, truth: "
          f"`{json.dumps(truth)}`.", "",
          "Tuning" + (f" (from {a.tuned_from or a.reuse})" if a.tuned_from or (a.reuse and not a.retune)
                      else f" ({a.tune_requests} requests per point, seed 0)") + ":", *tune_lines,
          *(["", f"Runs of {', '.join(sorted(keep))} reused from {a.reuse} (the same settings); the command "
                 "without --reuse/--rerun/--retune simulates every run from scratch and gives the same table."]
            if keep or a.retune else []), "", markdown(summary, roles, tp_size=a.tp_size), "",
          f"Simulated in {time.perf_counter() - t0:.0f} s.", "", "## Every simulated point", "",
          points_markdown(runs), ""]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write("\n".join(md))
    data = {"command": cmd, "title": title, "truth": truth, "tuning": tuned, "roles": roles, "tp_size": a.tp_size,
            "summary": summary,
            "points": {lbl: [{"seed": r.seed, "goodput": {k: dataclasses.asdict(g) for k, g in r.goodput.items()},
                              "points": {str(rate): _point(m) for rate, m in sorted(r.points.items())}} for r in rs]
                       for lbl, rs in runs.items()}}
    with open(os.path.join(a.out, "table.json"), "w") as f:
        json.dump(data, f, indent=1)
    log("\n" + markdown(summary, roles, tp_size=a.tp_size))
    log(f"wrote {a.out}/table.md, table.json ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
