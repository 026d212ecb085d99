"""The built-in policies on crafted queues, and a user's policy file."""
from __future__ import annotations

import os

import pytest

from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, PrefillChunk, ReqWork
from sglang_duet.core.request import ReqState, Request
from sglang_duet.core.scheduler_core import ALL_LANES, CoreConfig, SchedulerCore, SchedulerView
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.policies.base import (
    PolicyContext, batch_shape, load_policy, steps_ms, useful_decode_tokens,
)
from sglang_duet.sampling_params import SamplingParams

from fake_lanes import FakeLanes, reference_tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CM = CostModel.load("qwen3-8b", "h100")
CTX_LEN = 40960


def ctx(budget=8192, slo=100.0, **options):
    return PolicyContext(chunked_prefill_size=budget, tbt_slo_ms=slo, cost_model=CM, hardware=CM.hw, options=options)


def waiting(rid, n):
    return Request(rid, [7] * n, SamplingParams(max_new_tokens=200), arrival_time=0.0, seed=0)


def decoding(rid, context, out=10, max_new=200, now=0.0):
    r = Request(rid, [7] * (context - out + 1), SamplingParams(max_new_tokens=max_new), arrival_time=0.0, seed=0)
    r.output_ids = [5] * out
    r.state = ReqState.RUNNING
    r.num_computed = r.seq_len - 1
    r.last_token_time = now
    return r


def view(wait=(), dec=(), pre=(), idle=ALL_LANES, inflight=None, kv_free=300_000, now=0.0, budget=8192):
    return SchedulerView(
        now=now, waiting=list(wait), prefilling=list(pre), decoding=list(dec), inflight=inflight or {},
        idle_lanes=frozenset(idle), kv_free=kv_free, kv_total=350_000,
        num_running=len(dec) + len(pre), config=CoreConfig(kv_slots=350_001, context_length=CTX_LEN,
                                                           chunked_prefill_size=budget),
    )


# ---- chunked ---------------------------------------------------------------------------------


def test_chunked_is_decode_first_within_budget():
    pol = load_policy("chunked", ctx(budget=512))
    decs = [decoding(f"d{i}", 1000 + i) for i in range(40)]
    p = pol.plan(view(wait=[waiting("a", 300), waiting("b", 900)], dec=decs, budget=512))
    b = p.aggregated
    assert p.mode == "aggregated" and b.decode == [r.rid for r in decs]
    assert [(c.rid, c.length) for c in b.prefill] == [("a", 300), ("b", 512 - 40 - 300)]
    assert b.num_tokens == 512
    assert p.predicted_ms["aggregated"] == pytest.approx(CM.batch_time(batch_shape(view(dec=decs), b)) * 1e3)
    # More decodes than the budget: decodes only, all of them (nobody's stream stalls).
    many = [decoding(f"m{i}", 100) for i in range(600)]
    p = pol.plan(view(wait=[waiting("a", 300)], dec=many, budget=512))
    assert len(p.aggregated.decode) == 600 and not p.aggregated.prefill
    assert pol.plan(view(dec=decs, idle={LaneKind.PREFILL})) is None  # aggregated needs both lanes


def test_chunked_surges_while_more_requests_wait_than_decode():
    """surge_tokens: the budget protects running streams; while more requests wait for their first token
    (waiting or mid-prefill) than decode, a step may prefill surge_tokens; otherwise the budget holds."""
    pol = load_policy("chunked", ctx(budget=64, surge_tokens=2048))
    decs = [decoding(f"d{i}", 500) for i in range(2)]
    prompts = [waiting(r, 300) for r in "abc"]
    b = pol.plan(view(wait=prompts, dec=decs, budget=64)).aggregated
    assert b.decode == ["d0", "d1"] and [(c.rid, c.length) for c in b.prefill] == [("a", 300), ("b", 300), ("c", 300)]
    # as many waiting as decoding: the budget (64 tokens, two of them the decodes')
    b = pol.plan(view(wait=prompts[:2], dec=decs, budget=64)).aggregated
    assert [(c.rid, c.length) for c in b.prefill] == [("a", 62)]
    # a request mid-prefill counts as waiting for its first token
    mid = waiting("m", 300)
    mid.state, mid.num_computed = ReqState.RUNNING, 62
    b = pol.plan(view(wait=prompts[:2], pre=[mid], dec=decs, budget=64)).aggregated
    assert [(c.rid, c.length) for c in b.prefill] == [("m", 238), ("a", 300), ("b", 300)]
    # capped at surge_tokens: the last prompt taken is chunked there
    b = pol.plan(view(wait=[waiting(r, 1500) for r in "xyz"], dec=decs, budget=64)).aggregated
    assert b.num_tokens == 2048 and [(c.rid, c.length) for c in b.prefill] == [("x", 1500), ("y", 546)]
    # off by default (an A/B's chunked baseline is the plain one), and never negative
    plain = load_policy("chunked", ctx(budget=64))
    assert plain.surge_tokens == 0
    assert plain.plan(view(wait=prompts, budget=64)).aggregated.num_tokens == 64
    with pytest.raises(ValueError, match="surge_tokens"):
        load_policy("chunked", ctx(surge_tokens=-1))


