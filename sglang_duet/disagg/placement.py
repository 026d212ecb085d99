"""Placement search for disaggregated serving (DistServe's algorithm for high node affinity), simulated.

    python -m sglang_duet.disagg.placement --model qwen3-8b --hardware h100 --num-gpus 2 4 8 \\
        --workload azure-conv --tbt-slo-ms 100 --ttft-slo-ms 1000 --out benchmark/results/placement-...

1. For each tensor-parallel degree tp (1, 2, 4, 8 up to the budget), simulate ONE prefill instance
   of tp GPUs alone and find its goodput g_p(tp): the highest rate at which >= 90% of requests
   meet the TTFT SLO; likewise ONE decode instance alone, g_d(tp): >= 90% meet the TPOT
   (time-per-output-token) SLO. TP = tp times the compute, bandwidth and memory plus two
   all-reduces per layer over NVLink (cost_model.tp.TPCostModel).
2. Plans: (tp_p, n_p, tp_d, n_d) with n_p*tp_p + n_d*tp_d <= the GPU budget; a plan's goodput is
   min(n_p*g_p, n_d*g_d) (the slower phase limits it), its goodput per GPU that over its GPUs.
   The best plan maximises goodput per GPU (DistServe: then replicate it over the budget).
3. Check: simulate the chosen plan as a whole (prefill instances, KV transfer at bytes / link
   bandwidth, decode instances) and find its goodput under the joint SLO (TTFT and TPOT on the
   same request, as the colocated sweeps count it), and under the strict variant (every gap).
4. Next to it: the goodput per GPU of colocated serving (one instance of tp GPUs, for each tp
   searched, replicated) with the aggregated, chunked and duet policies, from the simulator's sweep.

Both sides run on the same emulated ground truth (`--truth`, on by default as in the simulator:
noise, host time per step, per-request attention; sglang_duet/cost_model/truth.py), so neither
is timed by the exact model its policies plan with while the other is not.

All numbers are simulated (roofline cost model, estimated H100 curves; docs/results.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field

from sglang_duet.cost_model.hardware import HardwareSpec
from sglang_duet.cost_model.tp import LinkSpec
from sglang_duet.cost_model.truth import TruthConfig
from sglang_duet.disagg.cluster_sim import ClusterConfig, InstanceSpec, sample_specs, simulate_cluster
from sglang_duet.simulator.loop import SimConfig
from sglang_duet.simulator.metrics import summarize
from sglang_duet.simulator.sweep import PolicySpec, crossing, sweep_policy

TARGET = 0.9


@dataclass
class SearchConfig:
    model: str = "qwen3-8b"
    hardware: str = "h100"
    workload: str = "azure-conv"
    tbt_slo_ms: float = 100.0
    ttft_slo_ms: float = 1000.0
    num_requests: int = 1500  # at least this many requests per simulated point...
    min_span_s: float = 30.0  # ...and at least this many seconds of arrivals (steady state, see below)
    seed: int = 0
    target: float = TARGET
    tps: tuple[int, ...] = (1, 2, 4, 8)
    link: LinkSpec | None = None  # None: the hardware file's link
    prefill: InstanceSpec = field(default_factory=lambda: InstanceSpec("aggregated", 8192))
    decode: InstanceSpec = field(default_factory=lambda: InstanceSpec("aggregated", 8192))
    start_rate: float = 4.0  # per GPU; the search grows or shrinks it
    decode_start_factor: float = 8.0  # decode instances start their search at start_rate x this
    refine: int = 3
    max_rate: float = 2000.0  # the search stops growing here (flag '>')
    truth: TruthConfig | None = field(default_factory=TruthConfig)  # both sides' emulated ground truth

    def __post_init__(self):
        if self.link is None:  # resolved here so that results record the link they were priced with
            self.link = LinkSpec.from_hardware(HardwareSpec.load(self.hardware))

    def requests_at(self, rate: float) -> int:
        """A fixed request count finishes arriving ever sooner as the rate grows; a decode instance
        then drains a finite burst and its queueing, spread over ~200 output tokens, hardly moves
        TPOT: goodput would grow without bound. Arrivals spanning many request lifetimes measure
        the steady state instead."""
        return max(self.num_requests, int(rate * self.min_span_s + 0.5))

    def cluster(self, **kw) -> ClusterConfig:
        return ClusterConfig(model=self.model, hardware=self.hardware, link=self.link, tbt_slo_ms=self.tbt_slo_ms,
                             ttft_slo_ms=self.ttft_slo_ms, prefill=self.prefill, decode=self.decode,
                             truth=dataclasses.replace(self.truth, seed=self.seed) if self.truth else None, **kw)


@dataclass
class Goodput:
    rate: float  # req/s at the target attainment (interpolated)
    flag: str  # "" inside the swept rates; "<" / ">" the crossing is outside them
    points: dict[float, float]  # rate -> attainment


def search_goodput(attainment, start: float, target: float = TARGET, growth: float = 1.6, refine: int = 3,
                   max_rate: float = 2000.0) -> Goodput:
    """Highest rate with attainment >= target: grow (or shrink) geometrically, bisect, interpolate."""
    pts: dict[float, float] = {}

    def at(rate: float) -> float:
        rate = round(rate, 4)
        if rate not in pts:
            pts[rate] = attainment(rate)
        return pts[rate]

    lo, hi, rate = None, None, start
    while rate <= max_rate:
        if at(rate) >= target:
            lo, rate = rate, rate * growth
        else:
            hi = rate
            break
    while lo is None and hi is not None and hi > start / 64:
        rate = hi / growth
        if at(rate) >= target:
            lo = rate
        else:
            hi = rate
    if lo is not None and hi is not None:
        for _ in range(refine):
            mid = (lo + hi) / 2
            if at(mid) >= target:
                lo = mid
            else:
                hi = mid
    g, flag = crossing(list(pts.items()), target)
    return Goodput(g, flag, dict(sorted(pts.items())))


def phase_goodput(cfg: SearchConfig, phase: str, tp: int, log=print) -> Goodput:
    """Goodput of one prefill (TTFT SLO) or one decode (TPOT SLO) instance of tp GPUs, alone."""
    def attainment(rate: float) -> float:
        res = simulate_cluster(cfg.cluster(tp_prefill=tp, tp_decode=tp),
                               sample_specs(cfg.workload, cfg.requests_at(rate), rate, cfg.seed), phase)
        m = summarize(res, cfg.tbt_slo_ms, cfg.ttft_slo_ms)
        a = m.ttft_attainment if phase == "prefill" else m.attainment  # decode alone: TTFT is 0
        log(f"  {phase:7s} tp={tp} rate {rate:8.3f}: attainment {a:.3f} (TTFT p99 {m.ttft_p99_ms:.0f} ms, "
            f"TPOT mean {m.tpot_mean_ms:.1f} ms) [{res.wall_s:.1f}s]")
        return a

    # A decode instance alone is cheap to load but slow to simulate at low rates (many small steps):
    # start its search higher.
    start = cfg.start_rate * tp * (1 if phase == "prefill" else cfg.decode_start_factor)
    return search_goodput(attainment, start, cfg.target, refine=cfg.refine, max_rate=cfg.max_rate)


@dataclass
class Plan:
    tp_prefill: int
    n_prefill: int
    tp_decode: int
    n_decode: int
    goodput_prefill: float  # one prefill instance, req/s
    goodput_decode: float  # one decode instance, req/s
    gpus: int = 0
    goodput: float = 0.0  # the plan's predicted goodput: min(n_p * g_p, n_d * g_d)
    goodput_per_gpu: float = 0.0
    bottleneck: str = ""

    def __post_init__(self):
        self.gpus = self.n_prefill * self.tp_prefill + self.n_decode * self.tp_decode
        p, d = self.n_prefill * self.goodput_prefill, self.n_decode * self.goodput_decode
        self.goodput = min(p, d)
        self.goodput_per_gpu = self.goodput / self.gpus
        self.bottleneck = "prefill" if p < d else ("decode" if d < p else "balanced")

    @property
    def label(self) -> str:
        return f"{self.n_prefill}P(tp{self.tp_prefill}) + {self.n_decode}D(tp{self.tp_decode})"


def enumerate_plans(g_p: dict[int, float], g_d: dict[int, float], num_gpus: int) -> list[Plan]:
    """Every (tp_p, n_p, tp_d, n_d) within the budget, best goodput per GPU first (then total)."""
    plans = []
    for tp_p, gp in g_p.items():
        for tp_d, gd in g_d.items():
            for n_p in range(1, num_gpus // tp_p + 1):
                for n_d in range(1, (num_gpus - n_p * tp_p) // tp_d + 1):
                    plans.append(Plan(tp_p, n_p, tp_d, n_d, gp, gd))
    plans.sort(key=lambda p: (-round(p.goodput_per_gpu, 9), -p.goodput, p.gpus))
    return plans


def validate_plan(cfg: SearchConfig, plan: Plan, log=print) -> dict[str, Goodput]:
    """The plan simulated as a whole: goodput under the joint SLO and its strict variant."""
    cc = cfg.cluster(n_prefill=plan.n_prefill, tp_prefill=plan.tp_prefill, n_decode=plan.n_decode,
                     tp_decode=plan.tp_decode)
    cache: dict[float, object] = {}

    def metrics(rate: float):
        if rate not in cache:
            res = simulate_cluster(cc, sample_specs(cfg.workload, cfg.requests_at(rate), rate, cfg.seed), "both")
            m = summarize(res, cfg.tbt_slo_ms, cfg.ttft_slo_ms)
            x = res.stats["kv_transfers"]
            log(f"  {plan.label} rate {rate:8.3f}: attainment {m.attainment:.3f} (max-TBT {m.attainment_max_tbt:.3f}), "
                f"TTFT p99 {m.ttft_p99_ms:.0f} ms, TBT p99 {m.tbt_p99_ms:.1f} ms, max {m.tbt_max_ms:.0f} ms, "
                f"KV {x['bytes'] / max(x['count'], 1) / 1e6:.0f} MB/req in "
                f"{x['seconds'] / max(x['count'], 1) * 1e3:.2f} ms [{res.wall_s:.1f}s]")
            cache[rate] = m
        return cache[rate]

    start = max(plan.goodput * 0.6, 0.1)
    return {metric: search_goodput(lambda r, k=metric: getattr(metrics(round(r, 4)), k), start, cfg.target,
                                   refine=cfg.refine, max_rate=cfg.max_rate)
            for metric in ("attainment", "attainment_max_tbt")}


def colocated_label(label: str, tp: int) -> str:
    return label if tp == 1 else f"{label}-tp{tp}"


def colocated(cfg: SearchConfig, policies: list[str], log=print, tps: tuple[int, ...] = (1,)) -> dict[str, dict]:
    """Goodput of one colocated instance per policy and tensor-parallel degree (tp GPUs, priced as
    the disaggregated instances are: cost_model/tp.py), from the simulator's sweep; `per_gpu` is
    its goodput over its GPUs (replicas scale it). Keys: the policy's label, "-tpN" for N > 1."""
    base = SimConfig(hardware=cfg.hardware, model=cfg.model, workload=cfg.workload, num_requests=cfg.num_requests,
                     seed=cfg.seed, tbt_slo_ms=cfg.tbt_slo_ms, ttft_slo_ms=cfg.ttft_slo_ms,
                     truth=dataclasses.replace(cfg.truth, seed=cfg.seed) if cfg.truth else None)
    out = {}
    for tp in tps:
        for text in policies:
            spec = PolicySpec.parse(text)
            label = colocated_label(spec.label, tp)
            log(f"colocated {label}")
            sw = sweep_policy(dataclasses.replace(base, tp_size=tp), spec, start=cfg.start_rate * tp,
                              target=cfg.target, refine=cfg.refine, log=lambda s: log(s))
            out[label] = {"tp": tp, "goodput": dict(sw.goodput), "bounded": dict(sw.bounded),
                          "per_gpu": {k: v / tp for k, v in sw.goodput.items()}}
    return out


