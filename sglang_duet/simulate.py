"""Policy A/B without a GPU: the scheduler core and policies on the emulated GPU, on a virtual clock.

    python -m sglang_duet.simulate --policy duet --hardware h100 --model qwen3-8b \\
        --workload azure-conv --rate 8 --num-requests 1000
    python -m sglang_duet.simulate --sweep --policies aggregated:8192,chunked:2048,static-split,duet \\
        --workload azure-conv --out /tmp/sim-h100-qwen3-8b-azure-conv

The emulated GPU runs on its own ground truth, on by default (`--truth off`: the exact model the
policy plans with): `--truth-hardware`, `--truth-perturb C,B` (e.g. 0.85,1.15), `--truth-noise`,
`--truth-host-us BASE,PER_REQ`, `--truth-switch-us`, `--truth-attention`, `--contention`; see
docs/cost-model.md. Token times are delivery times (each decode step's tokens reach the host when
the step ends), so every TBT is a gap between deliveries.

A policy may be given as NAME:BUDGET to run it with its own chunked_prefill_size. `--sweep`
finds each policy's goodput (the highest rate with >= 90% SLO attainment, DistServe's
definition and the max-TBT variant, see sglang_duet/simulator/metrics.py) and writes
summary.md, points.json and PNG plots under --out (one seed, policies as given). The tables of
docs/results.md (baselines tuned, 3 seeds, intervals) come from
`python -m sglang_duet.simulator.goodput_table`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys

from sglang_duet.cost_model.truth import CONTENTION_MODES, TruthConfig
from sglang_duet.simulator.loop import SimConfig, simulate
from sglang_duet.simulator.metrics import summarize
from sglang_duet.simulator.sweep import PolicySpec, markdown_table, points_table, sweep, tbt_samples

DEFAULT_POLICIES = "aggregated:8192,chunked:2048,static-split:8192,duet:8192"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sglang_duet.simulate", description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="chunked", help="built-in name, NAME:BUDGET, or a policy .py file")
    p.add_argument("--hardware", default="h100")
    p.add_argument("--model", default="qwen3-8b", help="a name in configs/models or a config.json path")
    p.add_argument("--workload", default="azure-conv")
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (one run)")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arrival", default=None,
                   help="override the workload's arrivals: poisson, or gamma:CV (e.g. gamma:2)")
    p.add_argument("--tbt-slo-ms", type=float, default=100.0)
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    p.add_argument("--chunked-prefill-size", type=int, default=2048,
                   help="token budget per step for policies given without :BUDGET")
    p.add_argument("--max-running-requests", type=int, default=256)
    p.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1,
                   help="tensor-parallel GPUs of the emulated group (priced by cost_model/tp.py)")
    p.add_argument("--max-total-tokens", type=int, default=None, help="KV slots (default: what the GPU holds)")
    p.add_argument("--policy-config", default=None, help="YAML/JSON file of policy options")
    p.add_argument("--disable-overlap-schedule", action="store_true",
                   help="plan each step only after the previous one ended (SGLang's flag; default: policies "
                        "that support it plan the next aggregated step while one runs)")
    t = p.add_argument_group("ground truth of the emulated GPU (policies plan with the plain cost model)")
    t.add_argument("--truth", choices=("on", "off"), default="on",
                   help="on: noise, host time, switch cost, per-request attention, phase contention (defaults "
                        "below); off: the exact model (the belief itself, launch-averaged contention); the "
                        "options below apply over either")
    t.add_argument("--truth-file", default=None, metavar="PATH",
                   help="a measured truth (e.g. configs/truth/h200-2026-11-30.yaml: host time, prefill-step scale, "
                        "two-lane contention measured on a GPU) in place of --truth's; the options below apply over it")
    t.add_argument("--truth-hardware", default=None, help="hardware name or file of the truth (default: --hardware)")
    t.add_argument("--truth-perturb", default=None, metavar="COMPUTE,BANDWIDTH",
                   help="scale the truth's compute and bandwidth curves, e.g. 0.85,1.15 (default 1,1)")
    t.add_argument("--truth-noise", type=float, default=None,
                   help=f"lognormal sigma of the per-launch factor (default {TruthConfig.noise_sigma})")
    t.add_argument("--truth-seed", type=int, default=None, help="noise seed (default: --seed)")
    t.add_argument("--truth-host-us", default=None, metavar="BASE,PER_REQ",
                   help=f"host time per step, us: BASE + PER_REQ x requests (default "
                        f"{TruthConfig.host_base_s * 1e6:g},{TruthConfig.host_per_req_s * 1e6:g})")
    t.add_argument("--truth-switch-us", type=float, default=None,
                   help=f"cost of changing a lane's SM count, us (default {TruthConfig.switch_s * 1e6:g})")
    t.add_argument("--truth-attention", choices=("per-request", "summed"), default=None,
                   help="attention as a sum of per-request rooflines (truth on) or one roofline (off)")
    t.add_argument("--contention", choices=CONTENTION_MODES, default=None,
                   help="HBM contention between lanes: phase (truth on), bandwidth (launch-averaged; truth "
                        "off) or none")
    p.add_argument("--sweep", action="store_true", help="find each policy's goodput")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated, for --sweep")
    p.add_argument("--start-rate", type=float, default=1.0, help="--sweep: first rate tried")
    p.add_argument("--refine", type=int, default=3, help="--sweep: bisection steps per crossing")
    p.add_argument("--target", type=float, default=0.9, help="--sweep: attainment that counts")
    p.add_argument("--cdf-rate", type=float, default=None,
                   help="--sweep: rate of the TBT CDF (default: the median goodput)")
    p.add_argument("--out", default=None, help="folder for results (sweep: required)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.tp_size < 1:
        p.error(f"--tp-size must be >= 1, got {a.tp_size}")
    return a


def truth_config(a: argparse.Namespace) -> TruthConfig:
    """--truth and its options as a TruthConfig."""
    over = {}
    if a.truth_hardware:
        over["hardware"] = a.truth_hardware
    if a.truth_perturb:
        over["perturb"] = a.truth_perturb
    if a.truth_noise is not None:
        over["noise"] = a.truth_noise
    if a.truth_host_us:
        over["host_us"] = a.truth_host_us
    if a.truth_switch_us is not None:
        over["switch_us"] = a.truth_switch_us
    if a.truth_attention:
        over["attention"] = a.truth_attention
    seed = a.seed if a.truth_seed is None else a.truth_seed
    if a.truth_file:
        base = TruthConfig.from_file(a.truth_file, seed=seed)
    else:
        base = TruthConfig(seed=seed) if a.truth == "on" else TruthConfig.exact(seed=seed)
    if not over:
        return base
    return TruthConfig.parse(over, **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})


def base_config(a: argparse.Namespace) -> SimConfig:
    options = {}
    if a.policy_config:
        from sglang_duet.engine_core import _read_config_file

        options = _read_config_file(a.policy_config)
    arrival = None
    if a.arrival:
        kind, _, cv = a.arrival.partition(":")
        arrival = {"process": kind, **({"cv": float(cv)} if cv else {})}
    return SimConfig(
        arrival=arrival, policy=a.policy, hardware=a.hardware, model=a.model, workload=a.workload, rate=a.rate,
        num_requests=a.num_requests, seed=a.seed, tbt_slo_ms=a.tbt_slo_ms, ttft_slo_ms=a.ttft_slo_ms,
        chunked_prefill_size=a.chunked_prefill_size, max_running_requests=a.max_running_requests,
        tp_size=a.tp_size, kv_slots=(a.max_total_tokens + 1) if a.max_total_tokens else None, contention=a.contention,
        policy_options=options, truth=truth_config(a), overlap=not a.disable_overlap_schedule,
    )


def run_one(a: argparse.Namespace, log) -> dict:
    spec = PolicySpec.parse(a.policy) if not a.policy.endswith(".py") else PolicySpec(a.policy, a.policy)
    cfg = base_config(a)
    cfg.policy = spec.policy
    cfg.chunked_prefill_size = spec.chunked_prefill_size or cfg.chunked_prefill_size
    res = simulate(cfg)
    m = summarize(res)
    out = {"config": vars(a), "metrics": m.to_dict(), "stats": res.stats, "wall_s": res.wall_s}
    log(f"{spec.label} on {a.workload} at {a.rate} req/s ({m.num_requests} requests, {res.sim_time_s:.1f} s "
        f"simulated in {res.wall_s:.2f} s)")
    for k, v in m.to_dict().items():
        log(f"  {k:22s} {v:.4g}" if isinstance(v, float) else f"  {k:22s} {v}")
    log(f"  plans {res.stats['plans']}  launches {res.stats['launches']}  retractions {res.stats['retractions']}")
    log(f"  truth {res.stats['truth']}  contention {res.stats['contention']}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        label = os.path.splitext(os.path.basename(spec.label))[0]
        with open(os.path.join(a.out, f"run-{label}-{a.rate:g}.json"), "w") as f:
            json.dump(out, f, indent=1, default=str)
    return out


def run_sweep(a: argparse.Namespace, log, argv) -> dict:
    from sglang_duet.simulator.plots import write_all

    if not a.out:
        raise SystemExit("--sweep needs --out FOLDER")
    specs = [PolicySpec.parse(s) for s in a.policies.split(",") if s.strip()]
    base = base_config(a)
    results = sweep(base, specs, start=a.start_rate, target=a.target, refine=a.refine, log=log)
    cdf_rate = a.cdf_rate or statistics.median(r.goodput["attainment"] for r in results)
    gaps = tbt_samples(base, specs, cdf_rate)
    arrivals = f" ({a.arrival} arrivals)" if a.arrival else ""
    title = (f"{a.model} on {a.hardware}, {a.workload}{arrivals}, TBT SLO {a.tbt_slo_ms:g} ms, "
             f"TTFT SLO {a.ttft_slo_ms:g} ms")
    os.makedirs(a.out, exist_ok=True)
    pngs = write_all(results, gaps, cdf_rate, a.out, a.tbt_slo_ms, a.target, title)
    cmd = "python -m sglang_duet.simulate " + " ".join(shlex.quote(x) for x in argv)
    summary = [f"# Simulated goodput: {title}", "", f"Command: `{cmd}`", "",
               f"{a.num_requests} requests per point, seed {a.seed}, attainment target {a.target:.0%}; "
               "'<' / '>': the crossing lies outside the swept rates. Token times are delivery times.", "",
               f"Emulated GPU ground truth: `{json.dumps(base.truth.describe() if base.truth else 'exact')}`, "
               f"contention {base.contention or (base.truth.contention if base.truth else 'bandwidth')}.", "",
               markdown_table(results), "", "## Every simulated point", "", points_table(results), ""]
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write("\n".join(summary))
    data = {"command": cmd, "config": vars(a), "cdf_rate": cdf_rate,
            "truth": base.truth.describe() if base.truth else "exact",
            "goodput": {r.spec.label: {"goodput": r.goodput, "bounded": r.bounded} for r in results},
            "points": {r.spec.label: {str(k): m.to_dict() for k, m in sorted(r.runs.items())} for r in results}}
    with open(os.path.join(a.out, "points.json"), "w") as f:
        json.dump(data, f, indent=1)
    log("\n" + markdown_table(results))
    log(f"wrote {a.out}/summary.md, points.json, " + ", ".join(os.path.basename(p) for p in pngs))
    return data


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    log = (lambda *x: None) if a.quiet else (lambda s: print(s, flush=True))
    if a.sweep:
        run_sweep(a, log, argv)
    else:
        run_one(a, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