# ---- duet-paper (the DuetServe rule as the paper states it; the new duet: tests/test_duet_policy.py) ----


def chunked_pred_ms(v, budget=8192):
    b = load_policy("chunked", ctx(budget=budget)).plan(v).aggregated
    return CM.batch_time(batch_shape(v, b)) * 1e3


def test_duet_paper_splits_exactly_when_prediction_exceeds_slo():
    v = view(wait=[waiting("long", 6000)], dec=[decoding(f"d{i}", 2000) for i in range(32)])
    pred = chunked_pred_ms(v)
    assert 100 < pred < 200  # a 6k-token chunk plus 32 decodes: over a 100 ms SLO on an H100
    above = load_policy("duet-paper", ctx(slo=pred * 1.001)).plan(v)
    assert above.mode == "aggregated" and above.predicted_ms["aggregated"] == pytest.approx(pred)
    below = load_policy("duet-paper", ctx(slo=pred * 0.999)).plan(v)
    assert below.mode == "split"
    assert [c.rid for c in below.prefill_lane.prefill] == ["long"] and len(below.decode_lane.decode) == 32
    assert below.prefill_sms + below.decode_sms == CM.hw.total_sms
    assert set(below.predicted_ms) == {"prefill", "decode"} and "split" in below.reason
    # Nothing to protect (no decodes) or nothing to split off (no prefill): aggregated, however long.
    assert load_policy("duet-paper", ctx(slo=10)).plan(view(wait=[waiting("x", 8000)])).mode == "aggregated"


def brute_force(pol, dshape, remaining, pshape, cap, limit):
    """Every (S_d, k) with all steps within `limit`, scored by the objective."""
    p_tokens = sum(q for q, _ in pshape)
    out = []
    for sd in CM.hw.partition_grid():
        first, slope = pol.lat.decode_curve(dshape, sd)
        tp = pol.lat.step_ms(pshape, CM.hw.total_sms - sd)
        for k in range(1, cap + 1):
            total, last = steps_ms(first, slope, k)
            if last <= limit:
                out.append(((useful_decode_tokens(remaining, k) + p_tokens) / max(total, tp), sd, k))
    return out


@pytest.mark.parametrize("n_dec,ctx_len,prompt,rem", [
    (32, 2000, 6000, 200),  # prefill-bound: k fills the prefill time
    (160, 2000, 6000, 200),  # a large decode batch: needs more SMs to meet the SLO
    (64, 1500, 8000, [3] * 20 + [200] * 44),  # some decodes finish after 3 steps: useful tokens
])
def test_duet_paper_split_choice_maximises_objective(n_dec, ctx_len, prompt, rem):
    pol = load_policy("duet-paper", ctx(join_guard=False))
    rem = [rem] * n_dec if isinstance(rem, int) else rem
    decs = [decoding(f"d{i}", ctx_len, out=10, max_new=10 + m) for i, m in enumerate(rem)]
    v = view(wait=[waiting("p", prompt)], dec=decs)
    plan = pol.plan(v)
    assert plan.mode == "split"
    dshape = [(1, r.num_computed) for r in decs]
    pshape = [(c.length, c.start) for c in plan.prefill_lane.prefill]
    cands = brute_force(pol, dshape, rem, pshape, pol.k_max, 100.0)
    best = max(c[0] for c in cands)
    sd, k = plan.decode_sms, plan.decode_lane.steps
    got = next(c[0] for c in cands if c[1:] == (sd, k))
    assert got == pytest.approx(best, rel=1e-9)
    # ties go to the fewest decode SMs, then the smallest k
    assert (sd, k) == min(c[1:] for c in cands if c[0] >= best * (1 - 1e-9))
    first, slope = pol.lat.decode_curve(dshape, sd)
    assert steps_ms(first, slope, k)[1] <= 100.0
    assert plan.predicted_ms["decode"] == pytest.approx(steps_ms(first, slope, k)[0])


def test_duet_paper_prefill_bound_split_uses_smallest_feasible_decode_partition():
    pol = load_policy("duet-paper", ctx(join_guard=False))
    decs = [decoding(f"d{i}", 4000) for i in range(96)]
    plan = pol.plan(view(wait=[waiting("p", 7000)], dec=decs))
    dshape = [(1, r.num_computed) for r in decs]
    feasible = [sd for sd in CM.hw.partition_grid() if pol.lat.step_ms(dshape, sd) <= 100.0]
    assert feasible[0] > CM.hw.partition_grid()[0]  # the smallest partitions are too slow for this batch
    assert plan.decode_sms == feasible[0]


