"""SchedulerCore without a model: admission, KV exhaustion and retraction, finishing, aborts, two lanes."""
from __future__ import annotations

import pytest

from sglang_duet.core.plan import LaneBatch, LaneKind, StepPlan
from sglang_duet.core.scheduler_core import AdmissionError, CoreConfig, SchedulerCore
from sglang_duet.policies.base import Policy, PolicyContext, load_policy, select_prefills
from sglang_duet.sampling_params import SamplingParams
from fake_lanes import FakeLanes, SplitAlways, reference_tokens


def make(pool=4096, policy="aggregated", budget=8192, max_running=256, ctx_len=4096, **pctx):
    box = {}
    core = SchedulerCore(
        CoreConfig(kv_slots=pool, context_length=ctx_len, max_running_requests=max_running, chunked_prefill_size=budget),
        policy if isinstance(policy, Policy) else load_policy(policy, PolicyContext(chunked_prefill_size=budget, **pctx)),
        clock=lambda: box["lanes"].clock(),
    )
    lanes = FakeLanes(core, pool)
    box["lanes"] = lanes
    return core, lanes


def prompt(i, n):
    return [(i * 7 + j) % 90 + 3 for j in range(n)]


def outputs(updates):
    out, reasons = {}, {}
    for u in updates:
        out.setdefault(u.rid, []).extend(u.new_token_ids)
        if u.finished:
            assert u.rid not in reasons, "a request finished twice"
            reasons[u.rid] = u.finish_reason
    return out, reasons


def test_continuous_batching_joins_and_leaves():
    core, lanes = make()
    lens = [(5, 3), (40, 20), (1, 7), (17, 1), (64, 12)]
    for i, (p, n) in enumerate(lens):
        core.add_request(f"r{i}", prompt(i, p), SamplingParams(max_new_tokens=n))
    ups = lanes.run()
    out, reasons = outputs(ups)
    for i, (p, n) in enumerate(lens):
        assert out[f"r{i}"] == reference_tokens(prompt(i, p), n)
        assert reasons[f"r{i}"] == {"type": "length", "length": n}
    assert core.allocator.available == core.allocator.capacity
    assert not core.requests


def test_requests_arriving_mid_run_join_running_batch():
    core, lanes = make()
    core.add_request("a", prompt(1, 8), SamplingParams(max_new_tokens=30))
    ups = []
    for _ in range(5):  # a few decode steps of "a" alone
        for launch in core.schedule():
            lanes.submit(launch)
        t, _, res = lanes.pending.pop()
        lanes.now = t
        ups += core.apply_result(res)
    core.add_request("b", prompt(2, 12), SamplingParams(max_new_tokens=10))
    ups += lanes.run()
    out, _ = outputs(ups)
    assert out["a"] == reference_tokens(prompt(1, 8), 30)
    assert out["b"] == reference_tokens(prompt(2, 12), 10)
    decode_batches = [l for l in lanes.launches if l.batch.decode]
    assert any(len(l.batch.decode) == 2 for l in decode_batches), "b never decoded alongside a"


def test_kv_exhaustion_retracts_and_recomputes():
    pool = 64  # 63 usable slots; 4 requests of 10 + 20 tokens need 120
    core, lanes = make(pool=pool)
    for i in range(4):
        core.add_request(f"r{i}", prompt(i, 10), SamplingParams(max_new_tokens=20))
    out, reasons = outputs(lanes.run())
    assert core.stats.retractions > 0
    for i in range(4):
        assert out[f"r{i}"] == reference_tokens(prompt(i, 10), 20), "retraction changed the output"
        assert reasons[f"r{i}"]["type"] == "length"
    assert core.allocator.available == core.allocator.capacity


def test_request_outgrowing_the_whole_pool_finishes_with_length():
    core, lanes = make(pool=21)  # 20 usable slots
    core.add_request("g", prompt(0, 10), SamplingParams(max_new_tokens=100))
    out, reasons = outputs(lanes.run())
    assert reasons["g"] == {"type": "length", "length": 10}
    assert out["g"] == reference_tokens(prompt(0, 10), 10)


