"""One stream decoding on a CPU server; a ~3000-token prompt arrives 3 s in; the stream's largest gap
between tokens (what a long prefill costs the running streams). Arguments are server flags:

    OMP_NUM_THREADS=2 python benchmark/cpu_stream_stall.py --policy chunked --chunked-prefill-size 32
"""
import json
import os
import sys
import threading
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from server_utils import ServerProcess
policy_args = sys.argv[1:]
srv = ServerProcess(policy_args, startup_timeout=600)
try:
    url = srv.url("/generate")
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 300  # ~3000 tokens
    gaps = []
    def stream():
        last = None
        with httpx.stream("POST", url, json={"text": "Count:", "stream": True,
                          "sampling_params": {"max_new_tokens": 120, "temperature": 0, "ignore_eos": True}}, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    now = time.monotonic()
                    if last is not None: gaps.append(now - last)
                    last = now
    t = threading.Thread(target=stream); t.start()
    time.sleep(3)
    t0 = time.monotonic()
    r = httpx.post(url, json={"text": long_prompt, "sampling_params": {"max_new_tokens": 1}}, timeout=600)
    ttft = time.monotonic() - t0
    t.join()
    print(json.dumps({"args": policy_args, "long_prompt_tokens": r.json()["meta_info"]["prompt_tokens"],
                      "long_prompt_latency_s": round(ttft, 2), "stream_tokens": len(gaps) + 1,
                      "max_gap_s": round(max(gaps), 3), "median_gap_s": round(sorted(gaps)[len(gaps)//2], 3)}))
finally:
    srv.stop()
