"""The emulated GPU: launch timing from the roofline, per-step release of k-step tokens, HBM
contention, clocks, the truth model apart from the policy's belief, and EngineCore with
--executor emulated. No test here depends on how fast the machine is."""
from __future__ import annotations

import dataclasses

import pytest

from sglang_duet.core.plan import NO_TOKEN, LaneBatch, LaneKind, Launch, PrefillChunk, ReqWork
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.cost_model.truth import TruthConfig
from sglang_duet.executor.emulated import VECTOR_ROWS, EmulatedExecutor, token_id, token_ids
from sglang_duet.sampling_params import SamplingParams

CM = CostModel.load("qwen3-8b", "h100")


def prefill_launch(lid, n, lane=LaneKind.AGGREGATED, sms=None, start=0):
    w = ReqWork(f"p{lid}", [7] * n, start, [], True, sampling_seed=lid)
    return Launch(lid, lane, LaneBatch(prefill=[PrefillChunk(w.rid, start, n)]), [w], sms=sms)


def decode_launch(lid, ctxs, steps=1, lane=LaneKind.AGGREGATED, sms=None):
    work = [ReqWork(f"d{lid}-{i}", [5], c, [], True, steps, sampling_seed=i) for i, c in enumerate(ctxs)]
    return Launch(lid, lane, LaneBatch(decode=[w.rid for w in work], steps=steps), work, sms=sms)


def test_token_ids_are_deterministic_in_range_and_never_banned():
    ids = [token_id(3, p, 17, 120, frozenset({50, 51})) for p in range(2000)]
    assert ids == [token_id(3, p, 17, 120, frozenset({50, 51})) for p in range(2000)]
    assert all(17 <= t < 120 and t not in (50, 51) for t in ids)
    assert len(set(ids)) > 90 and ids != [token_id(4, p, 17, 120) for p in range(2000)]


def test_vectorised_token_ids_equal_token_id_row_for_row():
    """A launch's ids are hashed in one numpy pass (issue #14): the same ids as token_id, for seeds
    of any size and sign and with banned ids (a dense ban list moves ids on more than once)."""
    import random

    rng = random.Random(7)
    for _ in range(100):
        n = rng.randrange(1, 300)
        seeds = [rng.choice([rng.randrange(2 ** 64), rng.randrange(-2 ** 70, 2 ** 70), rng.randrange(1000)]) for _ in range(n)]
        pos = [rng.randrange(100_000) for _ in range(n)]
        lo = rng.randrange(200)
        hi = lo + rng.randrange(2, 50_000)
        banned = frozenset(rng.randrange(lo, hi) for _ in range(rng.randrange(5)))
        assert token_ids(seeds, pos, lo, hi, banned) == [token_id(s, p, lo, hi, banned) for s, p in zip(seeds, pos)]
    big = [rng.randrange(2 ** 64) for _ in range(2000)]  # large batches find banned ids with numpy
    for banned in (frozenset({150, 151}), frozenset({-3, 150}), frozenset(range(100, 190))):
        assert token_ids(big, range(2000), 100, 200, banned) == [token_id(s, p, 100, 200, banned) for s, p in zip(big, range(2000))]
    dense = frozenset({0, 1, 2, 3})
    assert token_ids(range(50), range(50), 0, 5, dense) == [token_id(s, p, 0, 5, dense) for s, p in zip(range(50), range(50))]


@pytest.mark.parametrize("batch", [3, VECTOR_ROWS + 5])  # the per-row and the numpy path
def test_a_step_is_reported_row_by_row_with_the_same_tokens(batch):
    ex = EmulatedExecutor(CM, clock_mode="virtual", token_range=(10, 500), banned_tokens={11, 12})
    launch = decode_launch(0, [100 + i for i in range(batch)], steps=2)
    launch.work[1].sample = False  # a row that samples nothing gets no token
    ex.submit(launch)
    parts = ex.poll() + ex.poll()
    assert [p.final for p in parts] == [False, True]
    for j, p in enumerate(parts):
        want = {w.rid: [token_id(w.sampling_seed, w.start_pos + 1 + j, 10, 500, frozenset({11, 12}))]
                for w in launch.work if w.sample}
        assert p.rows == [want[w.rid][0] if w.sample else NO_TOKEN for w in launch.work]
        assert p.tokens == want and p.token_times == {rid: [p.finished_at] for rid in want}


