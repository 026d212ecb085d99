"""The GPU A/B's runs, predicted: the same traces and policy settings through the emulated GPU.

    python benchmark/gpu_ab_emulated.py benchmark/results/gpu/h200-2026-11-30/ab.json \\
        --hardware configs/hardware/h200-calibrated.yaml --out /tmp/ab_emulated.md

Reads a `benchmark/gpu_ab.py` results.json (its meta: workload, requests, rate, length caps, seeds, SLOs,
KV tokens, max running, each policy's options and token budget), rebuilds each seed's trace with
gpu_ab's own `build_trace` (same lengths and arrivals), replays it through the simulator (scheduler core
and policy on the emulated executor, virtual clock), scores it with gpu_ab's own `metrics`, and prints
the predicted strict goodput and its ratio to aggregated's and to chunked's next to what the GPU measured.

Two emulations: `truth on` (the emulator's default ground truth, a perturbed model the policies do
not plan with: how a policy is judged here) and `exact` (the truth is the planning model itself).
The policies plan with --hardware (default: the one the GPU run's policies planned with, if it exists
here, else h200).

`--truth SPEC` (repeatable) adds an emulation with another truth: a truth file (e.g.
configs/truth/h200-2026-11-30.yaml, the H200's measured host time, prefill-step scale and two-lane
contention) or a TruthConfig.parse spec ('file=...,noise=0'); its row is labelled with the file's
name or the spec. `--no-default-truths` leaves out the two default emulations; `--latency` adds a
table of TTFT / TBT p99 per source and policy (means over seeds), `--launches` one of launches per
lane and the seconds both split lanes ran at once, `--predictions` each lane's launch time over the
policy's prediction (the GPU run's measured_over_predicted beside the emulator's). `--policy SPEC` (repeatable) adds an
emulated-only column, a policy the GPU did not run, in the simulator's spec (e.g.
`duet+running_target=1`): the GPU run's settings of that policy with the spec's options over them.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO / "benchmark"))

from gpu_ab import Rec, build_trace, metrics  # noqa: E402

from sglang_duet.simulator.loop import SimConfig, build_cost_model, simulate  # noqa: E402
from sglang_duet.simulator.sweep import PolicySpec  # noqa: E402
from sglang_duet.cost_model.truth import TruthConfig  # noqa: E402
from sglang_duet.workloads import RequestSpec  # noqa: E402


def emulate(meta: dict, policy: str, settings: dict, seed: int, hardware: str, truth: TruthConfig | None) -> dict:
    """One policy on one seed's trace: gpu_ab's metrics over the simulated token times."""
    cm = build_cost_model(Path(meta["cost_model_config"]).stem, hardware)
    kv = int(meta["kv_tokens"])
    trace = build_trace(meta["workload"], meta["num_requests"], meta["rate"], seed, meta["max_input"],
                        meta["max_output"], cm.model.vocab_size, cm.model.max_position_embeddings, kv)
    specs = [RequestSpec(r.arrival_s, len(r.prompt), r.output_len) for r in trace]
    cfg = SimConfig(policy=policy, hardware=hardware, model=cm.model.name, workload=meta["workload"],
                    rate=meta["rate"], num_requests=len(specs), seed=seed, tbt_slo_ms=meta["tbt_slo_ms"],
                    ttft_slo_ms=meta["ttft_slo_ms"], chunked_prefill_size=settings["chunked_prefill_size"],
                    max_running_requests=meta["max_running"], kv_slots=kv + 1, truth=truth,
                    policy_options=dict(settings["options"]), record_launches=True)
    res = simulate(cfg, specs=specs, cost_model=cm)
    recs = [Rec(r.rid, r.arrival, r.input_len, r.output_len, delivery=list(r.token_times),
                finished=len(r.token_times) == r.output_len) for r in res.records]
    first = min(r.arrival for r in recs)
    m = metrics(recs, "delivery", first, meta["rate"], meta["tbt_slo_ms"], meta["ttft_slo_ms"])
    m["launches"] = dict(res.stats["launches"])
    m["lane_overlap_s"] = lane_overlap(res.launches)
    ratios: dict[str, list[float]] = {}
    for x in res.launches:  # as gpu_ab's measured_over_predicted: each launch's time over the policy's prediction
        if x.predicted_s:
            ratios.setdefault(x.lane, []).append(x.actual_s / x.predicted_s)
    m["measured_over_predicted"] = {lane: {"median": statistics.median(v), "n": len(v)} for lane, v in ratios.items()}
    return m


def lane_overlap(launches) -> float:
    """Seconds a prefill-lane and a decode-lane launch ran at once (LaunchRecords; as the GPU's
    lane_overlap_s, from each launch's start to its end, host time included)."""
    pre = sorted((x.started, x.started + x.actual_s) for x in launches if x.lane == "prefill")
    dec = sorted((x.started, x.started + x.actual_s) for x in launches if x.lane == "decode")
    total, j = 0.0, 0
    for a0, a1 in pre:  # the lanes' own launches never overlap each other: a sweep over both lists
        while j < len(dec) and dec[j][1] <= a0:
            j += 1
        k = j
        while k < len(dec) and dec[k][0] < a1:
            total += max(0.0, min(a1, dec[k][1]) - max(a0, dec[k][0]))
            k += 1
    return total


def measured(doc: dict) -> dict[tuple[str, int], float]:
    """(policy, seed) -> the GPU's strict goodput (delivery times), for the runs that finished."""
    out = {}
    for run in doc["runs"]:
        if run.get("status") == "ok":
            out[(run["policy"], run["seed"])] = run["delivery"]["goodput_strict_req_s"]
    return out


def extra_policy(meta: dict, text: str) -> dict:
    """The settings of a policy spec the GPU did not run: the GPU run's settings of the same policy
    (its first entry, e.g. duet's decode_sms_grid and budget), the spec's budget and options over them."""
    spec = PolicySpec.parse(text)
    # (older results files name each setting by its policy alone, without a "policy" key)
    base = next((v for k, v in meta["policy_settings"].items() if v.get("policy", k) == spec.policy), None)
    if base is None:
        raise SystemExit(f"--policy {text}: the GPU run has no {spec.policy!r} to take settings from")
    return {"policy": spec.policy, "options": {**base["options"], **dict(spec.options)},
            "chunked_prefill_size": spec.chunked_prefill_size or base["chunked_prefill_size"]}


def _truth_label(spec: str) -> str:
    return Path(spec).stem if spec.endswith((".yaml", ".yml")) else spec


def _truth_factory(spec: str):
    """seed -> the TruthConfig of `spec` (a truth file or a TruthConfig.parse spec) with that noise seed."""
    if spec.endswith((".yaml", ".yml")):
        if not os.path.exists(spec):
            raise SystemExit(f"--truth: no such file {spec}")
        return lambda seed: TruthConfig.from_file(spec, seed=seed)
    TruthConfig.parse(spec)  # a bad spec fails here, naming the option, before any emulation runs
    return lambda seed: TruthConfig.parse(spec, seed=seed)


def _lat(m: dict) -> tuple[float, float]:
    return float(m.get("ttft_p99_ms") or float("nan")), float(m.get("tbt_p99_ms") or float("nan"))


def _best_other(g: dict[str, float | None], skip=("duet",)) -> float | None:
    """The best goodput of the policies other than duet (the tuned baselines and the default); `skip`:
    the columns left out (duet, and --policy's emulated-only variants)."""
    return max((v for k, v in g.items() if k not in skip and v is not None), default=None)


LANES = ("aggregated", "prefill", "decode")


def _policy_table(title: str, per_label: dict, policies: list[str], cell) -> list[str]:
    """One row per source, one cell per policy: cell(that policy's values over seeds), '-' where it has none
    (a policy the GPU did not run)."""
    lines = ["", title, "", "| source | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
    for label, per_pol in per_label.items():
        lines.append(f"| {label} | " + " | ".join(cell(per_pol[p]) if per_pol.get(p) else "-" for p in policies) + " |")
    return lines


def _mean_or_dash(v: list[float]) -> str:
    return f"{statistics.mean(v):.2f}" if v else "-"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", help="a gpu_ab.py results.json (or .json.gz)")
    p.add_argument("--hardware", default=None, help="what the policies plan with (a name in configs/hardware or a YAML)")
    p.add_argument("--out", default=None, help="write the markdown table here too")
    p.add_argument("--truth", action="append", default=[], metavar="SPEC",
                   help="another emulation: a truth file (YAML) or a TruthConfig spec; repeatable")
    p.add_argument("--no-default-truths", action="store_true",
                   help="leave out the 'truth on' and 'exact' emulations (only --truth's)")
    p.add_argument("--latency", action="store_true", help="add TTFT / TBT p99 per source and policy")
    p.add_argument("--predictions", action="store_true",
                   help="add each lane's median launch time over the policy's prediction per source and policy")
    p.add_argument("--launches", action="store_true",
                   help="add launches per lane and lane overlap per source and policy (means over seeds)")
    p.add_argument("--policy", action="append", default=[], metavar="SPEC",
                   help="an emulated-only policy column, e.g. duet+running_target=1 (the GPU run's settings of "
                        "that policy, the spec's options over them); repeatable")
    a = p.parse_args(argv)
    truths = {} if a.no_default_truths else {"emulator, truth on": TruthConfig, "emulator, exact": TruthConfig.exact}
    for spec in a.truth:
        truths[f"emulator, {_truth_label(spec)}"] = _truth_factory(spec)
    if not truths and a.no_default_truths:
        p.error("--no-default-truths needs at least one --truth")
    doc = json.loads((gzip.open(a.results, "rt") if a.results.endswith(".gz") else open(a.results)).read())
    meta = doc["meta"]
    hw = a.hardware or (meta["hardware"] if os.path.exists(str(meta["hardware"])) else "h200")
    gpu = measured(doc)
    policies = list(meta["policies"])
    for spec in a.policy:
        meta["policy_settings"][spec] = extra_policy(meta, spec)
        policies.append(spec)
    skip = ("duet", *a.policy)
    rows = []
    lat: dict[str, dict[str, list[tuple[float, float]]]] = {}  # source -> policy -> [(TTFT p99, TBT p99)]
    lau: dict[str, dict[str, list[tuple[dict, float]]]] = {}  # source -> policy -> [(launches per lane, overlap s)]
    mop: dict[str, dict[str, list[dict]]] = {}  # source -> policy -> [measured_over_predicted per seed]
    for label in ("GPU (measured)", *truths):
        per_seed = {}
        for seed in meta["seeds"]:
            if label.startswith("GPU"):
                per_seed[seed] = {pol: gpu.get((pol, seed)) for pol in policies}
                for run in doc["runs"]:
                    if run.get("status") == "ok" and run["seed"] == seed:
                        lat.setdefault(label, {}).setdefault(run["policy"], []).append(_lat(run["delivery"]))
                        mop.setdefault(label, {}).setdefault(run["policy"], []).append(run.get("measured_over_predicted") or {})
                        ex = run.get("executor") or {}
                        lau.setdefault(label, {}).setdefault(run["policy"], []).append(
                            (ex.get("launches") or {}, float(ex.get("lane_overlap_s") or 0.0)))
            else:
                truth = truths[label](seed=seed)
                per_seed[seed] = {}
                for pol in policies:
                    m = emulate(meta, meta["policy_settings"][pol].get("policy", pol), meta["policy_settings"][pol],
                                seed, hw, truth)
                    per_seed[seed][pol] = m["goodput_strict_req_s"]
                    lat.setdefault(label, {}).setdefault(pol, []).append(_lat(m))
                    lau.setdefault(label, {}).setdefault(pol, []).append((m["launches"], m["lane_overlap_s"]))
                    mop.setdefault(label, {}).setdefault(pol, []).append(m["measured_over_predicted"])
        rows.append((label, per_seed))
    lines = [f"# GPU A/B vs its emulation: {meta['model']} on {meta['device_name']}, {meta['workload']}, "
             f"{meta['num_requests']} requests at {meta['rate']} req/s, TBT SLO {meta['tbt_slo_ms']:g} ms",
             "", f"Policies plan with `{hw}`. Strict goodput (req/s) per seed; ratios are medians over seeds.", "",
             "| source | seed | " + " | ".join(policies) + " | duet / chunked | duet / aggregated | duet / best other |",
             "|---|---:|" + "---:|" * len(policies) + "---:|---:|---:|"]
    for label, per_seed in rows:
        for seed, g in per_seed.items():
            cells = " | ".join("-" if g[pol] is None else f"{g[pol]:.3f}" for pol in policies)
            lines.append(f"| {label} | {seed} | {cells} | {_ratio(g.get('duet'), g.get('chunked'))} | "
                         f"{_ratio(g.get('duet'), g.get('aggregated'))} | {_ratio(g.get('duet'), _best_other(g, skip))} |")
        ratios = [g["duet"] / g["chunked"] for g in per_seed.values() if g.get("duet") and g.get("chunked")]
        best = [g["duet"] / _best_other(g, skip) for g in per_seed.values() if g.get("duet") and _best_other(g, skip)]
        if ratios or best:
            med = lambda x: f"{statistics.median(x):.2f}" if x else "-"  # noqa: E731
            lines.append(f"| {label} | median |{' |' * len(policies)} {med(ratios)} | | {med(best)} |")
    if a.latency:
        lines += _policy_table("TTFT p99 / TBT p99 (ms, delivery times), means over seeds:", lat, policies,
                               lambda v: f"{statistics.mean(x for x, _ in v):.0f} / {statistics.mean(y for _, y in v):.1f}")
    if a.predictions:
        lines += _policy_table(
            "Launch time / the policy's prediction, median per lane (agg / prefill / decode), means over seeds "
            "(GPU: from the first kernel; emulator: from submission, host time included):", mop, policies,
            lambda v: " / ".join(_mean_or_dash([d[lane]["median"] for d in v if lane in d]) for lane in LANES))
    if a.launches:
        lines += _policy_table(
            "Launches aggregated / prefill / decode and lane overlap (s), means over seeds:", lau, policies,
            lambda v: " / ".join(f"{statistics.mean(x.get(lane, 0) for x, _ in v):.0f}" for lane in LANES)
            + f", {statistics.mean(o for _, o in v):.2f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
