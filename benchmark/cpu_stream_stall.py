"""One stream decoding on a CPU server; a ~3000-token prompt arrives 3 s in; the stream's largest gap
between tokens (what a long prefill costs the running streams). Arguments are server flags:

    OMP_NUM_THREADS=2 python benchmark/cpu_stream_stall.py --policy duet --tbt-slo-ms 300
    python benchmark/cpu_stream_stall.py                      # the CPU default: chunked, budget from the CPU's speed
    python benchmark/cpu_stream_stall.py --policy aggregated  # the default before it

Each result names the policy and budget the server ran (its /get_server_info) and why, for an unset --policy.
Reported: the gaps while the long prompt was in the server (`max_gap_beside_s`, the number the
issue is about) and over the whole stream; the largest of those during which the server hardly
waited for a CPU (`max_gap_beside_undisturbed_s`); for the largest gaps, how long the server's threads were
runnable but waiting for a CPU during them (the kernel's run delay, summed over the server's
processes and threads: what other processes on the machine took); with `--log-level debug` among
the flags, the server's per-launch "predicted=... actual=..." lines are summarised (the steps with
the largest measured time and their predictions) and CPU_STALL_LOG=path keeps the whole server log.
"""
import json
import os
import re
import sys
import threading
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from server_utils import ServerProcess  # noqa: E402

LAUNCH_LINE = re.compile(r"lane=(\w+) sms=\S+ k=(\d+) tokens=(\d+) predicted=([\d.]+)ms actual=([\d.]+)ms")


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def tree_pids(pid: int) -> list[int]:
    """pid and its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return out


def run_delay(pids: list[int]) -> float:
    """Seconds the threads of these processes have waited, runnable, for a CPU (schedstat)."""
    total = 0
    for p in pids:
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/schedstat") as fh:
                    total += int(fh.read().split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return total / 1e9


class DelaySampler(threading.Thread):
    """(time, the server tree's run delay) every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self):
        pids, n = tree_pids(self.pid), 0
        while not self.stop.is_set():
            if n % 50 == 0:
                pids = tree_pids(self.pid)
            self.samples.append((time.monotonic(), run_delay(pids)))
            n += 1
            self.stop.wait(0.02)

    def waited(self, a: float, b: float) -> float | None:
        """Run delay accrued between times a and b (the nearest samples)."""
        if not self.samples:
            return None
        before = [d for t, d in self.samples if t <= a]
        after = [d for t, d in self.samples if t >= b]
        if not before or not after:
            return None
        return after[0] - before[-1]


def launches(log_text: str) -> list[dict]:
    """The policy's per-launch debug lines: tokens, predicted and measured ms."""
    return [{"tokens": int(m[3]), "predicted_ms": float(m[4]), "actual_ms": float(m[5])}
            for m in LAUNCH_LINE.finditer(log_text)]


def main(server_args: list[str]) -> dict:
    srv = ServerProcess(server_args, startup_timeout=600)
    try:
        url = srv.url("/generate")
        info = httpx.get(srv.url("/get_server_info"), timeout=30).json()
        long_prompt = "The quick brown fox jumps over the lazy dog. " * 300  # ~3000 tokens
        arrivals = []  # monotonic time of each streamed token
        sampler = DelaySampler(srv.proc.pid)
        sampler.start()

        def stream():
            with httpx.stream("POST", url, json={"text": "Count:", "stream": True, "sampling_params": {
                    "max_new_tokens": 120, "temperature": 0, "ignore_eos": True}}, timeout=900) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.monotonic())

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(3)
        t0 = time.monotonic()
        r = httpx.post(url, json={"text": long_prompt, "sampling_params": {"max_new_tokens": 1}}, timeout=900)
        t1 = time.monotonic()
        t.join()
        sampler.stop.set()
        sampler.join()
        gaps = [(b - a, a, b) for a, b in zip(arrivals, arrivals[1:])]
        # a gap is "beside the prompt" when any of it overlaps the prompt's time in the server
        beside = [g for g, a, b in gaps if b > t0 and a < t1]
        out = {"args": server_args, "policy": info["policy"], "chunked_prefill_size": info["chunked_prefill_size"],
               "policy_default": info["policy_info"].get("default"),
               "long_prompt_tokens": r.json()["meta_info"]["prompt_tokens"],
               "long_prompt_latency_s": round(t1 - t0, 2), "stream_tokens": len(arrivals),
               "max_gap_s": round(max(g for g, _, _ in gaps), 3),
               "median_gap_s": round(median([g for g, _, _ in gaps]), 3),
               "gaps_beside_prompt": len(beside),
               "max_gap_beside_s": round(max(beside), 3) if beside else None,
               "median_gap_beside_s": round(median(beside), 3) if beside else None,
               "load_avg_1m": round(os.getloadavg()[0], 2)}
        # gaps beside the prompt during which the server's threads hardly waited for a CPU (under a
        # tenth of the gap): what the policy delivers when the machine leaves the server its cores
        quiet = [g for g, a, b in gaps if b > t0 and a < t1 and (sampler.waited(a, b) or 0.0) < 0.1 * g]
        out["gaps_beside_undisturbed"] = len(quiet)
        out["max_gap_beside_undisturbed_s"] = round(max(quiet), 3) if quiet else None
        largest = sorted((g for g in gaps if g[2] > t0 and g[1] < t1), key=lambda g: -g[0])[:5]
        out["largest_gaps_beside"] = [
            {"gap_s": round(g, 3), "server_threads_waited_for_cpu_s": None if w is None else round(w, 3)}
            for g, a, b in largest for w in [sampler.waited(a, b)]]
    finally:
        srv.stop()
        log_text = srv.log_tail(1 << 26)
        keep = os.environ.get("CPU_STALL_LOG")
        if keep:
            with open(keep, "w") as fh:
                fh.write(log_text)
    steps = launches(log_text)
    if steps:
        worst = sorted(steps, key=lambda s: -s["actual_ms"])[:8]
        ratio = [s["actual_ms"] / s["predicted_ms"] for s in steps if s["predicted_ms"] > 0]
        out["launches"] = len(steps)
        out["actual_over_predicted_median"] = round(median(ratio), 3)
        out["actual_over_predicted_max"] = round(max(ratio), 3)
        out["slowest_launches"] = worst
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
