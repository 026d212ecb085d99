"""Policy A/B harness: one server per policy, a request-rate sweep against each, one report.

    python -m benchmark.ab configs/experiments/cpu-smollm2.yaml [--out results/cpu-smollm2]
                           [--resume] [--quick] [--report-only]

For each policy of the experiment file: start `sglang_duet.launch_server` on a free port with the
file's flags, wait for /health, run bench_serving's `run_benchmark` at every rate (same requests
and seed for every policy), stop the server (SIGTERM, then SIGKILL). Each policy x rate appends a
record to <out>/runs.jsonl as soon as it finishes; then <out>/summary.md and PNG plots are written.
A server that fails to start or dies is recorded (status + log tail) and the sweep moves on to the
next policy. --resume skips policy x rate pairs already recorded with status ok.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone

import numpy as np

from .ab_config import Experiment, load_experiment, rate_key, server_flags
from .ab_report import read_records, write_report
from .bench_serving import DETAIL_KEYS, build_args, run_benchmark
from .server_process import ServerProcess, ServerStartError, log_tail


def _say(msg: str) -> None:
    print(f"[ab {datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def _append(path: str, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()


def _record(exp: Experiment, policy, rate: float, status: str, cmd: list[str], **fields) -> dict:
    return {"experiment": exp.name, "policy": policy.name, "policy_arg": policy.policy, "rate": rate_key(rate),
            "request_rate": "inf" if math.isinf(rate) else rate, "status": status,
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "server_cmd": cmd, **fields}


# Percentiles kept of the pooled ITLs: the TBT CDF without storing every gap, finer in the tail
# where SLO violations live.
CDF_GRID = [*range(0, 99), 99.0, 99.5, 99.9, 100.0]


def _itl_cdf_ms(result: dict) -> list[float]:
    gaps = [g for itl, err in zip(result["itls"], result["errors"]) if not err for g in itl]
    if not gaps:
        return []
    return [round(float(v), 3) for v in np.percentile(np.asarray(gaps) * 1000.0, CDF_GRID)]


def bench_options(exp: Experiment, base_url: str, rate: float) -> argparse.Namespace:
    opts = {"disable_tqdm": True, **exp.benchmark, "base_url": base_url, "request_rate": rate,
            "ttft_slo_ms": exp.ttft_slo_ms, "tbt_slo_ms": exp.tbt_slo_ms, "output_file": None}
    return build_args(**opts)


def policy_flags(exp: Experiment, policy) -> list[str]:
    # The experiment's SLOs reach the server too (policies such as duet plan against the TBT
    # SLO) unless the file sets the server's own values.
    slo = {k: v for k, v in (("tbt_slo_ms", exp.tbt_slo_ms), ("ttft_slo_ms", exp.ttft_slo_ms)) if v is not None}
    merged = {**slo, **exp.server, **policy.server}
    merged.pop("policy", None)
    return ["--policy", policy.policy, *server_flags(merged)]


def run_experiment(exp: Experiment, out_dir: str, resume: bool = False) -> tuple[str, list[str]]:
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    runs_path = os.path.join(out_dir, "runs.jsonl")
    done = {(r.get("policy"), r.get("rate")) for r in read_records(runs_path) if r.get("status") == "ok"} \
        if resume else set()
    if not resume and os.path.exists(runs_path):
        os.replace(runs_path, runs_path + f".{int(time.time())}.bak")  # a fresh run starts a fresh file
    for policy in exp.policies:
        todo = [r for r in exp.rates if (policy.name, rate_key(r)) not in done]
        if not todo:
            _say(f"{policy.name}: every rate already recorded, skipped")
            continue
        log_path = os.path.join(out_dir, "logs", f"server-{policy.name}.log")
        server = ServerProcess(policy_flags(exp, policy), log_path, env=exp.env)
        cmd = server.cmd
        _say(f"{policy.name}: starting server: {' '.join(cmd)}")
        try:
            server.start(exp.startup_timeout_s)
        except ServerStartError as e:
            _say(f"{policy.name}: server failed to start:\n{e}")
            for rate in todo:
                _append(runs_path, _record(exp, policy, rate, "startup_failed", cmd, error=str(e)))
            continue
        try:
            for i, rate in enumerate(todo):
                if not server.alive():
                    err = f"server exited with code {server.returncode}; log tail:\n{log_tail(log_path)}"
                    for r in todo[i:]:
                        _append(runs_path, _record(exp, policy, r, "server_died", cmd, error=err))
                    _say(f"{policy.name}: server died; moving on to the next policy")
                    break
                _say(f"{policy.name}: rate {rate_key(rate)} req/s")
                try:
                    result = run_benchmark(bench_options(exp, server.base_url, rate))
                except Exception as e:  # noqa: BLE001 - one bad run must not end the experiment
                    status = "ok" if server.alive() else "server_died"
                    err = f"{type(e).__name__}: {e}"
                    if status == "server_died":
                        err += f"\nlog tail:\n{log_tail(log_path)}"
                    _append(runs_path, _record(exp, policy, rate, "error" if status == "ok" else status, cmd,
                                               error=err))
                    continue
                status = "ok" if server.alive() else "server_died"
                fields = {k: v for k, v in result.items() if k not in DETAIL_KEYS}
                fields["itl_cdf_ms"] = _itl_cdf_ms(result)
                fields["itl_cdf_pct"] = CDF_GRID
                if status != "ok":
                    fields["error"] = (f"server exited with code {server.returncode} during the run; log tail:\n"
                                       f"{log_tail(log_path)}")
                _append(runs_path, _record(exp, policy, rate, status, cmd, **fields))
        finally:
            server.stop()
            _say(f"{policy.name}: server stopped")
    summary, plots = write_report(exp, out_dir)
    _say(f"wrote {summary} and {', '.join(os.path.basename(p) for p in plots)}")
    return summary, plots


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="configs/experiments/<name>.yaml (or just <name>)")
    p.add_argument("--out", default=None, help="output folder (default: results/<name>, results/<name>-quick)")
    p.add_argument("--resume", action="store_true", help="skip policy x rate pairs already in runs.jsonl")
    p.add_argument("--quick", action="store_true", help="apply the file's `quick` overrides (a small run)")
    p.add_argument("--report-only", action="store_true", help="rebuild summary.md and plots from runs.jsonl")
    a = p.parse_args(argv)
    exp = load_experiment(a.experiment, quick=a.quick)
    out = a.out or os.path.join("results", exp.name + ("-quick" if a.quick else ""))
    if a.report_only:
        summary, _ = write_report(exp, out)
    else:
        summary, _ = run_experiment(exp, out, resume=a.resume)
    with open(summary) as fh:
        print(fh.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
