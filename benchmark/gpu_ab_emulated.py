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
                    policy_options=dict(settings["options"]))
    res = simulate(cfg, specs=specs, cost_model=cm)
    recs = [Rec(r.rid, r.arrival, r.input_len, r.output_len, delivery=list(r.token_times),
                finished=len(r.token_times) == r.output_len) for r in res.records]
    first = min(r.arrival for r in recs)
    return metrics(recs, "delivery", first, meta["rate"], meta["tbt_slo_ms"], meta["ttft_slo_ms"])


def measured(doc: dict) -> dict[tuple[str, int], float]:
    """(policy, seed) -> the GPU's strict goodput (delivery times), for the runs that finished."""
    out = {}
    for run in doc["runs"]:
        if run.get("status") == "ok":
            out[(run["policy"], run["seed"])] = run["delivery"]["goodput_strict_req_s"]
    return out


def _best_other(g: dict[str, float | None]) -> float | None:
    """The best goodput of the policies other than duet (the tuned baselines and the default)."""
    return max((v for k, v in g.items() if k != "duet" and v is not None), default=None)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", help="a gpu_ab.py results.json (or .json.gz)")
    p.add_argument("--hardware", default=None, help="what the policies plan with (a name in configs/hardware or a YAML)")
    p.add_argument("--out", default=None, help="write the markdown table here too")
    a = p.parse_args(argv)
    doc = json.loads((gzip.open(a.results, "rt") if a.results.endswith(".gz") else open(a.results)).read())
    meta = doc["meta"]
    hw = a.hardware or (meta["hardware"] if os.path.exists(str(meta["hardware"])) else "h200")
    gpu = measured(doc)
    policies = meta["policies"]
    rows = []
    truths = {"emulator, truth on": TruthConfig, "emulator, exact": TruthConfig.exact}
    for label in ("GPU (measured)", *truths):
        per_seed = {}
        for seed in meta["seeds"]:
            if label.startswith("GPU"):
                per_seed[seed] = {pol: gpu.get((pol, seed)) for pol in policies}
            else:
                truth = truths[label](seed=seed)
                per_seed[seed] = {pol: emulate(meta, meta["policy_settings"][pol].get("policy", pol),
                                               meta["policy_settings"][pol], seed, hw, truth)["goodput_strict_req_s"]
                                  for pol in policies}
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
                         f"{_ratio(g.get('duet'), g.get('aggregated'))} | {_ratio(g.get('duet'), _best_other(g))} |")
        ratios = [g["duet"] / g["chunked"] for g in per_seed.values() if g.get("duet") and g.get("chunked")]
        best = [g["duet"] / _best_other(g) for g in per_seed.values() if g.get("duet") and _best_other(g)]
        if ratios or best:
            med = lambda x: f"{statistics.median(x):.2f}" if x else "-"  # noqa: E731
            lines.append(f"| {label} | median |{' |' * len(policies)} {med(ratios)} | | {med(best)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
