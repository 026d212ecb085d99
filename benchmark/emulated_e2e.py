"""End to end against the emulated device's limit: the server vs the simulator on the same requests.

The server runs the emulated GPU (`--executor emulated`, default Qwen3-8B on `--hardware h200`) on
the wall clock; `benchmark/bench_serving.py` (the project's bench client, SGLang's flags) sends N
requests at once (`--request-rate inf`, `random-ids` prompts of fixed length, ignore_eos). The
simulator (`sglang_duet/simulator/loop.py`) runs the same requests through the same core, policy
and emulated GPU on a virtual clock, where the host costs nothing: its makespan is what the
emulated device alone allows. The ratio

    simulated makespan / the server's duration (bench_serving's, first request sent to last token)

is the share of that limit the real serving path delivers (1.0: the host hides entirely behind
the device). Both sides run the emulator's exact model (`--truth off`, the default here: no noise,
no modelled host time, which the real host would otherwise pay twice) and the same KV pool size.

    python benchmark/emulated_e2e.py [--num-prompts 256] [--input-len 128] [--output-len 512]
        [--policy aggregated] [--hardware h200] [--stream-interval 1] [--repeats 2]
        [--client bench_serving|raw] [--out benchmark/results/host_overhead-e2e-cpu2.md]

`--client raw` sends the same requests through host_overhead.py's raw-socket client: on a 2-core
machine the client shares the cores with the server, and bench_serving's aiohttp client needs
more CPU per token than the three server processes together.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmark.host_overhead import append_result_section, load_average, process_cpu, server_pids, settled_state  # noqa: E402
from benchmark.server_process import ServerProcess  # noqa: E402

TRUTH_ENV = "SGLANG_DUET_EMULATED_TRUTH"


def server_flags(a) -> list[str]:
    flags = ["--executor", "emulated", "--hardware", a.hardware, "--policy", a.policy,
             "--max-running-requests", str(a.num_prompts), "--chunked-prefill-size", str(a.chunk),
             "--stream-interval", str(a.stream_interval), "--log-level", "warning", *a.server_arg]
    if a.model_config:
        flags += ["--model-config", a.model_config]
    return flags


def server_info(base_url: str) -> dict:
    import orjson

    with urllib.request.urlopen(f"{base_url}/get_server_info", timeout=10) as r:
        return orjson.loads(r.read())["internal_states"][0]


def warm_up(base_url: str) -> None:
    """One short request before the counters are read (bench_serving's own warm-up would be counted)."""
    import orjson

    body = orjson.dumps({"input_ids": list(range(1000, 1016)), "sampling_params": {"max_new_tokens": 4}})
    req = urllib.request.Request(f"{base_url}/generate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()


def bench(base_url: str, a, seed: int) -> dict:
    if a.client == "raw":
        return bench_raw(base_url, a, seed)
    from benchmark.bench_serving import build_args, run_benchmark

    args = build_args(backend="sglang", base_url=base_url, dataset_name="random-ids", num_prompts=a.num_prompts,
                      random_input_len=a.input_len, random_output_len=a.output_len, random_range_ratio=1.0,
                      request_rate=float("inf"), disable_tqdm=True, warmup_requests=0, seed=seed)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # its table: we print our own line
        return run_benchmark(args)


def bench_raw(base_url: str, a, seed: int) -> dict:
    """The same requests (random ids of --input-len, --output-len tokens, ignore_eos, all at once)
    through host_overhead.py's raw-socket streaming client, which costs the shared CPU a fraction
    of bench_serving's aiohttp client; bench_serving's result fields."""
    import asyncio

    from benchmark.host_overhead import run_level

    r = asyncio.run(run_level(base_url, a.num_prompts, a.input_len, a.output_len, seed))
    n = a.num_prompts
    return {"duration": r["wall_s"], "completed": n - len(r["errors"]), "errors": r["errors"],
            "output_throughput": r["tok_s"], "median_ttft_ms": r["ttft_p50_ms"], "median_itl_ms": r["itl_p50_ms"],
            "input_lens": [a.input_len] * n, "output_lens": [a.output_len] * n}


def simulate(a, input_lens: list[int], output_lens: list[int], kv_slots: int) -> tuple[float, dict]:
    """Virtual makespan (s) and the core's launch counts of the same requests, all arriving at 0."""
    from sglang_duet.cost_model.roofline import CostModel
    from sglang_duet.cost_model.truth import TruthConfig
    from sglang_duet.models.config import ModelConfig
    from sglang_duet.cost_model.hardware import HardwareSpec, configs_dir
    from sglang_duet.simulator.loop import SimConfig, simulate as run_sim
    from sglang_duet.workloads import RequestSpec

    path = a.model_config or str(configs_dir() / "models" / "qwen3-8b.json")
    cm = CostModel(ModelConfig.from_path(path), HardwareSpec.load(a.hardware))
    truth = TruthConfig.parse(a.truth, seed=a.seed) if a.truth != "off" else None
    cfg = SimConfig(policy=a.policy, hardware=a.hardware, chunked_prefill_size=a.chunk,
                    max_running_requests=a.num_prompts, kv_slots=kv_slots, truth=truth,
                    overlap="--disable-overlap-schedule" not in a.server_arg)
    specs = [RequestSpec(0.0, i, o) for i, o in zip(input_lens, output_lens)]
    res = run_sim(cfg, specs, cost_model=cm)
    return res.sim_time_s, res.stats["launches"]


def run(a) -> list[dict]:
    work = tempfile.mkdtemp(prefix="emulated-e2e-")
    env = {"OMP_NUM_THREADS": "1", TRUTH_ENV: a.truth if a.truth != "on" else f"seed={a.seed}"}
    rows = []
    with ServerProcess(server_flags(a), os.path.join(work, "server.log"), env=env).start() as srv:
        pids = dict(server_pids(srv.proc.pid), client=os.getpid())
        for rep in range(a.repeats):
            warm_up(srv.base_url)
            before = server_info(srv.base_url)
            cpu0, load0 = process_cpu(pids), load_average()
            rec = bench(srv.base_url, a, a.seed + rep)
            cpu1 = process_cpu(pids)
            after = settled_state(srv.base_url, before.get("finished", 0) + before.get("aborted", 0) + a.num_prompts)
            errors = [e for e in rec.get("errors", []) if e]
            kv_slots = after["kv_total_slots"] + 1
            sim_s, sim_launches = simulate(a, rec["input_lens"], rec["output_lens"], kv_slots)
            launches = sum(after["launches"].values()) - sum(before["launches"].values())
            cb, ca = before.get("critical_path") or {}, after.get("critical_path") or {}
            idle_s = ca.get("device_idle_s", float("nan")) - cb.get("device_idle_s", 0.0)
            row = {"rep": rep, "duration_s": rec["duration"], "sim_s": sim_s, "ratio": sim_s / rec["duration"],
                   "completed": rec["completed"], "errors": len(errors), "output_tok_s": rec["output_throughput"],
                   "launches": launches, "sim_launches": sum(sim_launches.values()), "device_idle_s": idle_s,
                   "ttft_p50_ms": rec.get("median_ttft_ms"), "itl_p50_ms": rec.get("median_itl_ms"),
                   "cpu_s": {k: cpu1[k] - cpu0[k] for k in pids}, "load": (load0 + load_average()) / 2,
                   "output_tokens": sum(rec["output_lens"])}
            rows.append(row)
            print(f"rep {rep}: server {row['duration_s']:.3f} s ({row['completed']}/{a.num_prompts} completed, "
                  f"{row['errors']} errors, {row['launches']} launches, device idle {idle_s:.3f} s between them), simulator {sim_s:.3f} s "
                  f"({row['sim_launches']} launches): {row['ratio']:.3f}x; CPU s "
                  + ", ".join(f"{k} {v:.2f}" for k, v in row["cpu_s"].items()) + f"; load {row['load']:.1f}",
                  flush=True)
    return rows


def table(rows: list[dict], a) -> list[str]:
    lines = ["| rep | requests | in / out tokens | server s | simulator s | **ratio** | launches: server / sim "
             "| device idle between launches (s) | TTFT p50 / ITL p50 (ms) "
             "| CPU us/token: main / sched / detok / client (incl. its setup) | load |",
             "|---:|---:|---|---:|---:|---:|---|---:|---|---|---:|"]
    for r in rows:
        cpu = " / ".join(f"{r['cpu_s'].get(k, float('nan')) / max(r['output_tokens'], 1) * 1e6:.1f}"
                         for k in ("main", "scheduler", "detokenizer", "client"))
        lines.append(f"| {r['rep']} | {r['completed']} | {a.input_len} / {a.output_len} | {r['duration_s']:.3f} "
                     f"| {r['sim_s']:.3f} | **{r['ratio']:.3f}x** | {r['launches']} / {r['sim_launches']} | {r['device_idle_s']:.3f} "
                     f"| {r['ttft_p50_ms']:.0f} / {r['itl_p50_ms']:.1f} | {cpu} | {r['load']:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--policy", default="aggregated")
    ap.add_argument("--hardware", default="h200")
    ap.add_argument("--model-config", default=None, help="default: configs/models/qwen3-8b.json")
    ap.add_argument("--chunk", type=int, default=8192, help="--chunked-prefill-size")
    ap.add_argument("--stream-interval", type=int, default=1)
    ap.add_argument("--truth", default="off", help="the emulator's truth on both sides: off (exact), on, or key=value,...")
    ap.add_argument("--client", choices=("bench_serving", "raw"), default="bench_serving",
                    help="bench_serving (SGLang's client: aiohttp, 30-70 us of CPU per token on the 2-core test "
                         "machine, shared with the server) or raw (host_overhead.py's raw-socket client, a few us)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    ap.add_argument("--out", default=None, help="append the markdown table here")
    ap.add_argument("--title", default="")
    a = ap.parse_args(argv)
    rows = run(a)
    lines = table(rows, a)
    print("\n".join(lines))
    if a.out:
        cmd = "python benchmark/emulated_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:])
        append_result_section(a.out, a.title or "emulated end to end", cmd, lines)
    return rows


if __name__ == "__main__":
    main()