def test_launch_takes_the_roofline_time_on_its_lane():
    ex = EmulatedExecutor(CM, clock_mode="virtual")
    ex.submit(prefill_launch(0, 4096))
    (res,) = ex.poll()  # virtual: a blocking poll jumps the clock to the completion
    assert res.finished_at - res.started_at == pytest.approx(CM.batch_time([(4096, 0)]))
    assert ex.now() == pytest.approx(res.finished_at)
    ex2 = EmulatedExecutor(CM, clock_mode="virtual", contention="none")
    ex2.submit(prefill_launch(1, 4096, LaneKind.PREFILL, sms=64))
    (res,) = ex2.poll()
    assert res.finished_at - res.started_at == pytest.approx(CM.batch_time([(4096, 0)], 64))


def drain(ex):
    """Every result part until the executor is idle, in the order poll returned them."""
    parts = []
    while ex.busy():
        parts.extend(ex.poll())
    return parts


def test_k_step_decode_releases_each_step_at_its_end():
    ex = EmulatedExecutor(CM, clock_mode="virtual")
    ex.submit(decode_launch(0, [1000, 3000], steps=4, lane=LaneKind.DECODE, sms=32))
    steps = [CM.batch_time([(1, 1000 + j), (1, 3000 + j)], 32) for j in range(4)]
    ends = [sum(steps[: j + 1]) for j in range(4)]
    parts = []
    for j in range(4):
        # a step boundary is an event: the virtual clock stops there
        assert ex.next_completion() == pytest.approx(ends[j])
        (res,) = ex.poll()  # a blocking poll jumps to the next boundary and returns that step's part
        assert ex.now() == pytest.approx(ends[j]) and res.finished_at == pytest.approx(ends[j])
        assert res.final == (j == 3) and res.started_at == 0.0
        # step j's tokens, visible at step j's end (the host sees them then), one per request
        assert res.token_times == {"d0-0": [res.finished_at], "d0-1": [res.finished_at]}
        parts.append(res)
    assert not ex.busy() and ex.next_completion() is None
    toks = [p.tokens["d0-1"][0] for p in parts]
    # position of token j is start + 1 + j: the same ids whatever the launch shape
    assert toks == [token_id(1, 3000 + 1 + j, 0, CM.model.vocab_size) for j in range(4)]


def test_one_step_launch_is_one_final_result():
    ex = EmulatedExecutor(CM, clock_mode="virtual")
    ex.submit(decode_launch(0, [500, 700, 900]))
    (res,) = drain(ex)
    assert res.final and set(res.tokens) == {"d0-0", "d0-1", "d0-2"}
    assert res.finished_at == pytest.approx(CM.batch_time([(1, 500), (1, 700), (1, 900)]))


def test_a_step_part_is_released_while_the_other_lane_runs():
    """Parts of two lanes interleave in time order; a request's tokens never wait for its launch's end."""
    ex = EmulatedExecutor(CM, clock_mode="virtual", contention="none")
    ex.submit(prefill_launch(0, 8192, LaneKind.PREFILL, sms=100))
    ex.submit(decode_launch(1, [1000] * 8, steps=3, lane=LaneKind.DECODE, sms=32))
    parts = drain(ex)
    times = [p.finished_at for p in parts]
    assert times == sorted(times)
    assert [(p.launch_id, p.final) for p in parts] == [(1, False), (1, False), (1, True), (0, True)]