def test_request_that_can_never_fit_is_rejected():
    core, _ = make(pool=32, ctx_len=100)
    with pytest.raises(AdmissionError, match="does not fit in the KV cache"):
        core.add_request("big", prompt(0, 40), SamplingParams())
    with pytest.raises(AdmissionError, match=r"The input \(100 tokens\) is longer than the model's context length \(100 tokens\)."):
        core.add_request("long", prompt(0, 100), SamplingParams())
    with pytest.raises(AdmissionError, match="empty"):
        core.add_request("e", [], SamplingParams())
    core.add_request("x", [5], SamplingParams())
    with pytest.raises(AdmissionError, match="Duplicate"):
        core.add_request("x", [5], SamplingParams())


def test_finish_on_eos_stop_ids_min_tokens_and_context():
    core, lanes = make(ctx_len=30)
    ref = reference_tokens(prompt(0, 5), 10)
    lanes.forced = {"eos": {3: 1}, "stopid": {2: 77}, "ign": {1: 1}, "minnew": {0: 1, 4: 1}}
    core.add_request("eos", prompt(0, 5), SamplingParams(max_new_tokens=10), eos_ids={1})
    core.add_request("stopid", prompt(0, 5), SamplingParams(max_new_tokens=10, stop_token_ids=[77]), eos_ids={1})
    core.add_request("ign", prompt(0, 5), SamplingParams(max_new_tokens=4, ignore_eos=True), eos_ids={1})
    core.add_request("minnew", prompt(0, 5), SamplingParams(max_new_tokens=10, min_new_tokens=3), eos_ids={1})
    core.add_request("ctx", prompt(0, 25), SamplingParams(max_new_tokens=100))
    out, reasons = outputs(lanes.run())
    assert reasons["eos"] == {"type": "stop", "matched": 1} and len(out["eos"]) == 4
    assert out["eos"][:3] == ref[:3]
    assert reasons["stopid"] == {"type": "stop", "matched": 77} and len(out["stopid"]) == 3
    assert reasons["ign"]["type"] == "length" and out["ign"][1] == 1
    # eos forced at index 0 is inside min_new_tokens (the real sampler bans it); at index 4 it stops
    assert reasons["minnew"] == {"type": "stop", "matched": 1} and len(out["minnew"]) == 5
    assert reasons["ctx"] == {"type": "length", "length": 5}


def test_aborts_waiting_running_and_inflight():
    core, lanes = make(max_running=1)
    core.add_request("run", prompt(0, 4), SamplingParams(max_new_tokens=50))
    core.add_request("wait", prompt(1, 4), SamplingParams(max_new_tokens=5))
    launches = core.schedule()
    for l in launches:
        lanes.submit(l)
    core.abort("wait")
    core.abort("run")  # in flight: released when its launch reports
    ups = core.take_updates()
    assert [u.rid for u in ups] == ["wait"] and ups[0].finish_reason["type"] == "abort"
    assert core.allocator.available < core.allocator.capacity
    ups = lanes.run()
    assert [(u.rid, u.finish_reason["type"]) for u in ups] == [("run", "abort")]
    assert core.allocator.available == core.allocator.capacity
    assert core.stats.aborted == 2


def test_aggregated_is_prefill_first_and_respects_budget():
    core, lanes = make(budget=16)
    core.add_request("a", prompt(0, 4), SamplingParams(max_new_tokens=5))
    lanes.submit(core.schedule()[0])
    lanes.now, _, res = lanes.pending.pop()
    core.apply_result(res)
    core.add_request("b", prompt(1, 40), SamplingParams(max_new_tokens=2))
    plans = []
    while core.has_unfinished():
        ls = core.schedule()
        plans += [l.batch for l in ls]
        for l in ls:
            lanes.submit(l)
        lanes.now, _, res = lanes.pending.pop()
        core.apply_result(res)
    # b's 40-token prompt is chunked 16 + 16 + 8 before any decode step, and no batch mixes them
    assert [c.length for p in plans[:3] for c in p.prefill] == [16, 16, 8]
    assert all(not (p.prefill and p.decode) for p in plans)
    assert all(p.prefill_tokens <= 16 for p in plans)


