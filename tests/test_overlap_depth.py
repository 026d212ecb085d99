"""Overlap scheduling two (or more) launches deep: CoreConfig.overlap_depth launches may wait behind
the running aggregated one, so the host has several steps to apply a result and plan before the
device idles; one only while requests are being admitted (some wait, or a queued launch prefills).

The fake lanes run queued launches in order and resolve a FUTURE_TOKEN input from the launch it
names, writing it into the KV slot the core chose: a wrong position, slot or source launch gives a
different token than `reference_tokens`.
"""
from __future__ import annotations

import heapq
import os

import pytest

from sglang_duet.core.plan import FUTURE_TOKEN
from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams
from fake_lanes import FakeLanes, reference_tokens
from test_scheduler_core import outputs, prompt

MODEL_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models",
                            "smollm2-135m.json")
LENS = [(5, 9), (40, 20), (1, 7), (17, 3), (64, 12), (9, 30)]


class DepthLanes(FakeLanes):
    """FakeLanes that record how many launches already waited (not started) when each was submitted."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.waiting_at_submit: list[int] = []
        self.deep_while_admitting = 0  # launches queued behind another while requests were admitted

    def submit(self, launch) -> None:
        ahead = [r.launch_id for _, _, r in self.pending if r.started_at > self.now]
        self.waiting_at_submit.append(len(ahead))
        by_id = {lnch.launch_id: lnch for lnch in self.launches}
        if ahead and (self.core.waiting or any(by_id[i].batch.prefill for i in ahead)):
            self.deep_while_admitting += 1
        super().submit(launch)


def _core(policy: str, depth: int, pool: int = 4096, budget: int = 32, forced=None):
    box = {}
    core = SchedulerCore(CoreConfig(kv_slots=pool, context_length=4096, chunked_prefill_size=budget, overlap=True,
                                    overlap_depth=depth),
                         load_policy(policy, PolicyContext(chunked_prefill_size=budget)),
                         clock=lambda: box["lanes"].clock())
    lanes = box["lanes"] = DepthLanes(core, pool, forced=forced)
    return core, lanes


@pytest.mark.parametrize("policy", ["aggregated", "chunked"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_every_depth_gives_the_same_tokens_and_queues_that_many(policy, depth):
    core, lanes = _core(policy, depth)
    for i, (p, n) in enumerate(LENS):
        core.add_request(f"r{i}", prompt(i, p), SamplingParams(max_new_tokens=n))
    out, reasons = outputs(lanes.run())
    for i, (p, n) in enumerate(LENS):
        assert out[f"r{i}"] == reference_tokens(prompt(i, p), n)
        assert reasons[f"r{i}"] == {"type": "length", "length": n}
    assert core.allocator.available == core.allocator.capacity and not core.requests
    assert not core.inflight and not core._busy and not core._queued
    # a launch was submitted behind depth - 1 that had not started yet, never behind more, and
    # behind one only while nothing was being admitted
    assert max(lanes.waiting_at_submit) == depth - 1
    assert lanes.deep_while_admitting == 0
    futures = [w for lnch in lanes.launches for w in lnch.work if w.input_ids == [FUTURE_TOKEN]]
    assert futures and all(w.input_from is not None for w in futures)


@pytest.mark.parametrize("depth", [2, 3])
def test_a_request_ended_by_eos_wastes_at_most_depth_rows(depth):
    eos_at = 4  # r1's 5th output token is its eos
    core, lanes = _core("chunked", depth, forced={"r1": {eos_at: 2}})
    for i, (p, n) in enumerate(LENS):
        core.add_request(f"r{i}", prompt(i, p), SamplingParams(max_new_tokens=n),
                         eos_ids=frozenset({2}) if i == 1 else frozenset())
    out, reasons = outputs(lanes.run())
    assert reasons["r1"] == {"type": "stop", "matched": 2}
    assert out["r1"] == reference_tokens(prompt(1, 40), eos_at) + [2]
    sampled = [lnch for lnch in lanes.launches if any(w.rid == "r1" and w.sample for w in lnch.work)]
    # the steps queued behind the eos's step held r1: their tokens dropped, its KV freed at their end
    assert len(out["r1"]) < len(sampled) <= len(out["r1"]) + depth
    for i, (p, n) in enumerate(LENS):
        if i != 1:
            assert out[f"r{i}"] == reference_tokens(prompt(i, p), n)
    assert core.allocator.available == core.allocator.capacity and not core.requests


def test_a_request_ending_by_length_is_not_planned_again_at_depth_two():
    core, lanes = _core("chunked", 2)
    core.add_request("a", prompt(1, 6), SamplingParams(max_new_tokens=5))
    core.add_request("b", prompt(2, 6), SamplingParams(max_new_tokens=40))
    outputs(lanes.run())
    a_rows = [lnch for lnch in lanes.launches if any(w.rid == "a" and w.sample for w in lnch.work)]
    assert len(a_rows) == 5  # the tokens in flight (two launches' worth) were known to end it


def test_kv_pressure_at_depth_two_retracts_only_requests_no_lane_writes():
    core, lanes = _core("chunked", 2, pool=80)
    for i in range(5):
        core.add_request(f"r{i}", prompt(i, 10), SamplingParams(max_new_tokens=20))
    out, _ = outputs(lanes.run())
    assert core.stats.retractions > 0
    for i in range(5):
        assert out[f"r{i}"] == reference_tokens(prompt(i, 10), 20)
    assert core.allocator.available == core.allocator.capacity


@pytest.mark.parametrize("depth", [2, 3])
def test_abort_while_every_queued_launch_holds_the_request(depth):
    core, lanes = _core("chunked", depth)
    core.add_request("a", prompt(3, 8), SamplingParams(max_new_tokens=50))
    core.add_request("b", prompt(4, 8), SamplingParams(max_new_tokens=12))
    free_before = core.allocator.available
    ups, n_at_abort, held = [], None, 0
    while core.has_unfinished():
        while True:
            launches = core.schedule()
            for lnch in launches:
                lanes.submit(lnch)
            if not launches:
                break
        a = core.requests.get("a")
        if a is not None and not a.aborted:
            held = max(held, a.inflight_count)
            if a.inflight_count == depth + 1:  # the running launch and every queued one
                core.abort("a")
                n_at_abort = sum(len(u.new_token_ids) for u in ups if u.rid == "a")
        t, _, res = heapq.heappop(lanes.pending)
        lanes.now = t
        ups += core.apply_result(res)
    assert held == depth + 1 and n_at_abort is not None
    out, reasons = outputs(ups)
    assert reasons["a"]["type"] == "abort"
    assert len(out.get("a", [])) == n_at_abort  # nothing delivered after the abort
    assert out["b"] == reference_tokens(prompt(4, 8), 12)
    assert core.allocator.available == free_before == core.allocator.capacity and not core.requests


def test_the_emulated_server_engine_queues_two_deep_unless_overlap_is_off():
    from sglang_duet.engine_core import EngineCore
    from sglang_duet.server.args import parse_args

    base = ["--executor", "emulated", "--emulated-step-ms", "10", "--policy", "aggregated",
            "--max-total-tokens", "4096", "--model-config", MODEL_CONFIG]
    e = EngineCore(parse_args(base), tokenizer_decode_only=True)
    assert e.core._overlap and e.core._overlap_depth == 2
    e.shutdown()
    e = EngineCore(parse_args(base + ["--disable-overlap-schedule"]), tokenizer_decode_only=True)
    assert not e.core._overlap
    e.shutdown()