def _validated(cfg: SearchConfig, plan: Plan, log) -> dict:
    v = validate_plan(cfg, plan, log)
    return {k: {"goodput": g.rate, "per_gpu": g.rate / plan.gpus, "flag": g.flag,
                "points": {str(r): a for r, a in g.points.items()}} for k, g in v.items()}


def search(cfg: SearchConfig, budgets: list[int], policies: list[str], validate: bool = True, log=print,
           reuse: dict | None = None) -> dict:
    """The whole search; `reuse`: a previous result whose phase goodputs and colocated sweeps to keep."""
    t0 = time.perf_counter()
    tps = [t for t in cfg.tps if t <= max(budgets)]
    g_p: dict[int, Goodput] = {}
    g_d: dict[int, Goodput] = {}
    for tp in tps:
        old = (reuse or {}).get("phase_goodput", {})
        if str(tp) in old.get("prefill", {}) and str(tp) in old.get("decode", {}):
            g_p[tp] = Goodput(**old["prefill"][str(tp)])
            g_d[tp] = Goodput(**old["decode"][str(tp)])
        else:
            g_p[tp] = phase_goodput(cfg, "prefill", tp, log)
            g_d[tp] = phase_goodput(cfg, "decode", tp, log)
        log(f"tp={tp}: one prefill instance {g_p[tp].rate:.2f} req/s{g_p[tp].flag}, "
            f"one decode instance {g_d[tp].rate:.2f} req/s{g_d[tp].flag}")
    results = {}
    for n in budgets:
        plans = enumerate_plans({t: g.rate for t, g in g_p.items()}, {t: g.rate for t, g in g_d.items()}, n)
        if not plans:
            raise ValueError(f"--num-gpus {n}: disaggregation needs at least 2 GPUs")
        best = plans[0]
        # DistServe replicates the best unit; when it does not divide the budget, the plan with the
        # most goodput on all N GPUs can be the better deployment: report it too.
        top = max(p.goodput for p in plans)
        ties = [p for p in plans if p.goodput >= top - 1e-9]
        fill = best if best in ties else min(ties, key=lambda p: p.gpus)
        entry = {"best": asdict(best) | {"label": best.label, "replicas": n // best.gpus,
                                         "total_on_budget": best.goodput * (n // best.gpus)},
                 "fill": asdict(fill) | {"label": fill.label, "per_budget_gpu": fill.goodput / n},
                 "top": [asdict(p) | {"label": p.label} for p in plans[:5]]}
        log(f"{n} GPUs: best plan {best.label}: predicted {best.goodput:.2f} req/s on {best.gpus} GPUs = "
            f"{best.goodput_per_gpu:.2f} req/s per GPU ({best.bottleneck}-bound); most on {n} GPUs: "
            f"{fill.label}, {fill.goodput:.2f} req/s")
        prev = (reuse or {}).get("plans", {}).get(str(n), {})
        if validate:
            same = prev.get("best", {}).get("label") == best.label and "validated" in prev
            entry["validated"] = prev["validated"] if same else _validated(cfg, best, log)
            if fill.label == best.label:
                entry["fill_validated"] = entry["validated"]
            elif prev.get("fill", {}).get("label") == fill.label and "fill_validated" in prev:
                entry["fill_validated"] = prev["fill_validated"]
            else:
                entry["fill_validated"] = _validated(cfg, fill, log)
        results[str(n)] = entry
    want = [colocated_label(PolicySpec.parse(p).label, tp) for tp in tps for p in policies]
    if reuse and reuse.get("colocated") and set(reuse["colocated"]) >= set(want):
        colo = {label: reuse["colocated"][label] for label in want}
    else:
        colo = colocated(cfg, policies, log, tuple(tps)) if policies else {}
    return {"config": _jsonable(asdict(cfg)), "phase_goodput": {
        "prefill": {str(t): asdict(g) for t, g in g_p.items()}, "decode": {str(t): asdict(g) for t, g in g_d.items()}},
        "plans": results, "colocated": colo, "wall_s": time.perf_counter() - t0}


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def markdown(res: dict) -> str:
    c = res["config"]
    lines = [f"Qwen3-8B-class model `{c['model']}` on simulated `{c['hardware']}`, workload `{c['workload']}`, "
             f"TTFT SLO {c['ttft_slo_ms']:g} ms, TPOT/TBT SLO {c['tbt_slo_ms']:g} ms, >= {c['num_requests']} requests "
             f"and >= {c['min_span_s']:g} s of arrivals per disaggregated point, {c['target']:.0%} attainment. "
             f"KV transfer and all-reduce link: "
             f"{c['link']['bandwidth'] / 1e9:g} GB/s per GPU per direction, {c['link']['latency_s'] * 1e6:g} us.", "",
             "Per-phase goodput of ONE instance (req/s):", "",
             "| tp | prefill (TTFT) | decode (TPOT) |", "|---|---|---|"]
    for t in res["phase_goodput"]["prefill"]:
        gp, gd = res["phase_goodput"]["prefill"][t], res["phase_goodput"]["decode"][t]
        lines.append(f"| {t} | {gp['flag']}{gp['rate']:.2f} | {gd['flag']}{gd['rate']:.2f} |")
    lines += ["", "Disaggregated plans (req/s, per GPU of the plan in parentheses; 'best': most goodput per GPU, "
              "'fill': most goodput on the whole budget):", "",
              "| GPUs | plan | predicted | simulated, TTFT+TPOT | simulated, TTFT+max TBT |", "|---|---|---|---|---|"]
    for n, e in res["plans"].items():
        rows = [("best", e["best"], e.get("validated"))]
        if "fill" in e and e["fill"]["label"] != e["best"]["label"]:
            rows.append(("fill", e["fill"], e.get("fill_validated")))
        for kind, b, v in rows:
            cells = [n, f"{kind}: {b['label']} ({b['gpus']} GPUs)", f"{b['goodput']:.2f} ({b['goodput_per_gpu']:.2f})"]
            for k in ("attainment", "attainment_max_tbt"):
                x = (v or {}).get(k)
                cells.append(f"{x['flag']}{x['goodput']:.2f} ({x['per_gpu']:.2f})" if x else "-")
            lines.append("| " + " | ".join(cells) + " |")
    if res["colocated"]:
        lines += ["", "Colocated, one instance of tp GPUs, replicated (per-GPU goodput = one instance's over its "
                  "GPUs; the same on any budget it divides):",
                  "", "| policy | tp | TTFT+TPOT req/s per GPU | TTFT+max TBT req/s per GPU |", "|---|---|---|---|"]
        for label, d in res["colocated"].items():
            g, f, tp = d["goodput"], d["bounded"], d.get("tp", 1)
            lines.append(f"| {label} | {tp} | {f['attainment']}{g['attainment'] / tp:.2f} | "
                         f"{f['attainment_max_tbt']}{g['attainment_max_tbt'] / tp:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sglang_duet.disagg.placement", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--hardware", default="h100")
    p.add_argument("--num-gpus", type=int, nargs="+", default=[8], help="GPU budget(s)")
    p.add_argument("--workload", default="azure-conv")
    p.add_argument("--tbt-slo-ms", type=float, default=100.0, help="TPOT SLO (decode) / TBT for the strict variant")
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8], help="tensor-parallel degrees to consider")
    p.add_argument("--num-requests", type=int, default=1500, help="requests per simulated point (at least)")
    p.add_argument("--min-span-s", type=float, default=30.0,
                   help="disaggregated runs: at least rate x this many requests (steady state)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=TARGET)
    p.add_argument("--refine", type=int, default=3)
    p.add_argument("--link-gbps", type=float, default=None,
                   help="achievable GPU-GPU bandwidth per direction (default: the hardware file's link; "
                        "NVLink 4 on H100: 450 peak, 360 achievable)")
    p.add_argument("--prefill-policy", default="aggregated:8192", help="NAME:BUDGET of prefill instances")
    p.add_argument("--decode-policy", default="aggregated:8192", help="NAME:BUDGET of decode instances")
    p.add_argument("--colocated", default="aggregated:8192,chunked:2048,duet:8192",
                   help="colocated policies to compare with ('' for none)")
    p.add_argument("--no-validate", action="store_true", help="skip simulating the best plan as a whole")
    p.add_argument("--out", default=None, help="folder for summary.md and placement.json")
    p.add_argument("--reuse", default=None, help="a placement.json whose phase goodputs, validations and colocated "
                                                 "sweeps to keep (same settings assumed)")
    p.add_argument("--truth", choices=("on", "off"), default="on",
                   help="the emulated GPUs' ground truth for both disaggregated and colocated runs (on: the "
                        "simulator's default truth; off: the exact model)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if any(t < 1 for t in a.tp):
        p.error(f"--tp: tensor-parallel degrees must be >= 1, got {a.tp}")
    return a


def _link(hardware: str, gbps: float | None) -> LinkSpec | None:
    """--link-gbps over the hardware file's link (its latency kept); None: the file's link as is."""
    if gbps is None:
        return None
    if gbps <= 0:
        raise SystemExit(f"--link-gbps must be > 0, got {gbps}")
    return dataclasses.replace(LinkSpec.from_hardware(HardwareSpec.load(hardware)), bandwidth=gbps * 1e9)


def _instance(text: str) -> InstanceSpec:
    s = PolicySpec.parse(text)
    return InstanceSpec(s.policy, s.chunked_prefill_size or 8192)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    log = (lambda *x: None) if a.quiet else (lambda s: print(s, flush=True))
    cfg = SearchConfig(model=a.model, hardware=a.hardware, workload=a.workload, tbt_slo_ms=a.tbt_slo_ms,
                       ttft_slo_ms=a.ttft_slo_ms, num_requests=a.num_requests, min_span_s=a.min_span_s,
                       seed=a.seed, target=a.target,
                       tps=tuple(sorted(a.tp)), link=_link(a.hardware, a.link_gbps),
                       prefill=_instance(a.prefill_policy), decode=_instance(a.decode_policy), refine=a.refine,
                       truth=TruthConfig() if a.truth == "on" else None)
    policies = [s for s in a.colocated.split(",") if s.strip()]
    reuse = None
    if a.reuse:
        with open(a.reuse) as f:
            reuse = json.load(f)
    res = search(cfg, sorted(a.num_gpus), policies, validate=not a.no_validate, log=log, reuse=reuse)
    cmd = "python -m sglang_duet.disagg.placement " + " ".join(shlex.quote(x) for x in argv)
    res["command"] = cmd
    table = markdown(res)
    log("\n" + table)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "placement.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(a.out, "summary.md"), "w") as f:
            f.write(f"# Placement search (simulated)\n\nCommand: `{cmd}`\n\n{table}\n")
        log(f"wrote {a.out}/summary.md and placement.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