def test_select_prefills_is_fcfs_and_checks_kv():
    core, _ = make(pool=50)  # 49 usable slots
    core.add_request("long", prompt(0, 40), SamplingParams())
    core.add_request("short", prompt(1, 3), SamplingParams())
    v = core.view()
    assert [(c.rid, c.length) for c in select_prefills(v, 100)] == [("long", 40), ("short", 3)]
    assert [(c.rid, c.length) for c in select_prefills(v, 30)] == [("long", 30)]  # chunked to the budget
    # with 20 slots reserved for decodes the head (41 slots) does not fit, and short may not overtake it
    assert select_prefills(v, 100, kv_reserved=20) == []


def test_two_lanes_at_their_own_cadence():
    core, lanes = make(policy=SplitAlways(), budget=64)
    lanes.prefill_ms = 2.0  # a 64-token chunk takes 128 ms, a 3-step decode 30 ms
    core.add_request("d", prompt(0, 4), SamplingParams(max_new_tokens=40))
    lanes.run()
    core.add_request("d2", prompt(5, 4), SamplingParams(max_new_tokens=40))
    core.add_request("p", prompt(1, 300), SamplingParams(max_new_tokens=4))
    out, reasons = outputs(lanes.run())
    assert out["d2"] == reference_tokens(prompt(5, 4), 40)
    assert out["p"] == reference_tokens(prompt(1, 300), 4)
    assert lanes.max_concurrent == 2, "the lanes never overlapped"
    # while p's first 64-token chunk ran on the prefill lane, d2 kept decoding on the other
    first_p = next(l for l in lanes.launches if any(c.rid == "p" for c in l.batch.prefill))
    during = [l for l in lanes.launches if l.lane == LaneKind.DECODE and l.launch_id > first_p.launch_id][:3]
    assert len(during) >= 3
    assert core.stats.launches["prefill"] >= 5 and core.stats.launches["decode"] >= 10
    assert core.allocator.available == core.allocator.capacity


def test_lookahead_finish_mid_steps_frees_extra_slots():
    core, lanes = make(policy=SplitAlways())
    lanes.forced = {"x": {4: 1}}
    core.add_request("x", prompt(0, 4), SamplingParams(max_new_tokens=40), eos_ids={1})
    out, reasons = outputs(lanes.run())
    assert reasons["x"] == {"type": "stop", "matched": 1} and len(out["x"]) == 5
    assert core.allocator.available == core.allocator.capacity


def test_policy_bugs_are_refused():
    class Mixed(Policy):
        def plan(self, view):
            return StepPlan(aggregated=LaneBatch(prefill=select_prefills(view, 1)),
                            decode_lane=LaneBatch(prefill=select_prefills(view, 1)))

    class BusyLane(Policy):
        def plan(self, view):  # ignores idle_lanes
            return StepPlan(prefill_lane=LaneBatch(prefill=select_prefills(view, 1)))

    core, _ = make(policy=Mixed())
    core.add_request("a", [3, 4], SamplingParams())
    with pytest.raises(RuntimeError, match="either aggregated or split"):
        core.schedule()
    core, _ = make(policy=BusyLane())
    core.add_request("a", [3, 4, 5], SamplingParams())
    assert len(core.schedule()) == 1
    core.add_request("b", [3, 4, 5], SamplingParams())
    with pytest.raises(RuntimeError, match="busy lane"):
        core.schedule()


def test_slot_allocator_reuses_freed_slots_and_scales_to_huge_pools():
    from sglang_duet.core.kv_allocator import TokenSlotAllocator

    a = TokenSlotAllocator(10)
    x = a.alloc(4)
    assert x == [1, 2, 3, 4] and a.available == 5
    a.free(x[:2])
    y = a.alloc(5)
    assert sorted(y) == [1, 2, 5, 6, 7] and a.available == 2
    assert a.alloc(3) is None
    a.free(y)
    a.free(x[2:])
    assert a.available == a.capacity == 9
    assert len(set(a.alloc(9))) == 9 and a.alloc(1) is None
    big = TokenSlotAllocator(600_000_000)  # an emulated 141 GB GPU with a tiny model: O(1) memory
    assert big.available == 599_999_999 and big.alloc(3) == [1, 2, 3]


