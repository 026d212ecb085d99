"""The one-step decode fast path of apply_result (`_apply_decode_rows`) gives exactly what the
general loop gives: the same updates in the same order (tokens, finish reasons, counts, times),
the same stats, and the KV pool back to full, with eos, stop strings, length, aborts at every
stage and overlap one and two launches deep."""
from __future__ import annotations

import heapq

import pytest

from sglang_duet.core.plan import NO_TOKEN, RowResult
from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams
from fake_lanes import FakeLanes
from test_scheduler_core import prompt


class RowLanes(FakeLanes):
    """FakeLanes whose one-token-per-row results come as RowResults (as the emulated device's do)."""

    def submit(self, launch) -> None:
        super().submit(launch)
        for k, (t, key, res) in enumerate(self.pending):
            if res.launch_id == launch.launch_id and res.final and all(len(v) == 1 for v in res.tokens.values()):
                rows = [res.tokens[w.rid][0] if w.rid in res.tokens else NO_TOKEN for w in launch.work]
                self.pending[k] = (t, key, RowResult(res.launch_id, launch.work, rows, started_at=res.started_at,
                                                    finished_at=res.finished_at))
        heapq.heapify(self.pending)


def _run(fast: bool, depth: int, aborts: dict[int, str]):
    box = {}
    stops = {"r3": 6}  # r3's stop string "matches" once it has 6 output tokens

    def stop_checker(r):
        return "x" if r.rid in stops and len(r.output_ids) >= stops[r.rid] else None

    core = SchedulerCore(CoreConfig(kv_slots=2048, context_length=2048, chunked_prefill_size=64, overlap=depth > 0,
                                    overlap_depth=max(1, depth)),
                         load_policy("aggregated", PolicyContext(chunked_prefill_size=64)),
                         clock=lambda: box["lanes"].clock(), stop_checker=stop_checker)
    core.decode_rows_fast = fast
    calls = [0]
    inner = core._apply_decode_rows

    def counted(*a):
        calls[0] += 1
        return inner(*a)

    core._apply_decode_rows = counted
    lanes = box["lanes"] = RowLanes(core, 2048, forced={"r1": {5: 2}})
    for i in range(8):
        params = SamplingParams(max_new_tokens=4 + 3 * i, stop=["x"] if i == 3 else None)
        core.add_request(f"r{i}", prompt(i, 5 + i), params, eos_ids=frozenset({2}) if i == 1 else frozenset())
    free0 = core.allocator.available
    ups, step = [], 0
    while core.has_unfinished():
        ups += core.take_updates()
        while core.can_plan():
            launches = core.schedule()
            if not launches:
                break
            for lnch in launches:
                lanes.submit(lnch)
        if step in aborts:
            core.abort(aborts[step])
        ups += core.take_updates()
        if not lanes.pending:
            break
        t, _, res = heapq.heappop(lanes.pending)
        lanes.now = t
        ups += core.apply_result(res)
        step += 1
    ups += core.take_updates()
    assert core.allocator.available == free0 == core.allocator.capacity and not core.requests
    rows = [(u.rid, list(u.new_token_ids), u.finished, u.finish_reason, u.completion_tokens, u.first_token_time,
             u.finish_time) for u in ups]
    return rows, core.stats.generated_tokens, core.stats.finished, core.stats.aborted, calls[0]


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("aborts", [{}, {0: "r5", 3: "r6", 6: "r7", 9: "r2"}, {2: "r4", 4: "r4", 12: "r0"}])
def test_fast_path_equals_the_general_loop(depth, aborts):
    fast = _run(True, depth, aborts)
    slow = _run(False, depth, aborts)
    assert fast[:4] == slow[:4]
    assert fast[4] > 5 and slow[4] == 0  # the fast path ran (and only where it was on)
    reasons = {r[0]: r[3]["type"] for r in fast[0] if r[2]}
    assert reasons["r1"] == "stop" and reasons["r3"] == "stop"
    if not aborts:
        assert set(reasons.values()) == {"stop", "length"}