def test_k_step_parts_leave_the_requests_ready_to_decode():
    """Core + emulator: after a k-step launch reported in parts, its requests decode on (no re-prefill)."""
    from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
    from fake_lanes import SplitAlways

    ex = EmulatedExecutor(CM, clock_mode="virtual")
    core = SchedulerCore(CoreConfig(kv_slots=20_000, context_length=8192),
                         SplitAlways(prefill_budget=512, steps=4, prefill_sms=100, decode_sms=32), clock=ex.now)
    for i in range(3):
        core.add_request(f"r{i}", [7] * (100 + i), SamplingParams(max_new_tokens=30, ignore_eos=True))
    prefilled = []
    orig = core._resolve_prefill

    def resolve_prefill(chunk, *args):
        prefilled.append((chunk.rid, chunk.start, chunk.length))
        return orig(chunk, *args)

    core._resolve_prefill = resolve_prefill
    got: dict[str, list[float]] = {}
    while core.has_unfinished():
        for launch in core.schedule():
            ex.submit(launch)
        for res in ex.poll():
            for u in core.apply_result(res):
                got.setdefault(u.rid, []).extend(res.token_times.get(u.rid, [])[: len(u.new_token_ids)])
    assert sorted(prefilled) == [("r0", 0, 100), ("r1", 0, 101), ("r2", 0, 102)], "a request was re-prefilled"
    assert all(len(t) == 30 and t == sorted(t) for t in got.values())


def test_overlapping_lanes_share_hbm_bandwidth():
    def run(contention):
        ex = EmulatedExecutor(CM, clock_mode="virtual", contention=contention)
        # two memory-bound decode launches on a 64/68 split: together they want more than the HBM gives
        ex.submit(decode_launch(0, [4000] * 64, lane=LaneKind.DECODE, sms=64))
        ex.submit(decode_launch(1, [4000] * 64, lane=LaneKind.PREFILL, sms=68))
        out = {}
        while ex.busy():
            for r in ex.poll():
                out[r.launch_id] = r.finished_at - r.started_at
        return out

    alone, shared = run("none"), run("bandwidth")
    assert alone[0] == pytest.approx(CM.batch_time([(1, 4000)] * 64, 64))
    assert shared[0] > alone[0] * 1.3 and shared[1] > alone[1] * 1.3
    # a compute-bound prefill barely notices a small decode lane beside it
    ex = EmulatedExecutor(CM, clock_mode="virtual")
    ex.submit(prefill_launch(0, 8192, LaneKind.PREFILL, sms=100))
    ex.submit(decode_launch(1, [1000] * 16, lane=LaneKind.DECODE, sms=32))
    res = {}
    while ex.busy():
        res.update({r.launch_id: r.finished_at - r.started_at for r in ex.poll()})
    assert res[0] == pytest.approx(CM.batch_time([(8192, 0)], 100), rel=0.02)


def durations(ex, launches):
    """Run launches one after another; each one's (end - start) from its final part."""
    out = []
    for launch in launches:
        ex.submit(launch)
        out.append(next(p.finished_at - p.started_at for p in drain(ex) if p.final))
    return out


def mixed_launch(lid, lane=LaneKind.AGGREGATED, sms=None):
    p = ReqWork(f"m{lid}", [7] * 3000, 0, [], True, sampling_seed=lid)
    ds = [ReqWork(f"m{lid}-{i}", [5], 1500 + 50 * i, [], True, sampling_seed=i) for i in range(40)]
    return Launch(lid, lane, LaneBatch(prefill=[PrefillChunk(p.rid, 0, 3000)], decode=[w.rid for w in ds]),
                  [p] + ds, sms=sms)


def truth_launches():
    return [prefill_launch(0, 4096), decode_launch(1, [1000, 3000, 50], steps=5, lane=LaneKind.DECODE, sms=32),
            mixed_launch(2), mixed_launch(3, LaneKind.PREFILL, sms=100), decode_launch(4, [2000] * 128, sms=None)]


def belief_s(launch):
    sms = None if launch.lane == LaneKind.AGGREGATED else launch.sms
    steps = max(w.steps for w in launch.work)
    return sum(CM.batch_time([(len(w.input_ids), w.start_pos) if j == 0 else (1, w.start_pos + j)
                              for w in launch.work if w.steps > j], sms) for j in range(steps))


def test_exact_truth_is_the_belief():
    ex = EmulatedExecutor(CM, clock_mode="virtual", truth=TruthConfig.exact(contention="none"))
    got = durations(ex, truth_launches())
    assert got == [pytest.approx(belief_s(la), rel=1e-9) for la in truth_launches()]


