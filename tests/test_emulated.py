"""The emulated GPU: launch timing from the roofline, k-step token times, HBM contention, clocks,
and EngineCore with --executor emulated."""
from __future__ import annotations

import time

import pytest

from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, PrefillChunk, ReqWork
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.executor.emulated import EmulatedExecutor, token_id
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


def test_k_step_decode_reports_each_token_at_its_step():
    ex = EmulatedExecutor(CM, clock_mode="virtual")
    ex.submit(decode_launch(0, [1000, 3000], steps=4, lane=LaneKind.DECODE, sms=32))
    (res,) = ex.poll()
    steps = [CM.batch_time([(1, 1000 + j), (1, 3000 + j)], 32) for j in range(4)]
    times = res.token_times["d0-0"]
    assert len(res.tokens["d0-0"]) == 4 and times == res.token_times["d0-1"]
    for j in range(4):
        assert times[j] == pytest.approx(sum(steps[: j + 1]))
    assert res.finished_at == pytest.approx(sum(steps))
    # position of token j is start + 1 + j: the same ids whatever the launch shape
    assert res.tokens["d0-1"][2] == token_id(1, 3000 + 1 + 2, 0, CM.model.vocab_size)


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


def test_wall_clock_poll_sleeps_until_completion_or_timeout():
    ex = EmulatedExecutor(CM, clock_mode="wall", time_scale=0.2)  # a ~40 ms launch in ~8 ms
    t0 = time.monotonic()
    ex.submit(prefill_launch(0, 2048))
    assert ex.poll(timeout=0) == []
    (res,) = ex.poll(timeout=5)
    waited = time.monotonic() - t0
    expect = CM.batch_time([(2048, 0)]) * 0.2
    assert res.finished_at - res.started_at == pytest.approx(expect)
    assert expect * 0.9 <= waited < expect + 0.5


def test_engine_with_emulated_executor_serves_text_and_splits():
    from sglang_duet.engine import Engine

    # duet with a 6k-token prompt arriving while others decode: the plan must split
    eng = Engine(policy="duet", executor="emulated", chunked_prefill_size=8192, tbt_slo_ms=100.0,
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
