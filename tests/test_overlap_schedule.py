"""Overlap scheduling in the core: step N+1 planned and handed over while step N runs.

The fake lanes queue a launch behind the one running on its lane and resolve a FUTURE_TOKEN
input from the launch it names, writing it into the KV slot the core chose: a wrong position,
slot or source launch gives a different token than `reference_tokens`.
"""
from __future__ import annotations

import pytest

from sglang_duet.core.plan import FUTURE_TOKEN
from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams
from fake_lanes import FakeLanes, reference_tokens
from test_scheduler_core import outputs, prompt

LENS = [(5, 9), (40, 20), (1, 7), (17, 3), (64, 12), (9, 30)]


def _core(policy: str, overlap: bool, pool: int = 4096, budget: int = 32, forced=None):
    box = {}
    core = SchedulerCore(CoreConfig(kv_slots=pool, context_length=4096, chunked_prefill_size=budget, overlap=overlap),
                         load_policy(policy, PolicyContext(chunked_prefill_size=budget)),
                         clock=lambda: box["lanes"].clock())
    lanes = box["lanes"] = FakeLanes(core, pool, forced=forced)
    return core, lanes


@pytest.mark.parametrize("policy", ["aggregated", "chunked"])
def test_overlap_gives_the_same_tokens_with_steps_queued(policy):
    got = {}
    for overlap in (False, True):
        core, lanes = _core(policy, overlap)
        for i, (p, n) in enumerate(LENS):
            core.add_request(f"r{i}", prompt(i, p), SamplingParams(max_new_tokens=n))
        out, reasons = outputs(lanes.run())
        for i, (p, n) in enumerate(LENS):
            assert out[f"r{i}"] == reference_tokens(prompt(i, p), n)
            assert reasons[f"r{i}"] == {"type": "length", "length": n}
        assert core.allocator.available == core.allocator.capacity and not core.requests
        got[overlap] = lanes
    assert got[False].queued_submits == 0
    assert got[True].queued_submits > 0, "no step was ever planned behind a running one"
    futures = [w for lnch in got[True].launches for w in lnch.work if w.input_ids == [FUTURE_TOKEN]]
    assert futures and all(w.input_from is not None for w in futures)
    # steps back to back: the overlapped run ends no later than the serial one (same fake device time)
    assert got[True].now <= got[False].now + 1e-9


def test_a_request_ended_by_eos_in_step_n_wastes_one_row_and_gets_no_extra_token():
    eos_at = 4  # r1's 5th output token is its eos
    forced = {"r1": {eos_at: 2}}
    core, lanes = _core("chunked", overlap=True, forced=forced)
    for i, (p, n) in enumerate(LENS):
        params = SamplingParams(max_new_tokens=n)
        core.add_request(f"r{i}", prompt(i, p), params, eos_ids=frozenset({2}) if i == 1 else frozenset())
    out, reasons = outputs(lanes.run())
    assert reasons["r1"] == {"type": "stop", "matched": 2}
    assert out["r1"] == reference_tokens(prompt(1, 40), eos_at) + [2]
    # the step after the eos was already queued with r1 in it: its token was dropped, its KV freed at its end
    sampled_rows = [lnch for lnch in lanes.launches if any(w.rid == "r1" and w.sample for w in lnch.work)]
    assert len(sampled_rows) == len(out["r1"]) + 1  # one launch per token, plus the wasted row
    assert core.allocator.available == core.allocator.capacity and not core.requests


def test_a_request_ending_by_length_is_not_planned_again():
    core, lanes = _core("chunked", overlap=True)
    core.add_request("a", prompt(1, 6), SamplingParams(max_new_tokens=5))
    core.add_request("b", prompt(2, 6), SamplingParams(max_new_tokens=40))
    outputs(lanes.run())
    a_rows = [lnch for lnch in lanes.launches if any(w.rid == "a" and w.sample for w in lnch.work)]
    assert len(a_rows) == 5  # one sampled token per launch, none wasted: the core knew it would end


def test_overlap_under_kv_pressure_retracts_only_requests_no_lane_is_writing():
    core, lanes = _core("chunked", overlap=True, pool=80)
    for i in range(5):
        core.add_request(f"r{i}", prompt(i, 10), SamplingParams(max_new_tokens=20))
    out, _ = outputs(lanes.run())
    assert core.stats.retractions > 0
    for i in range(5):
        assert out[f"r{i}"] == reference_tokens(prompt(i, 10), 20)
    assert core.allocator.available == core.allocator.capacity


def test_abort_while_two_launches_hold_the_request():
    core, lanes = _core("chunked", overlap=True)
    core.add_request("a", prompt(3, 8), SamplingParams(max_new_tokens=50))
    import heapq

    ups = []
    while core.has_unfinished():
        while True:
            launches = core.schedule()
            for lnch in launches:
                lanes.submit(lnch)
            if not launches:
                break
        if core.requests["a"].inflight_count == 2 and not core.requests["a"].aborted:
            core.abort("a")
            n_at_abort = sum(len(u.new_token_ids) for u in ups)
        t, _, res = heapq.heappop(lanes.pending)
        lanes.now = t
        ups += core.apply_result(res)
    out, reasons = outputs(ups)
    assert reasons["a"]["type"] == "abort"
    assert len(out.get("a", [])) == n_at_abort
    assert core.allocator.available == core.allocator.capacity and not core.requests


def test_a_policy_without_overlap_support_is_never_overlapped():
    from fake_lanes import SplitAlways

    box = {}
    core = SchedulerCore(CoreConfig(kv_slots=4096, context_length=4096, overlap=True), SplitAlways(),
                         clock=lambda: box["lanes"].clock())
    lanes = box["lanes"] = FakeLanes(core, 4096)
    for i, (p, n) in enumerate(LENS):
        core.add_request(f"r{i}", prompt(i, p), SamplingParams(max_new_tokens=n))
    outputs(lanes.run())
    assert not any(w.input_ids == [FUTURE_TOKEN] for lnch in lanes.launches for w in lnch.work)
