"""Scheduler overhead of a policy's plan(): milliseconds per call on synthetic views.

    python -m benchmark.policy_overhead                       # duet and duet-paper, batch 64/256/1024
    python -m benchmark.policy_overhead --policies duet --batches 256 --repeat 500

For each decode batch size the view holds that many ready decodes (contexts 200..4000 tokens,
50..500 tokens left), one half-done prefill and a waiting queue of `--queue` prompts (300..6000
tokens), on Qwen3-8B / H100 pricing. Each lane-pair state is timed separately: both lanes idle
(the full search), the decode lane idle while a prefill runs, and the prefill lane idle while a
decode launch runs. Reported: median and p90 ms per plan() (the view is built once, outside the
timing), as wall-clock time and as the thread's CPU time (time.thread_time: what the plan costs
the scheduler's thread, unaffected by other processes competing for the cores on a loaded
machine). Both depend on the CPU, so no test asserts them.

`--simulated WORKLOAD:RATE` times instead every plan() of a simulated run (`sglang_duet.simulator`,
the emulated GPU on its virtual clock): the views a policy really gets, with the queue as long as
the load makes it, batch sizes changing from plan to plan and the calibration moving after every
launch, none of which the synthetic views above show (they re-plan one view, so every cache the
policy keeps hits). Reported per lane-pair state, with and without prompts to prefill, for plans
with at least `--min-batch` ready decodes (azure-conv at 40 req/s, 1500 requests and
`--max-running 512` reaches 256):

    python -m benchmark.policy_overhead --policies duet --simulated azure-conv:40

`--policies-dir DIR` times the policies of another checkout (its policies/ folder, loaded in place of
the installed package before anything imports it: e.g. a `git worktree` of the commit before a
change), for before/after runs alternated on one loaded machine.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, PrefillChunk, ReqWork
from sglang_duet.core.request import ReqState, Request
from sglang_duet.core.scheduler_core import ALL_LANES, CoreConfig, SchedulerView
from sglang_duet.core.waiting_queue import WaitingQueue
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.sampling_params import SamplingParams

CTX_LEN = 40960


def _decoding(rid: str, context: int, left: int, now: float, rng: random.Random) -> Request:
    out = rng.randint(5, 200)
    r = Request(rid, [7] * (context - out + 1), SamplingParams(max_new_tokens=out + left), arrival_time=now - 5.0, seed=0)
    r.output_ids = [5] * out
    r.state = ReqState.RUNNING
    r.num_computed = r.seq_len - 1
    r.last_token_time = now - rng.uniform(0.0, 0.02)
    return r


def _waiting(rid: str, n: int, arrival: float) -> Request:
    return Request(rid, [7] * n, SamplingParams(max_new_tokens=200), arrival_time=arrival, seed=0)


def make_views(batch: int, queue: int, seed: int = 0) -> dict[str, SchedulerView]:
    rng = random.Random(seed)
    now = 100.0
    dec = [_decoding(f"d{i}", rng.randint(200, 4000), rng.randint(50, 500), now, rng) for i in range(batch)]
    pre = _waiting("p0", 6000, now - 0.3)
    pre.state, pre.num_computed = ReqState.RUNNING, 2048
    wait = [_waiting(f"w{i}", rng.randint(300, 6000), now - 0.25 + 0.25 * i / max(1, queue)) for i in range(queue)]
    cfg = CoreConfig(kv_slots=350_001, context_length=CTX_LEN, max_running_requests=max(256, batch + 64))
    queue_cols = WaitingQueue()  # the columns the core's view carries beside the waiting requests
    for r in wait:
        queue_cols.append(r)

    def view(idle, inflight, decoding):
        return SchedulerView(now=now, waiting=wait, prefilling=[pre], decoding=decoding, inflight=inflight,
                             idle_lanes=frozenset(idle), kv_free=200_000, kv_total=350_000,
                             num_running=batch + 1 + 8, config=cfg, waiting_columns=queue_cols.columns())

    chunk = PrefillChunk("x", 0, 4096)
    busy_p = Launch(0, LaneKind.PREFILL, LaneBatch(prefill=[chunk]), [ReqWork("x", [1] * 4096, 0, [], True)],
                    sms=100, predicted_ms={"prefill": 120.0})
    lane = dec[: batch // 2]
    busy_d = Launch(1, LaneKind.DECODE, LaneBatch(decode=[r.rid for r in lane], steps=4),
                    [ReqWork(r.rid, [5], r.num_computed, [], True, 4, params=r.params, output_ids=r.output_ids,
                             prompt_ids=r.prompt_ids) for r in lane], sms=32, predicted_ms={"decode": 90.0})
    return {
        "both idle": view(ALL_LANES, {}, dec),
        "prefill running, decode idle": view({LaneKind.DECODE}, {LaneKind.PREFILL: busy_p}, dec),
        "decode running, prefill idle": view({LaneKind.PREFILL}, {LaneKind.DECODE: busy_d}, dec[batch // 2:]),
    }


def time_plans(policy, view: SchedulerView, repeat: int) -> tuple[list[float], list[float]]:
    """(wall ms, thread CPU ms) of each of `repeat` plan() calls."""
    policy.plan(view)  # warm caches
    wall, cpu = [], []
    for _ in range(repeat):
        c0, t0 = time.thread_time(), time.perf_counter()
        policy.plan(view)
        t1, c1 = time.perf_counter(), time.thread_time()
        wall.append((t1 - t0) * 1e3)
        cpu.append((c1 - c0) * 1e3)
    return wall, cpu


def _lane_state(view: SchedulerView) -> str:
    if LaneKind.AGGREGATED in view.idle_lanes:
        return "both idle"
    return "prefill running, decode idle" if LaneKind.DECODE in view.idle_lanes else "decode running, prefill idle"


def simulated_plans(name: str, workload: str, rate: float, num_requests: int, max_running: int, model: str,
                    hardware: str, seed: int = 0) -> list[tuple[str, int, int, float]]:
    """(lane state, ready decodes, prompts waiting or prefilling, thread CPU ms) of every plan() of
    one simulated run. The policy's class is wrapped for the run (the simulator builds the policy)."""
    from sglang_duet.policies.base import PolicyContext, load_policy
    from sglang_duet.simulator.loop import SimConfig, simulate

    cm = CostModel.load(model, hardware)
    cls = type(load_policy(name, PolicyContext(chunked_prefill_size=8192, tbt_slo_ms=100.0, ttft_slo_ms=1000.0,
                                               cost_model=cm, hardware=cm.hw)))
    plan = cls.plan
    out: list[tuple[str, int, int, float]] = []

    def timed(self, view):
        c0 = time.thread_time()
        got = plan(self, view)
        c1 = time.thread_time()
        out.append((_lane_state(view), len(view.decoding), len(view.waiting) + len(view.prefilling), (c1 - c0) * 1e3))
        return got

    cls.plan = timed
    try:
        simulate(SimConfig(policy=name, hardware=hardware, model=model, workload=workload, rate=rate,
                           num_requests=num_requests, seed=seed, chunked_prefill_size=8192,
                           max_running_requests=max_running))
    finally:
        cls.plan = plan
    return out