def test_duet_paper_join_guard_halves_the_step_limit_when_requests_join():
    decs = [decoding(f"d{i}", 3000) for i in range(128)]
    v = view(wait=[waiting("p", 5000)], dec=decs)
    guarded = load_policy("duet-paper", ctx()).plan(v)  # "p" finishes its prefill in this split: it joins
    plain = load_policy("duet-paper", ctx(join_guard=False)).plan(v)
    assert guarded.decode_sms > plain.decode_sms
    dshape = [(1, r.num_computed) for r in decs]
    assert CM.batch_time(dshape, guarded.decode_sms) * 1e3 <= 50.0


def launch(lane, batch, sms, pred):
    work = [ReqWork(rid, [1], 0, [], True, batch.steps) for rid in batch.decode]
    work += [ReqWork(c.rid, [1] * c.length, c.start, [], False) for c in batch.prefill]
    return Launch(0, lane, batch, work, sms=sms, predicted_ms={lane.value: pred})


def test_duet_paper_single_idle_lane_keeps_the_partition():
    pol = load_policy("duet-paper", ctx())
    decs = [decoding(f"d{i}", 2000, now=1.0) for i in range(16)]
    busy_p = launch(LaneKind.PREFILL, LaneBatch(prefill=[PrefillChunk("x", 0, 8000)]), 112, 60.0)
    p = pol.plan(view(dec=decs, idle={LaneKind.DECODE}, inflight={LaneKind.PREFILL: busy_p}, now=1.0))
    assert p.aggregated is None and p.prefill_lane is None and p.decode_sms == 132 - 112
    first, slope = pol.lat.decode_curve([(1, r.num_computed) for r in decs], 20)
    k = p.decode_lane.steps  # as many steps as end before the prefill does
    assert k >= 2 and steps_ms(first, slope, k)[0] <= 60.0 < steps_ms(first, slope, k + 1)[0]
    # the prefill ends within one step: the decode lane waits for a joint re-plan
    busy_p.predicted_ms = {"prefill": first / 2}
    assert pol.plan(view(dec=decs, idle={LaneKind.DECODE}, inflight={LaneKind.PREFILL: busy_p}, now=1.0)) is None
    # prefill lane idle while the decode lane runs: the next chunk on the SMs the decode lane leaves
    busy_d = launch(LaneKind.DECODE, LaneBatch(decode=[r.rid for r in decs], steps=4), 24, 80.0)
    p = pol.plan(view(wait=[waiting("y", 3000)], idle={LaneKind.PREFILL}, inflight={LaneKind.DECODE: busy_d}))
    assert p.decode_lane is None and p.prefill_sms == 132 - 24
    assert [(c.rid, c.length) for c in p.prefill_lane.prefill] == [("y", 3000)]


def test_duet_paper_decode_sms_grid_restricts_the_search():
    decs = [decoding(f"d{i}", 4000) for i in range(96)]
    v = view(wait=[waiting("p", 7000)], dec=decs)
    full = load_policy("duet-paper", ctx(join_guard=False))
    assert full.grid == CM.hw.partition_grid()  # default: the hardware's whole grid
    free = full.plan(v)
    assert free.mode == "split"
    # Only sizes above the unrestricted choice: the search must take the smallest feasible of them.
    allowed = [s for s in CM.hw.partition_grid() if s > free.decode_sms][:3]
    for value in (allowed, ",".join(map(str, allowed)), " , ".join(map(str, reversed(allowed)))):
        pol = load_policy("duet-paper", ctx(join_guard=False, decode_sms_grid=value))
        assert pol.grid == allowed
        p = pol.plan(v)
        assert p.mode == "split" and p.decode_sms == allowed[0]
        assert p.prefill_sms == CM.hw.total_sms - allowed[0]
    # the one-lane re-plans stay on the restricted grid too
    pol = load_policy("duet-paper", ctx(decode_sms_grid="48"))
    busy_d = launch(LaneKind.DECODE, LaneBatch(decode=["z"], steps=1), None, 5.0)
    p = pol.plan(view(wait=[waiting("y", 300)], idle={LaneKind.PREFILL}, inflight={LaneKind.DECODE: busy_d}))
    assert p.prefill_sms == CM.hw.total_sms - 48
    for bad, what in ((36, r"\[36\]"), ("16,36,200", r"\[36, 200\]"), ("", "at least one"), ("a,b", "comma string"),
                      ([16.5], "comma string"), ([True], "comma string")):
        with pytest.raises(ValueError, match=r"decode_sms_grid.*" + what):
            load_policy("duet-paper", ctx(decode_sms_grid=bad))


def test_duet_paper_needs_a_cost_model():
    with pytest.raises(ValueError, match="--hardware.*--model-config"):
        load_policy("duet-paper", PolicyContext())


