"""Drive a SchedulerCore on the emulated GPU's virtual clock, as the scheduler process does: requests
arriving over time (some asking for logprobs, some aborted mid-stream), planning while the core
can, the clock advanced to the next completion or arrival. Shared by the tests that compare two
runs of the same requests (tests/test_emulated_rows.py, tests/test_persistent_rows.py)."""
from __future__ import annotations

import random

from sglang_duet.sampling_params import SamplingParams


def drive(core, ex, rng: random.Random, n: int, arrive_within_s: float, prompt_max: int, output_max: int,
          logprobs_every: int, abort_within_s: float, abort_share: float, on_result=None) -> list:
    """Run n requests to the end; every update as (time, rid, new ids, finish reason, logprobs).
    `on_result(res)` sees each launch result before the core applies it. Asserts that aborts left
    no KV slot behind."""
    arrivals = sorted((rng.uniform(0, arrive_within_s), i) for i in range(n))
    t_abort = {f"r{i}": rng.uniform(0.2, abort_within_s) for i in range(n)
               if abort_share and rng.random() < abort_share}
    log = []
    while arrivals or core.has_unfinished():
        now = ex.now()
        while arrivals and arrivals[0][0] <= now:
            _, i = arrivals.pop(0)
            core.add_request(f"r{i}", [7] * rng.randrange(1, prompt_max),
                             SamplingParams(max_new_tokens=rng.randrange(1, output_max), ignore_eos=True,
                                            logprobs=i % logprobs_every == 0), seed=rng.randrange(2 ** 63))
        for rid, t in list(t_abort.items()):
            if t <= now and rid in core.requests:
                core.abort(rid)
                del t_abort[rid]
        while core.can_plan():
            planned = core.schedule()
            for launch in planned:
                ex.submit(launch)
            if not planned:
                break
        updates = core.take_updates()
        due = [x for x in (ex.next_completion(), arrivals[0][0] if arrivals else None) if x is not None]
        if not due:
            break
        ex.advance_to(min(due))
        for res in ex.poll(0):
            if on_result is not None:
                on_result(res)
            updates.extend(core.apply_result(res))
        log.extend((ex.now(), u.rid, list(u.new_token_ids), u.finish_reason, u.new_logprobs) for u in updates)
    assert core.allocator.available == core.allocator.capacity  # aborts left no KV slot behind
    return log