def test_truth_adds_host_time_per_step_and_a_switch_cost():
    t = dataclasses.replace(TruthConfig.exact(contention="none"), host_base_s=100e-6, host_per_req_s=10e-6,
                            switch_s=30e-6)
    ex = EmulatedExecutor(CM, clock_mode="virtual", truth=t)
    k = decode_launch(0, [1000] * 8, steps=3, lane=LaneKind.DECODE, sms=32)
    (d,) = durations(ex, [k])
    assert d == pytest.approx(belief_s(k) + 3 * (100e-6 + 8 * 10e-6), rel=1e-9)  # first split: no switch
    same = decode_launch(1, [1000] * 8, lane=LaneKind.DECODE, sms=32)
    other = decode_launch(2, [1000] * 8, lane=LaneKind.DECODE, sms=48)
    agg = decode_launch(3, [1000] * 8)
    host = 100e-6 + 8 * 10e-6
    assert durations(ex, [same, other, agg]) == [
        pytest.approx(belief_s(same) + host, rel=1e-9),
        pytest.approx(belief_s(other) + host + 30e-6, rel=1e-9),  # the lane's SM count changed
        pytest.approx(belief_s(agg) + host, rel=1e-9)]  # aggregated launches switch nothing
    assert ex.truth_stats["switches"] == 1


def test_truth_noise_is_seeded_and_mean_one():
    def run(seed, n=400):
        ex = EmulatedExecutor(CM, clock_mode="virtual", truth=dataclasses.replace(
            TruthConfig.exact(contention="none"), noise_sigma=0.05, seed=seed))
        la = [decode_launch(i, [1000] * 4) for i in range(n)]
        return [d / belief_s(la[0]) for d in durations(ex, la)]

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    mean = sum(a) / len(a)
    sd = (sum((x - mean) ** 2 for x in a) / len(a)) ** 0.5
    assert abs(mean - 1) < 0.015 and 0.04 < sd < 0.06


def test_perturbed_truth_moves_launch_times_by_the_perturbation():
    f = 0.85
    ex = EmulatedExecutor(CM, clock_mode="virtual", truth=TruthConfig.exact(contention="none", perturb=(f, f)))
    for la, got in zip(truth_launches(), durations(ex, truth_launches())):
        sms = None if la.lane == LaneKind.AGGREGATED else la.sms
        steps = max(w.steps for w in la.work)
        ovh = sum(o.kernels for j in range(steps) for o in CM.breakdown(
            [(len(w.input_ids), w.start_pos) if j == 0 else (1, w.start_pos + j) for w in la.work if w.steps > j],
            sms)) * CM.hw.launch_overhead_s
        assert got == pytest.approx(ovh + (belief_s(la) - ovh) / f, rel=1e-9)


def test_phase_contention_slows_a_decode_beside_a_prefill_more_than_the_launch_average():
    def decode_slowdown(contention):
        ex = EmulatedExecutor(CM, clock_mode="virtual", truth=TruthConfig.exact(contention=contention))
        ex.submit(prefill_launch(0, 16384, LaneKind.PREFILL, sms=100))
        dec = decode_launch(1, [2000] * 64, lane=LaneKind.DECODE, sms=32)
        ex.submit(dec)
        part = next(p for p in drain(ex) if p.launch_id == 1)
        return (part.finished_at - part.started_at) / belief_s(dec)

    none, avg, phase = decode_slowdown("none"), decode_slowdown("bandwidth"), decode_slowdown("phase")
    assert none == pytest.approx(1.0)
    # the prefill's norms, rope and activations pull the whole partition's bandwidth for a while:
    # the decode lane's memory-bound steps collide with those phases, which a launch average hides
    assert phase > avg > 1.0 - 1e-9 and phase > 1.02, (avg, phase)


def test_server_truth_defaults_on_and_can_be_turned_off(monkeypatch):
    from types import SimpleNamespace

    from sglang_duet.executor.emulated import TRUTH_ENV, server_truth

    args = SimpleNamespace(random_seed=7)
    monkeypatch.delenv(TRUTH_ENV, raising=False)
    assert server_truth(args, {}) == TruthConfig(seed=7)
    assert server_truth(args, {"emulated_truth": "off"}) == TruthConfig.exact(seed=7)
    monkeypatch.setenv(TRUTH_ENV, "noise=0,host_us=0:0")
    t = server_truth(args, {})
    assert t.noise_sigma == 0 and t.host_s(10) == 0 and t.per_request_attention and t.seed == 7