@pytest.mark.parametrize("name,options", [("duet-paper", {"join_guard": False}),
                                          ("duet", {"slo_margin": 1.0, "calibrate": 0, "budgets": [4096]})])
def test_duet_runs_requests_to_completion_with_correct_tokens(name, options):
    # A 7 ms SLO on an H100: a 1024-token chunk plus decodes must split, decodes alone do not.
    # (duet would rather run small mixed chunks on all SMs with these few decodes; with only a
    # 4096-token aggregated budget it has to split too.)
    pol = load_policy(name, ctx(budget=1024, slo=7.0, **options))
    core = SchedulerCore(CoreConfig(kv_slots=8192, context_length=8192, chunked_prefill_size=1024), pol,
                         clock=lambda: lanes.clock())
    lanes = FakeLanes(core, 8192, prefill_ms=0.05, decode_ms=6.5)  # roughly the roofline's timings
    prompts = [[3 + (i * 5 + j) % 80 for j in range(20 + 300 * i)] for i in range(6)]
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, SamplingParams(max_new_tokens=15 + i))
    out = {}
    for u in lanes.run():
        out.setdefault(u.rid, []).extend(u.new_token_ids)
    for i, p in enumerate(prompts):
        assert out[f"r{i}"] == reference_tokens(p, 15 + i)
    assert core.stats.plans["split"] > 0 and core.stats.plans["aggregated"] > 0
    assert any(l.batch.steps > 1 for l in lanes.launches)
    assert core.allocator.available == core.allocator.capacity


# ---- static split ------------------------------------------------------------------------------


def test_static_split_fixed_partitions():
    pol = load_policy("static-split", ctx(budget=2048))
    decs = [decoding(f"d{i}", 500) for i in range(8)]
    p = pol.plan(view(wait=[waiting("a", 5000)], dec=decs))
    assert (p.decode_sms, p.prefill_sms) == (32, 100) and p.decode_lane.steps == 1
    assert p.prefill_lane.prefill_tokens == 2048 and p.decode_lane.decode == [r.rid for r in decs]
    assert set(p.predicted_ms) == {"prefill", "decode"}
    p = load_policy("static-split", ctx(decode_sms=48, lookahead=4)).plan(view(dec=decs, idle={LaneKind.DECODE}))
    assert (p.decode_sms, p.decode_lane.steps, p.prefill_lane) == (48, 4, None)
    with pytest.raises(ValueError, match="decode_sms=36"):
        load_policy("static-split", ctx(decode_sms=36))
    with pytest.raises(ValueError, match="--hardware"):
        load_policy("static-split", PolicyContext())


# ---- a user's policy file ----------------------------------------------------------------------


def test_user_policy_file_loads_and_runs():
    path = os.path.join(REPO, "examples", "policies", "shortest_first.py")
    pol = load_policy(path, PolicyContext(chunked_prefill_size=64))
    assert pol.name == "shortest-first"
    p = pol.plan(view(wait=[waiting("long", 50), waiting("short", 5)], budget=64))
    assert [(c.rid, c.length) for c in p.aggregated.prefill] == [("short", 5), ("long", 50)]
    core = SchedulerCore(CoreConfig(kv_slots=2048, context_length=2048, chunked_prefill_size=64), pol,
                         clock=lambda: lanes.clock())
    lanes = FakeLanes(core, 2048)
    for i, n in enumerate([90, 4, 30]):
        core.add_request(f"r{i}", [3 + j % 50 for j in range(n)], SamplingParams(max_new_tokens=6))
    finished = {u.rid for u in lanes.run() if u.finished}
    assert finished == {"r0", "r1", "r2"}
    first = lanes.launches[0].batch.prefill
    assert first[0].rid == "r1"  # the 4-token prompt went first


def test_user_policy_file_may_define_dataclasses(tmp_path):
    # A policy file is executed as a module: dataclasses look their module up in sys.modules while
    # the class is built, so an unregistered module made every such file fail to load.
    path = tmp_path / "with_dataclass.py"
    path.write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "from sglang_duet.policies.base import Policy, chunked_batch\n"
        "from sglang_duet.core.plan import StepPlan\n\n"
        "@dataclass\nclass Knobs:\n    budget: int = 64\n\n"
        "class WithDataclass(Policy):\n    name = 'with-dataclass'\n"
        "    def plan(self, view):\n"
        "        return StepPlan(aggregated=chunked_batch(view, Knobs().budget))\n")
    pol = load_policy(str(path), PolicyContext(chunked_prefill_size=64))
    assert pol.name == "with-dataclass"
    p = pol.plan(view(wait=[waiting("a", 100)], budget=64))
    assert [(c.rid, c.length) for c in p.aggregated.prefill] == [("a", 64)]
