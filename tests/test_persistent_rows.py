"""Persistent decode rows (CoreConfig.persistent_rows): a decode launch of exactly the requests of its
lane's previous launch gets that launch's work list back, each row advanced in place, and the
emulated device advances its columns instead of reading the rows again. Everything an executor
reads at submit, and everything the emulated device reports, must equal what fresh rows give.
"""
from __future__ import annotations

import heapq
import random

import pytest

from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.cost_model.constant import ConstantCostModel
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.cost_model.truth import TruthConfig
from sglang_duet.executor.emulated import EmulatedExecutor, emulated_kv_slots
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams
from emulated_driver import drive
from fake_lanes import FakeLanes, SplitAlways, reference_tokens
from test_scheduler_core import outputs, prompt

CM = CostModel.load("qwen3-8b", "h100")
CONST = ConstantCostModel.like(CM, 0.01)


def _snapshot(launch) -> tuple:
    """What an executor reads of a launch when it is submitted."""
    return (launch.launch_id, launch.lane, [(w.rid, list(w.input_ids), w.start_pos, list(w.kv_slots), w.sample, w.steps,
                                            w.input_from, w.output_pos, w.table_row) for w in launch.work])


def _fake_run(policy, persistent: bool, depth: int, aborts: bool):
    rng = random.Random(3)
    box = {}
    core = SchedulerCore(CoreConfig(kv_slots=4096, context_length=4096, chunked_prefill_size=48, overlap=depth > 0,
                                    overlap_depth=max(1, depth), persistent_rows=persistent),
                         policy, clock=lambda: box["lanes"].clock())
    lanes = box["lanes"] = FakeLanes(core, 4096)
    arrivals = sorted((rng.uniform(0, 0.4), i) for i in range(14))
    lens = {i: (rng.randrange(1, 40), rng.randrange(1, 60)) for i in range(14)}
    t_abort = {f"r{i}": rng.uniform(0.1, 0.6) for i in range(14) if aborts and i % 4 == 1}
    seen, reused, last_work, ups = [], 0, {}, []
    while arrivals or core.has_unfinished():
        while arrivals and arrivals[0][0] <= lanes.now:
            _, i = arrivals.pop(0)
            core.add_request(f"r{i}", prompt(i, lens[i][0]), SamplingParams(max_new_tokens=lens[i][1]))
        for rid, t in list(t_abort.items()):
            if t <= lanes.now and rid in core.requests:
                core.abort(rid)
                del t_abort[rid]
        while core.can_plan():
            launches = core.schedule()
            for lnch in launches:
                reused += last_work.get(lnch.lane) is lnch.work
                last_work[lnch.lane] = lnch.work
                seen.append(_snapshot(lnch))
                lanes.submit(lnch)
            if not launches:
                break
        ups += core.take_updates()
        due = [x for x in ((lanes.pending[0][0] if lanes.pending else None), arrivals[0][0] if arrivals else None)
               if x is not None]
        if not due:
            break
        if lanes.pending and lanes.pending[0][0] <= min(due):
            t, _, res = heapq.heappop(lanes.pending)
            lanes.now = t
            ups += core.apply_result(res)
        else:
            lanes.now = min(due)
    ups += core.take_updates()
    assert core.allocator.available == core.allocator.capacity and not core.requests
    out, reasons = outputs(ups)
    for rid, toks in out.items():
        i = int(rid[1:])
        if reasons[rid]["type"] == "length":
            assert toks == reference_tokens(prompt(i, lens[i][0]), lens[i][1])
    return seen, out, reasons, reused


@pytest.mark.parametrize("name,depth", [("aggregated", 0), ("aggregated", 1), ("aggregated", 2), ("chunked", 2),
                                        ("split-k3", 0)])
@pytest.mark.parametrize("aborts", [False, True])
def test_rows_read_at_submit_are_those_of_fresh_rows(name, depth, aborts):
    def policy():
        if name == "split-k3":
            return SplitAlways(prefill_budget=48, steps=3)
        return load_policy(name, PolicyContext(chunked_prefill_size=48))

    on = _fake_run(policy(), True, depth, aborts)
    off = _fake_run(policy(), False, depth, aborts)
    assert on[:3] == off[:3]  # every launch as submitted, every token, every finish
    assert on[3] > 10 and off[3] == 0  # rows were handed back (and only when asked)
    if aborts:
        assert any(r["type"] == "abort" for r in on[2].values())


def _emulated_run(cm, truth, policy_name: str, persistent: bool, depth: int):
    """The emulated device under the core (virtual clock): arrivals over time, logprobs, aborts."""
    rng = random.Random(5)
    ex = EmulatedExecutor(cm, clock_mode="virtual", truth=truth, token_range=(10, 30000), banned_tokens={11})
    policy = load_policy(policy_name, PolicyContext(chunked_prefill_size=512, tbt_slo_ms=60, ttft_slo_ms=1000,
                                                    cost_model=cm, hardware=cm.hw))
    core = SchedulerCore(CoreConfig(kv_slots=emulated_kv_slots(cm), context_length=8192, max_running_requests=64,
                                    chunked_prefill_size=512, overlap=depth > 0, overlap_depth=max(1, depth),
                                    persistent_rows=persistent), policy, clock=ex.now)
    advanced = [0]
    rows_of = ex._rows

    def counted(launch):
        last = ex._last_rows.get(launch.lane)
        advanced[0] += last is not None and last[0] is launch.work
        return rows_of(launch)

    ex._rows = counted
    parts = []

    def keep(res):
        parts.append((res.launch_id, res.final, res.started_at, res.finished_at, list(res.rows), res.logprobs))

    log = drive(core, ex, rng, 40, 0.5, 300, 90, 5, 1.5, 0.25, on_result=keep)
    return log, parts, dict(ex.busy_s), advanced[0]


@pytest.mark.parametrize("cm,truth", [(CM, TruthConfig(seed=1)), (CONST, TruthConfig.exact(contention="none"))])
@pytest.mark.parametrize("policy,depth", [("aggregated", 2), ("aggregated", 1), ("duet", 0)])
def test_the_emulated_device_reports_the_same_with_persistent_rows(cm, truth, policy, depth):
    on = _emulated_run(cm, truth, policy, True, depth)
    off = _emulated_run(cm, truth, policy, False, depth)
    assert on[:3] == off[:3]  # every part (ids, logprobs, times), every update, the lanes' busy time
    assert on[3] > 5 and off[3] == 0  # the columns were advanced, not read again
    assert any(u[3] and u[3].get("type") == "abort" for u in on[0])
    assert any(u[4] for u in on[0])  # logprobs rows went through advanced launches too


def test_advanced_columns_equal_read_columns_for_multi_step_rows():
    from sglang_duet.core.plan import FUTURE_TOKEN, ReqWork
    from sglang_duet.executor.emulated_tokens import VECTOR_ROWS, LaunchRows

    for n in (3, VECTOR_ROWS + 5):
        for k in (1, 4):
            rows = [ReqWork(f"r{i}", [FUTURE_TOKEN], 30 + 7 * i, [], True, k, (-1) ** i * (i << 60) + i,
                            SamplingParams(logprobs=i % 3 == 0)) for i in range(n)]
            got = LaunchRows(rows).advanced()
            for w in rows:
                w.start_pos += k
            want = LaunchRows(rows)
            for j in range(k):
                assert got.tokens(j, 10, 5000, frozenset({11, 12})) == want.tokens(j, 10, 5000, frozenset({11, 12}))
            assert (got.q, got.c, got.s, got.lp_rows, got.masked) == (want.q, want.c, want.s, want.lp_rows, want.masked)
