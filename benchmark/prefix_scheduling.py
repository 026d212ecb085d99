"""Steps until every request of a burst has its first token when a long system prompt is cached:
the policy budgeting the uncached part only (the core matches waiting requests' prefixes when it
plans) against admission-only matching (the policy plans each request from position 0 and its
chunk takes the whole budget even though only the request's own tokens run).

    python -m benchmark.prefix_scheduling [--requests 32] [--system 1000] [--own 20] [--budget 512]

No model, no clock: the scheduler core, the chunked policy (qwen3-8b / h100 cost model for its
predictions) and the test suite's fake lanes; counts are deterministic.
"""
from __future__ import annotations

import argparse
import os
import sys

from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.memory.radix_cache import RadixCache
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from fake_lanes import FakeLanes  # noqa: E402

KV_SLOTS = 200_000


def steps_to_first_tokens(a, schedule_time_match: bool) -> tuple[int, float]:
    cm = CostModel.load("qwen3-8b", "h100")
    box = {}
    policy = load_policy("chunked", PolicyContext(chunked_prefill_size=a.budget, cost_model=cm, hardware=cm.hw))
    core = SchedulerCore(CoreConfig(kv_slots=KV_SLOTS, context_length=a.system + a.own + 64,
                                    chunked_prefill_size=a.budget), policy, clock=lambda: box["lanes"].clock())
    core.prefix_cache = RadixCache(core.allocator.free)
    if not schedule_time_match:
        core._match_waiting = lambda: []  # the prefix is matched only when a request is admitted
    box["lanes"] = lanes = FakeLanes(core, KV_SLOTS)
    system = [(7 * j) % 90 + 3 for j in range(a.system)]
    core.add_request("warm", system + [1], SamplingParams(max_new_tokens=1))
    lanes.run()
    for i in range(a.requests):
        core.add_request(f"r{i}", system + [(i * 13 + k) % 90 + 3 for k in range(a.own)],
                         SamplingParams(max_new_tokens=4))
    first, steps, predicted = set(), 0, 0.0
    while len(first) < a.requests:
        for launch in core.schedule():
            lanes.submit(launch)
            predicted += launch.predicted_ms.get("aggregated", 0.0)
            steps += 1
        lanes.pending.sort(key=lambda x: x[0])
        t, _, res = lanes.pending.pop(0)
        lanes.now = t
        first.update(u.rid for u in core.apply_result(res) if u.new_token_ids)
    return steps, predicted


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmark.prefix_scheduling", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--system", type=int, default=1000, help="tokens of the cached system prompt")
    p.add_argument("--own", type=int, default=20, help="tokens of each request after it")
    p.add_argument("--budget", type=int, default=512, help="the chunked policy's token budget")
    a = p.parse_args(argv)
    for match in (True, False):
        steps, ms = steps_to_first_tokens(a, match)
        print(f"{'schedule-time match' if match else 'admission only':>20s}: {steps} steps until all "
              f"{a.requests} first tokens (the policy's predicted time of those steps: {ms:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