class FakeWall:
    """A wall clock that moves only when the executor sleeps: wall-mode polling without real time."""

    def __init__(self):
        self.t = 100.0
        self.sleeps: list[float] = []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def test_wall_clock_poll_wakes_at_each_step_boundary(monkeypatch):
    import sglang_duet.executor.emulated as em

    clock = FakeWall()
    monkeypatch.setattr(em.time, "sleep", clock.sleep)
    ex = EmulatedExecutor(CM, clock_mode="wall", clock=clock, time_scale=0.5)
    ex.submit(decode_launch(0, [2000] * 4, steps=3, lane=LaneKind.DECODE, sms=48))
    assert ex.poll(timeout=0) == []  # nothing due yet, and no sleeping for a zero timeout
    steps = [CM.batch_time([(1, 2000 + j)] * 4, 48) * 0.5 for j in range(3)]
    (early,) = [ex.poll(timeout=steps[0] / 2)] or [None]
    assert early == [] and clock.t == pytest.approx(100.0 + steps[0] / 2)  # the timeout, not a boundary
    for j in range(3):
        (res,) = ex.poll(timeout=10.0)  # sleeps until the next step boundary, not the launch's end
        assert res.final == (j == 2)
        assert clock.t == pytest.approx(100.0 + sum(steps[: j + 1]))
        assert res.token_times["d0-0"] == [res.finished_at] and res.finished_at == pytest.approx(clock.t)
    assert not ex.busy()


def test_wall_clock_parts_arrive_in_order():
    """The real clock: order and counts only (no assertion on seconds)."""
    ex = EmulatedExecutor(CM, clock_mode="wall", time_scale=0.05)
    ex.submit(decode_launch(0, [1000] * 2, steps=4, lane=LaneKind.DECODE, sms=32))
    ex.submit(prefill_launch(1, 1024, LaneKind.PREFILL, sms=100))
    parts = []
    while ex.busy():
        parts.extend(ex.poll(timeout=5))
    d = [p for p in parts if p.launch_id == 0]
    assert [p.final for p in d] == [False, False, False, True]
    assert [len(p.tokens["d0-0"]) for p in d] == [1, 1, 1, 1]
    assert [p.final for p in parts if p.launch_id == 1] == [True]
    times = [p.finished_at for p in parts]
    assert times == sorted(times)


def test_engine_with_emulated_executor_serves_text_and_splits():
    from sglang_duet.engine import Engine

    # the paper's DuetServe rule with a 6k-token prompt arriving while others decode: the plan must
    # split (the delivered-throughput duet chooses for itself; tests/test_policies.py covers it)
    eng = Engine(policy="duet-paper", executor="emulated", chunked_prefill_size=8192, tbt_slo_ms=100.0,
                 extra={"emulated_time_scale": 0.02})
    assert eng.core.device == "emulated:h100" and eng.core.kv_slots > 100_000
    params = SamplingParams(max_new_tokens=40)
    for i in range(8):
        eng.core.add_request(f"short{i}", eng.tokenizer.encode(f"Hello number {i}"), params)
    for _ in range(4):
        eng.core.step()
    eng.core.add_request("long", [100 + (i % 1000) for i in range(6000)], SamplingParams(max_new_tokens=4))
    outs = eng.generate(["What is the capital of France?"], {"max_new_tokens": 12})
    assert outs[0]["meta_info"]["completion_tokens"] == 12 and outs[0]["text"].strip()
    while eng.core.has_work():
        eng.core.step(timeout=1.0)
    stats = eng.core.core.stats
    assert stats.plans["split"] >= 1 and stats.launches["decode"] >= 1
    assert stats.finished == 8 + 1 + 1
    decs = list(eng.core.policy.decisions)
    assert all(d.predicted_ms is not None for d in decs)
    eng.shutdown()
