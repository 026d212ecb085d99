"""Disaggregation on one GPU: pd-local (prefill + decode instance + router, KV over CUDA IPC) against a
plain server, same dummy weights; greedy output ids must match; KV transfer bytes/ms/GB/s reported.

    python scripts/disagg_gpu_check.py --model-config configs/models/qwen3-8b.json --out $OUT

Both instances and the reference share the GPU, so each gets an explicit KV size (--max-total-tokens)
instead of a memory fraction. Requests use input_ids (dummy weights have no tokenizer) and go one
at a time, so the reference runs the same batch shapes (bit-identical greedy is then expected).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log_path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(log_path, "w")
    p = subprocess.Popen([sys.executable, "-m", "sglang_duet.launch_server", "--port", str(port), *args],
                         stdout=log, stderr=subprocess.STDOUT)
    return p, f"http://127.0.0.1:{port}"


def wait(p: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"{url} exited with {p.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-config", default="configs/models/qwen3-8b.json")
    ap.add_argument("--max-total-tokens", type=int, default=60000)
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 512, 2048, 8000])
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--extra", default="--attention-backend triton --disable-cuda-graph",
                    help="more server flags, one string")
    ap.add_argument("--out", default="/tmp/disagg_gpu")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    common = ["--load-format", "dummy", "--model-config", a.model_config, "--max-total-tokens",
              str(a.max_total_tokens), "--dtype", "bfloat16", *shlex.split(a.extra)]
    t0 = time.monotonic()
    pd, pd_url = start([*common, "--disaggregation-mode", "pd-local", "--pd-local-router", "builtin"],  # /disagg/instances
                       os.path.join(a.out, "pd_local.log"))
    ref, ref_url = start(common, os.path.join(a.out, "reference.log"))
    report = {"model_config": a.model_config, "lengths": a.lengths, "results": []}
    try:
        wait(ref, ref_url, 500)
        wait(pd, pd_url, 500)
        report["startup_s"] = time.monotonic() - t0
        rng = random.Random(0)
        vocab = httpx.get(ref_url + "/get_model_info", timeout=10).json()["vocab_size"]
        for n in a.lengths:
            ids = [rng.randrange(100, vocab - 100) for _ in range(n)]
            body = {"input_ids": ids, "sampling_params": {"max_new_tokens": a.max_new_tokens, "temperature": 0,
                                                          "ignore_eos": True}}
            t = time.monotonic()
            want = httpx.post(ref_url + "/generate", json=body, timeout=300).json()
            t_ref = time.monotonic() - t
            t = time.monotonic()
            got = httpx.post(pd_url + "/generate", json=body, timeout=300).json()
            t_pd = time.monotonic() - t
            same = got.get("output_ids") == want.get("output_ids")
            report["results"].append({"prompt_tokens": n, "identical": same, "ref_s": t_ref, "pd_s": t_pd,
                                      "ref_ids": want.get("output_ids"), "pd_ids": got.get("output_ids")})
            print(f"prompt {n}: identical={same} ref {t_ref:.2f}s pd {t_pd:.2f}s", flush=True)
        report["instances"] = httpx.get(pd_url + "/disagg/instances", timeout=10).json()
    finally:
        for p in (pd, ref):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (pd, ref):
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    with open(os.path.join(a.out, "pd_local.log")) as f:
        log = f.read()
    report["transfers"] = re.findall(r"KV transfer .*", log)
    print("\n".join(report["transfers"]))
    with open(os.path.join(a.out, "disagg_gpu.json"), "w") as f:
        json.dump(report, f, indent=1)
    ok = report["results"] and all(r["identical"] for r in report["results"])
    print("ALL IDENTICAL" if ok else "MISMATCH", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