def report_simulated(name: str, plans: list[tuple[str, int, int, float]], min_batch: int) -> None:
    groups: dict[tuple[str, bool], list[float]] = {}
    for state, n, queue, ms in plans:
        if n >= min_batch:
            groups.setdefault((state, queue > 0), []).append(ms)
    for (state, queued), xs in sorted(groups.items()):
        xs.sort()
        q = (lambda f: xs[min(len(xs) - 1, int(f * len(xs)))])
        print(f"{name:12s} {min_batch:>5d}+ {state:32s} {'queue' if queued else 'no queue':9s} {len(xs):6d} "
              f"{statistics.median(xs):10.3f} {q(0.9):8.3f} {q(0.99):8.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policies", default="duet,duet-paper")
    p.add_argument("--batches", default="64,256,1024")
    p.add_argument("--queue", type=int, default=32, help="waiting prompts")
    p.add_argument("--repeat", type=int, default=300)
    p.add_argument("--model", default="qwen3-8b")
    p.add_argument("--hardware", default="h100")
    p.add_argument("--policies-dir", default=None, help="time the policies/ folder of another checkout")
    p.add_argument("--simulated", default=None, metavar="WORKLOAD:RATE",
                   help="time every plan() of a simulated run of WORKLOAD at RATE req/s instead")
    p.add_argument("--num-requests", type=int, default=1500, help="--simulated: requests in the run")
    p.add_argument("--max-running", type=int, default=512, help="--simulated: max running requests")
    p.add_argument("--min-batch", type=int, default=224, help="--simulated: report plans with this many ready decodes")
    a = p.parse_args(argv)
    simulated = None
    if a.simulated is not None:
        workload, _, rate = a.simulated.rpartition(":")
        try:
            simulated = (workload, float(rate))
        except ValueError:
            p.error(f"--simulated: expected WORKLOAD:RATE, got {a.simulated!r}")
        if not workload or not simulated[1] > 0:
            p.error(f"--simulated: expected WORKLOAD:RATE with a positive rate, got {a.simulated!r}")
    if a.policies_dir is not None:
        import sglang_duet.policies as package

        if any(name.startswith("sglang_duet.policies.") for name in sys.modules):
            p.error("--policies-dir: a policy module is already imported; run the benchmark as a fresh process")
        if not os.path.isfile(os.path.join(a.policies_dir, "base.py")):
            p.error(f"--policies-dir: no policies folder (base.py) at {a.policies_dir!r}")
        package.__path__[:] = [os.path.abspath(a.policies_dir)]
    from sglang_duet.policies.base import PolicyContext, load_policy

    print(f"policies from {os.path.dirname(sys.modules['sglang_duet.policies.base'].__file__)}")
    if simulated is not None:
        workload, rate = simulated
        print(f"plan() overhead over a simulated run: {workload} at {rate:g} req/s, {a.num_requests} requests, "
              f"{a.model} on {a.hardware}, thread CPU ms per plan")
        print(f"{'policy':12s} {'batch':>6s} {'state':32s} {'prompts':9s} {'plans':>6s} {'CPU median':>10s} "
              f"{'p90':>8s} {'p99':>8s}")
        for name in a.policies.split(","):
            plans = simulated_plans(name, workload, rate, a.num_requests, a.max_running, a.model, a.hardware)
            report_simulated(name, plans, a.min_batch)
            print(f"{name:12s} (largest batch {max((n for _, n, _, _ in plans), default=0)}, {len(plans)} plans)")
        return 0
    cm = CostModel.load(a.model, a.hardware)
    print(f"plan() overhead, {a.model} on {a.hardware} pricing, queue {a.queue} prompts, {a.repeat} calls per cell")
    print(f"{'policy':12s} {'batch':>6s}  {'state':32s} {'median ms':>10s} {'p90 ms':>8s} {'CPU median':>11s} "
          f"{'CPU p90':>8s}")
    for name in a.policies.split(","):
        for batch in (int(x) for x in a.batches.split(",")):
            for state, view in make_views(batch, a.queue).items():
                pol = load_policy(name, PolicyContext(chunked_prefill_size=8192, tbt_slo_ms=100.0, ttft_slo_ms=1000.0,
                                                      cost_model=cm, hardware=cm.hw))
                wall, cpu = (sorted(x) for x in time_plans(pol, view, a.repeat))
                p90 = int(0.9 * len(wall))
                print(f"{name:12s} {batch:6d}  {state:32s} {statistics.median(wall):10.3f} {wall[p90]:8.3f} "
                      f"{statistics.median(cpu):11.3f} {cpu[p90]:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