def test_table_rows_are_held_while_kv_is_held_and_all_free_at_the_end():
    pool = 50  # retractions: rows are released and handed out again
    core, lanes = make(pool=pool, max_running=4)
    for i in range(6):
        core.add_request(f"r{i}", prompt(i, 10), SamplingParams(max_new_tokens=12))
    out, _ = outputs(lanes.run())  # FakeLanes checks no row is shared by two requests in flight
    assert all(out[f"r{i}"] == reference_tokens(prompt(i, 10), 12) for i in range(6))
    assert core.stats.retractions > 0
    assert sorted(core._free_rows) == list(range(core.config.table_rows))
    assert max(w.table_row for lnch in lanes.launches for w in lnch.work) < core.config.table_rows


class DecodeOrder(Policy):
    """Prefill first; decodes the view's decoding requests in the order `arrange` gives."""

    def __init__(self, arrange):
        super().__init__(PolicyContext(chunked_prefill_size=8192))
        self.arrange = arrange

    def plan(self, view):
        if not view.all_idle:
            return None
        prefills = select_prefills(view, 8192)
        if prefills:
            return StepPlan(aggregated=LaneBatch(prefill=prefills))
        rids = self.arrange([r.rid for r in view.decoding])
        return self.decode_plan(rids) if rids else None

    def decode_plan(self, rids):
        return StepPlan(aggregated=LaneBatch(decode=rids))


@pytest.mark.parametrize("arrange", [lambda rids: rids, lambda rids: rids[::-1], lambda rids: rids[: max(1, len(rids) // 2)]],
                         ids=["whole-view", "reversed", "half"])
def test_decodes_planned_in_any_order_or_subset_are_token_exact(arrange):
    """A plan that decodes the whole view in order skips the per-request readiness check (issue #14);
    reordered or partial plans take the checked path: the same tokens either way."""
    core, lanes = make(policy=DecodeOrder(arrange))
    for i in range(6):
        core.add_request(f"r{i}", prompt(i, 5 + i), SamplingParams(max_new_tokens=4 + i))
    out, reasons = outputs(lanes.run())
    assert out == {f"r{i}": reference_tokens(prompt(i, 5 + i), 4 + i) for i in range(6)}
    assert all(r["type"] == "length" for r in reasons.values()) and core.kv_free == core.allocator.capacity


def test_a_decode_that_is_not_ready_is_refused():
    core, lanes = make(policy=DecodeOrder(lambda rids: rids + ["r1"]))  # r1 is still waiting (max running 1)
    core.config.max_running_requests = 1
    core.add_request("r0", prompt(0, 5), SamplingParams(max_new_tokens=3))
    core.add_request("r1", prompt(1, 5), SamplingParams(max_new_tokens=3))
    lanes.submit(core.schedule()[0])  # r0's prefill
    with pytest.raises(RuntimeError, match="not ready to decode"):
        lanes.run()


def test_a_decode_planned_on_two_lanes_is_refused():
    """The whole-view fast path holds for the first lane only while no earlier lane of the plan took
    one of the view's decoding requests: planned twice, the second is refused as before."""

    class Twice(DecodeOrder):
        def decode_plan(self, rids):
            return StepPlan(prefill_lane=LaneBatch(decode=rids), decode_lane=LaneBatch(decode=rids), prefill_sms=1,
                            decode_sms=1)

    core, lanes = make(policy=Twice(lambda rids: rids))
    core.add_request("r0", prompt(0, 5), SamplingParams(max_new_tokens=3))
    lanes.submit(core.schedule()[0])
    with pytest.raises(RuntimeError, match="not ready to decode"):
        lanes.run()
