"""Our server against a peer server (any OpenAI-compatible URL, e.g. vLLM's CPU build) on the same
machine, the same prompts and the same bench_serving loads, alternated round by round.

    python -m benchmark.cpu_vs_peer --peer-url http://127.0.0.1:8000 [--ours-url URL | --ours-flags="..."]
        [--rounds 3] [--loads burst,rate1,serial] [--quick] [--out benchmark/results/cpu_vs_peer-NAME]

Loads (issue 18's table; random prompts of the embedded tokenizer, eos ignored, streamed):
  burst   32 prompts, 16 concurrent, 128 in / 64 out: output tok/s, median TPOT, median TTFT
  rate1   16 prompts at 1 request/s (Poisson), 128 in / 64 out: median TTFT, median ITL
  serial  8 prompts one at a time, 128 in / 64 out: median TPOT, median TTFT
Both servers are driven through /v1/completions (benchmark.bench_serving's `openai` backend, flag- and
metric-compatible with SGLang's bench_serving). Rounds alternate the order (ours first, then the peer
first) so that neither always runs on the warmer machine. Per server and metric the median over rounds
is reported, with ratios ours/peer: throughput wants >= 1, latencies <= 1 (issue 18's targets).

Without --ours-url the script starts our server itself (`python -m sglang_duet.launch_server` with
--ours-flags) on a free port and stops it at the end; the peer is always started by you (its own venv,
see docs/benchmarking.md). The peer must serve the same model (same HF folder) for the ratio to mean
anything. Heavy: run it niced and alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass

from .bench_serving import build_args, run_benchmark


@dataclass(frozen=True)
class Load:
    name: str
    num_prompts: int
    max_concurrency: int | None
    request_rate: float
    metrics: tuple[str, ...]  # bench_serving record keys, the first the headline


LOADS = {
    "burst": Load("burst", 32, 16, float("inf"), ("output_throughput", "median_tpot_ms", "median_ttft_ms")),
    "rate1": Load("rate1", 16, None, 1.0, ("median_ttft_ms", "median_itl_ms", "output_throughput")),
    "serial": Load("serial", 8, 1, float("inf"), ("median_tpot_ms", "median_ttft_ms", "output_throughput")),
}
HIGHER_IS_BETTER = {"output_throughput"}
INPUT_LEN, OUTPUT_LEN = 128, 64


def bench_args(load: Load, base_url: str, tokenizer: str | None, seed: int, quick: bool, tag: str):
    n = max(2, load.num_prompts // 4) if quick else load.num_prompts
    return build_args(backend="openai", base_url=base_url, tokenizer=tokenizer, dataset_name="random",
                      num_prompts=n, random_input_len=INPUT_LEN, random_output_len=16 if quick else OUTPUT_LEN,
                      random_range_ratio=1.0, request_rate=load.request_rate, max_concurrency=load.max_concurrency,
                      seed=seed, disable_tqdm=True, warmup_requests=1, tag=tag)


def summarize(records: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{load: {server: {metric: median over rounds}}} from bench_serving records tagged 'server/load'."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        server, load = r["tag"].split("/", 1)
        grouped.setdefault((load, server), []).append(r)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (load, server), recs in grouped.items():
        keys = LOADS[load].metrics
        out.setdefault(load, {})[server] = {k: statistics.median(float(x[k]) for x in recs) for k in keys}
    return out


def ratio_rows(summary) -> list[tuple[str, str, float, float, float, bool]]:
    """(load, metric, ours, peer, ours/peer, target met) per load and metric present for both servers."""
    rows = []
    for load in LOADS:
        per = summary.get(load, {})
        if "ours" not in per or "peer" not in per:
            continue
        for metric in LOADS[load].metrics:
            ours, peer = per["ours"][metric], per["peer"][metric]
            ratio = ours / peer if peer else float("inf")
            met = ratio >= 1.0 if metric in HIGHER_IS_BETTER else ratio <= 1.0
            rows.append((load, metric, ours, peer, ratio, met))
    return rows


def render(rows, meta: dict) -> str:
    lines = [f"## sglang-duet vs {meta['peer_name']} on {meta['machine']}", "",
             f"command: `{meta['command']}`", f"ours: {meta['ours']}", f"peer: {meta['peer']}",
             f"rounds: {meta['rounds']} (alternating order), load average (1 min) before / after: "
             f"{meta['load_before']:.1f} / {meta['load_after']:.1f}", "",
             "| load | metric | sglang-duet | peer | ours / peer | target met |", "|---|---|---|---|---|---|"]
    for load, metric, ours, peer, ratio, met in rows:
        want = ">= 1" if metric in HIGHER_IS_BETTER else "<= 1"
        lines.append(f"| {load} | {metric} | {ours:.1f} | {peer:.1f} | {ratio:.2f} (want {want}) | "
                     f"{'yes' if met else 'no'} |")
    return "\n".join(lines) + "\n"


def machine_name() -> str:
    from benchmark.offline_throughput import machine_name as name

    return name()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-url", required=True, help="the peer's base URL (OpenAI-compatible), e.g. vLLM's")
    ap.add_argument("--peer-name", default="peer", help="what to call the peer in the report (e.g. 'vLLM-CPU fp32')")
    ap.add_argument("--ours-url", default=None, help="an already running sglang-duet server (default: start one)")
    ap.add_argument("--ours-flags", default="", help="flags for the server this script starts, one quoted string "
                    "given with = (--ours-flags=\"--enable-torch-compile\")")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for the prompts (default: the embedded model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loads", default=",".join(LOADS), help=f"comma-separated, of {', '.join(LOADS)}")
    ap.add_argument("--quick", action="store_true", help="a quarter of the prompts, 16 output tokens (smoke test)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None, help="path prefix: writes PREFIX.md and PREFIX.jsonl")
    args = ap.parse_args(argv)
    loads = [LOADS[x] for x in args.loads.split(",") if x]

    tokenizer = args.tokenizer
    if tokenizer is None:
        from sglang_duet.model_loader.embedded import default_model_path

        tokenizer = default_model_path()
    server = None
    ours_url = args.ours_url
    if ours_url is None:
        from benchmark.server_process import ServerProcess

        log = (args.out or "cpu_vs_peer") + "-server.log"
        server = ServerProcess(shlex.split(args.ours_flags), log).start()
        ours_url = server.base_url
    servers = {"ours": ours_url.rstrip("/"), "peer": args.peer_url.rstrip("/")}
    load_before = os.getloadavg()[0]
    records: list[dict] = []
    try:
        for rnd in range(args.rounds):
            order = ["ours", "peer"] if rnd % 2 == 0 else ["peer", "ours"]
            for load in loads:
                for who in order:
                    print(f"round {rnd + 1}/{args.rounds} {load.name}: {who} ({servers[who]})", flush=True)
                    rec = run_benchmark(bench_args(load, servers[who], tokenizer, args.seed + rnd, args.quick,
                                                   f"{who}/{load.name}"))
                    records.append({k: v for k, v in rec.items() if not isinstance(v, list)})
    finally:
        if server is not None:
            server.stop()
    rows = ratio_rows(summarize(records))
    meta = {"peer_name": args.peer_name, "machine": machine_name(), "rounds": args.rounds,
            "command": "python -m benchmark.cpu_vs_peer " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "ours": servers["ours"] + (f" (started with: {args.ours_flags or 'defaults'})" if server else ""),
            "peer": servers["peer"], "load_before": load_before, "load_after": os.getloadavg()[0]}
    text = render(rows, meta)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".md", "a") as f:
            f.write(text + "\n")
        with open(args.out + ".jsonl", "a") as f:
            for r in records:
                f.write(json.dumps({**r, "time": time.time(), "host": platform.node()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
