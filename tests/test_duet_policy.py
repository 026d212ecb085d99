"""The delivered-throughput duet (policies/duet.py): its pricing, its decision rules on small
synthetic views, its lane-pair states, the deadline queue order, and a simulator smoke test.
duet-paper's own tests (the DuetServe rule as stated) are in tests/test_policies.py."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest

from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, PrefillChunk, ReqWork
from sglang_duet.core.request import ReqState, Request
from sglang_duet.core.scheduler_core import ALL_LANES, CoreConfig, SchedulerView
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.policies.base import PolicyContext, Summary, SummaryPricer, deadline_order, load_policy
from sglang_duet.policies.duet import DuetPolicy, LanePair, Move
from sglang_duet.policies.duet_paper import DuetPaperPolicy
from sglang_duet.sampling_params import SamplingParams

CM = CostModel.load("qwen3-8b", "h100")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTX_LEN = 40960
M = DuetPolicy(PolicyContext(cost_model=CM, hardware=CM.hw)).margin  # the default slo_margin
TOTAL = CM.hw.total_sms


def ctx(budget=8192, slo=100.0, ttft=1000.0, **options):
    return PolicyContext(chunked_prefill_size=budget, tbt_slo_ms=slo, ttft_slo_ms=ttft, cost_model=CM, hardware=CM.hw,
                         options=options)


def waiting(rid, n, arrival=0.0):
    return Request(rid, [7] * n, SamplingParams(max_new_tokens=200), arrival_time=arrival, seed=0)


def decoding(rid, context, out=10, max_new=200, last=0.0):
    r = Request(rid, [7] * (context - out + 1), SamplingParams(max_new_tokens=max_new), arrival_time=0.0, seed=0)
    r.output_ids = [5] * out
    r.state = ReqState.RUNNING
    r.num_computed = r.seq_len - 1
    r.last_token_time = last
    return r


def view(wait=(), dec=(), pre=(), idle=ALL_LANES, inflight=None, kv_free=300_000, now=0.0, max_running=256):
    return SchedulerView(
        now=now, waiting=list(wait), prefilling=list(pre), decoding=list(dec), inflight=inflight or {},
        idle_lanes=frozenset(idle), kv_free=kv_free, kv_total=350_000, num_running=len(dec) + len(pre),
        config=CoreConfig(kv_slots=350_001, context_length=CTX_LEN, max_running_requests=max_running),
    )


def launch(lane, batch, sms, pred, work=None):
    if work is None:
        work = [ReqWork(rid, [1], 1000, [], True, batch.steps) for rid in batch.decode]
        work += [ReqWork(c.rid, [1] * c.length, c.start, [], c.length > 1000) for c in batch.prefill]
    return Launch(0, lane, batch, work, sms=sms, predicted_ms={lane.value: pred})


# ---- registration ------------------------------------------------------------------------------


def test_duet_is_the_new_policy_and_duet_paper_the_old_one():
    assert type(load_policy("duet", ctx())) is DuetPolicy
    paper = load_policy("duet-paper", ctx())
    assert type(paper) is DuetPaperPolicy and paper.name == "duet-paper"
    with pytest.raises(ValueError, match="--hardware"):
        load_policy("duet", PolicyContext())
    for bad in ({"slo_margin": 0}, {"k_max": 0}, {"ttft_order": "lifo"}, {"budgets": "a"}, {"decode_sms_grid": "36"}):
        with pytest.raises(ValueError):
            load_policy("duet", ctx(**bad))


# ---- pricing -----------------------------------------------------------------------------------


def test_summary_pricer_equals_the_cost_model():
    pricer = SummaryPricer(CM)
    assert pricer.exact
    rng = random.Random(7)
    for _ in range(30):
        shape = [(rng.choice([1, 1, rng.randint(1, 8000)]), rng.randint(0, 20000)) for _ in range(rng.randint(1, 300))]
        sms = rng.choice([None] + CM.hw.partition_grid())
        assert pricer.summary_ms(Summary.of(shape), sms) == pytest.approx(CM.batch_time(shape, sms) * 1e3, rel=1e-9)
    assert pricer.summary_ms(Summary(), 32) == 0.0  # an empty batch costs nothing


def test_priced_parts_are_the_cost_model_operators_by_bound():
    # What the calibration regresses on: per launch, the ms of its compute-bound operators and of
    # its memory-bound ones plus every kernel's launch overhead, as the cost model splits them.
    pricer = SummaryPricer(CM)
    ovh = CM.hw.launch_overhead_s
    rng = random.Random(11)
    for _ in range(20):
        shape = [(rng.choice([1, 1, rng.randint(1, 8000)]), rng.randint(0, 20000)) for _ in range(rng.randint(1, 200))]
        sms = rng.choice([None] + CM.hw.partition_grid())
        s = Summary.of(shape)
        priced = pricer.ms_prepared(np.array([[s.T, s.R, s.A, s.K]]), pricer.prepare(np.array([sms or 0])),
                                    pricer.scale_rows([(1.0, 1.0)])[0])
        comp, mem = priced.parts(0, 1, 1.0, 1.0)
        ops = CM.breakdown(shape, sms)
        want_comp = sum(o.time - o.kernels * ovh for o in ops if o.bound == "compute") * 1e3
        want_mem = sum(o.time - o.kernels * ovh for o in ops if o.bound == "memory") * 1e3 \
            + sum(o.kernels for o in ops) * ovh * 1e3
        assert comp == pytest.approx(want_comp, rel=1e-9, abs=1e-9)
        assert mem == pytest.approx(want_mem, rel=1e-9, abs=1e-9)


def test_pairwise_sum_adds_as_numpy_does():
    # The calibration parts are summed in Python (a launch's few dozen numbers); they must be the
    # very floats numpy's sum gives, or plans would drift from what the pinned fingerprints say.
    from sglang_duet.policies.pricing import pairwise_sum

    rng = np.random.default_rng(5)
    for n in list(range(0, 140)) + [255, 256, 300, 1000]:
        a = rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6, n)
        assert pairwise_sum(a.tolist()) == np.add.reduce(a)
    a = np.full(9, 0.1)
    assert pairwise_sum(a.tolist()) != sum(a.tolist())  # the order matters: a sequential sum differs


def test_search_parts_are_priced_parts_of_the_rows():
    # parts_of reads the calibration parts off the search's pricing: the same numbers as pricing
    # the launched rows alone through the cost model's operators (test above), here through
    # Priced.parts on each range.
    pol = load_policy("duet", ctx())
    decs = [decoding(f"d{i}", 1000 + 37 * i) for i in range(150)]
    s = pol.search(view(wait=[waiting("p", 7000), waiting("q", 3000)], dec=decs))
    na, nb = len(s.agg_budgets), len(s.split_budgets)
    assert nb and s.split.any()
    K = pol.k_max + 2
    for i in (0, na - 1, na, na + 4, len(s) - 1):
        got = s.parts_of(i)
        if i < na:
            assert got[LaneKind.AGGREGATED] == s.priced._parts(i, i + 1, 1.0, 1.0)
        else:
            g, b = divmod(i - na, nb)
            p, d = na + len(pol.grid) * K + g * nb + b, na + g * K
            assert got[LaneKind.PREFILL] == s.priced._parts(p, p + 1, 1.0, 1.0)
            assert got[LaneKind.DECODE] == s.priced._parts(d, d + int(s.k[i]), 1.0, 1.0)


def test_candidates_price_what_the_cost_model_says():
    pol = load_policy("duet", ctx())
    decs = [decoding(f"d{i}", 1500 + 10 * i) for i in range(40)]
    v = view(wait=[waiting("p", 5000)], dec=decs)
    cands = pol.candidates(v)
    dshape = [(1, r.num_computed) for r in decs]
    for c in cands:
        pshape = [(ch.length, ch.start) for ch in c.prefill]
        assert sum(n for n, _ in pshape) == c.prefill_tokens
        if c.mode == "aggregated":
            assert c.step_ms == pytest.approx(CM.batch_time(dshape + pshape) * 1e3, rel=1e-9)
            assert c.prefill_tokens == min(5000, c.budget - len(decs))
        else:
            assert c.step_ms == pytest.approx(CM.batch_time(pshape, TOTAL - c.decode_sms) * 1e3, rel=1e-9)
            steps = [CM.batch_time([(1, n + j) for n in (r.num_computed for r in decs)], c.decode_sms) * 1e3
                     for j in range(c.k)]
            assert c.decode_ms == pytest.approx(sum(steps), rel=1e-9)
            assert c.first_ms == pytest.approx(steps[0], rel=1e-9)


# ---- BOTH_IDLE decisions -----------------------------------------------------------------------


def test_aggregated_when_it_delivers_more():
    # A few short decodes and one prompt: the mixed batch fits the SLO with room to spare and
    # prefills faster on all SMs than any split does on its share.
    pol = load_policy("duet", ctx())
    v = view(wait=[waiting("p", 3000)], dec=[decoding(f"d{i}", 800) for i in range(8)])
    plan = pol.plan(v)
    assert plan.mode == "aggregated" and pol.last.state is LanePair.BOTH_IDLE and pol.last.move is Move.LAUNCH
    assert [c.rid for c in plan.aggregated.prefill] == ["p"] and len(plan.aggregated.decode) == 8
    cands = pol.candidates(v)
    chosen = max((c for c in cands if c.feasible), key=lambda c: c.score)
    assert chosen.mode == "aggregated" and chosen.prefill_tokens == plan.aggregated.prefill_tokens
    assert plan.predicted_ms["aggregated"] == pytest.approx(chosen.step_ms) and chosen.step_ms <= M * 100
    best_split = max((c for c in cands if c.mode == "split" and c.feasible), key=lambda c: c.r_p)
    assert chosen.r_p > best_split.r_p  # it delivers the prompt faster


def test_split_when_the_mixed_batch_would_break_the_slo():
    # 200 decodes that already waited 50 ms and a prompt that has waited 800 ms of its 1 s TTFT:
    # a mixed batch on all SMs may only take a sliver of the prompt (its first step must end within
    # M * (100 - 50) ms), while a split steps the decodes on their partition within that budget
    # and prefills 2048 tokens beside them.
    pol = load_policy("duet", ctx())
    decs = [decoding(f"d{i}", 1500, last=0.95) for i in range(200)]
    v = view(wait=[waiting("p", 6000, arrival=0.2)], dec=decs, now=1.0)
    plan = pol.plan(v)
    assert plan.mode == "split" and plan.prefill_sms + plan.decode_sms == TOTAL
    assert [c.rid for c in plan.prefill_lane.prefill] == ["p"] and len(plan.decode_lane.decode) == 200
    cands = pol.candidates(v)
    agg = [c for c in cands if c.mode == "aggregated"]
    assert not any(c.feasible for c in agg if c.prefill_tokens >= 1536)  # mixed batches break the budget
    split = next(c for c in cands if c.mode == "split" and c.decode_sms == plan.decode_sms
                 and c.prefill_tokens == plan.prefill_lane.prefill_tokens)
    assert split.feasible and split.first_ms <= M * 50 and split.slowest_ms <= M * 100
    assert split.r_p > 1.3 * max(c.r_p for c in agg if c.feasible)
    # TTFT pressure: the prompt that waited is worth more than a fresh one
    w_fresh, _ = pol.weights(view(wait=[waiting("p", 6000, arrival=1.0)], dec=decs, now=1.0))
    w_late, _ = pol.weights(v)
    assert w_late > w_fresh >= 1.0


def test_a_request_that_waited_has_less_budget():
    pol = load_policy("duet", ctx())
    fresh = [decoding(f"d{i}", 2000, last=1.0) for i in range(64)]
    stale = [decoding(f"d{i}", 2000, last=1.0) for i in range(64)]
    stale[5].last_token_time = 1.0 - 0.060  # one request already waited 60 ms since its last token
    wait = [waiting("p", 8000, arrival=1.0)]
    a = pol.candidates(view(wait=wait, dec=fresh, now=1.0))
    b = pol.candidates(view(wait=wait, dec=stale, now=1.0))
    # the same candidates, priced the same; only the first step's budget shrank: M * (100 - 60)
    assert [(c.mode, c.budget, c.decode_sms) for c in a] == [(c.mode, c.budget, c.decode_sms) for c in b]
    for ca, cb in zip(a, b):
        assert ca.first_ms == pytest.approx(cb.first_ms)
        assert cb.feasible == (ca.feasible and cb.first_ms <= M * 40 + 1e-9)
    assert sum(c.feasible for c in b) < sum(c.feasible for c in a)
    plan = load_policy("duet", ctx()).plan(view(wait=wait, dec=stale, now=1.0))
    first = plan.predicted_ms.get("aggregated", None)
    if plan.mode == "split":
        first = next(c.first_ms for c in b if c.mode == "split" and c.decode_sms == plan.decode_sms)
    assert first <= M * 40


def test_joiners_bound_the_decode_steps_of_a_split():
    # A split whose prefill completes a request: if the decode lane's steps outlast the prefill, the
    # request waits for them; the overhang plus its first step must fit the SLO.
    pol = load_policy("duet", ctx())
    decs = [decoding(f"d{i}", 3000) for i in range(200)]
    cands = pol.candidates(view(wait=[waiting("p", 900)], dec=decs))  # a short prompt: it completes
    splits = [c for c in cands if c.mode == "split"]
    assert any(c.joiner_ms > M * 100 for c in splits)
    for c in splits:
        assert c.joiner_ms > 0  # every split completes "p"
        if c.joiner_ms > M * 100:
            assert not c.feasible


def test_no_work_and_nothing_feasible():
    pol = load_policy("duet", ctx())
    assert pol.plan(view(wait=[waiting("big", 9000)], kv_free=100)) is None  # nothing admissible
    assert pol.last.move is Move.NOTHING_TO_DO
    # every decode already waited past the SLO: none can be saved, the rest is planned as usual
    decs = [decoding(f"d{i}", 2000, last=0.0) for i in range(32)]
    plan = pol.plan(view(wait=[waiting("p", 2000, arrival=1.0)], dec=decs, now=1.0))
    assert plan is not None and "best for the rest" in plan.reason


# ---- one lane busy -----------------------------------------------------------------------------


def test_decode_lane_waits_for_the_prefill_when_it_ends_within_a_step():
    decs = [decoding(f"d{i}", 2000, last=1.0) for i in range(32)]
    step = CM.batch_time([(1, r.num_computed) for r in decs], 32) * 1e3
    busy = launch(LaneKind.PREFILL, LaneBatch(prefill=[PrefillChunk("x", 0, 4000)]), TOTAL - 32, step * 0.2)
    v = view(dec=decs, idle={LaneKind.DECODE}, inflight={LaneKind.PREFILL: busy}, now=1.0)
    # by default (sync_fraction 0) the decode lane does not idle for a joint plan: it steps past
    dflt = load_policy("duet", ctx())
    assert dflt.plan(v) is not None and dflt.last.move is Move.LAUNCH
    pol = load_policy("duet", ctx(sync_fraction=0.25))
    assert pol.plan(v) is None
    assert (pol.last.state, pol.last.move) == (LanePair.PREFILL_RUNNING_DECODE_IDLE, Move.WAIT_FOR_PARTNER)
    # a long prefill: the decode lane steps on its SMs, within the prefill
    busy.predicted_ms = {"prefill": step * 5.5}
    plan = pol.plan(v)
    assert pol.last.move is Move.LAUNCH and plan.decode_sms == 32 and plan.prefill_lane is None
    assert 1 <= plan.decode_lane.steps <= 6
    # no ready decodes: nothing to do
    assert pol.plan(view(idle={LaneKind.DECODE}, inflight={LaneKind.PREFILL: busy}, wait=[waiting("y", 10)])) is None
    assert pol.last.move is Move.NOTHING_TO_DO


def test_prefill_lane_waits_when_the_partition_must_change():
    pol = load_policy("duet", ctx())
    # The decode lane runs 200 long decodes on 8 SMs: no split on 8 SMs is feasible for them, so the
    # prefill lane must not take the other 124 SMs: it waits to re-plan both lanes.
    decs = [decoding(f"d{i}", 4000) for i in range(200)]
    batch = LaneBatch(decode=[r.rid for r in decs], steps=1)
    work = [ReqWork(r.rid, [5], r.num_computed, [], True, 1, params=r.params, output_ids=r.output_ids,
                    prompt_ids=r.prompt_ids) for r in decs]
    busy = launch(LaneKind.DECODE, batch, 8, 80.0, work=work)
    v = view(wait=[waiting("p", 4000)], idle={LaneKind.PREFILL}, inflight={LaneKind.DECODE: busy})
    assert pol.plan(v) is None
    assert (pol.last.state, pol.last.move) == (LanePair.DECODE_RUNNING_PREFILL_IDLE, Move.WAIT_FOR_PARTNER)
    # A partition that suits the batch: the prefill lane goes on with its next chunk at once.
    few = decs[:16]
    busy = launch(LaneKind.DECODE, LaneBatch(decode=[r.rid for r in few], steps=8), 16, 150.0, work=work[:16])
    # only this partition exists, and keeping the pace outweighs the prefill an aggregated step would
    # add (with the default decode_gain 1, an aggregated joint plan scores 1.89 against 1.80 here)
    pol = load_policy("duet", ctx(decode_sms_grid="16", decode_gain=10))
    plan = pol.plan(view(wait=[waiting("p", 4000)], idle={LaneKind.PREFILL}, inflight={LaneKind.DECODE: busy}))
    assert pol.last.move is Move.LAUNCH, pol.last.reason
    assert plan.prefill_sms == TOTAL - 16 and plan.decode_lane is None and plan.prefill_lane.prefill[0].rid == "p"
    # No prompt waiting: nothing to do.
    assert pol.plan(view(idle={LaneKind.PREFILL}, inflight={LaneKind.DECODE: busy})) is None
    assert pol.last.move is Move.NOTHING_TO_DO


# ---- queue order -------------------------------------------------------------------------------


def test_deadline_order_lets_more_requests_meet_the_ttft_slo():
    rate = 10.0  # tokens per ms
    # FCFS: the long one (9000 tokens, 900 ms) makes both later ones miss a 1 s TTFT.
    q = [waiting("long", 9000, arrival=0.0), waiting("a", 1000, arrival=0.01), waiting("b", 1000, arrival=0.02)]
    v = view(wait=q, now=0.05)
    order = deadline_order(v, rate, 1000.0)
    assert [r.rid for r in order] == ["a", "b", "long"]
    # Everyone fits: FCFS, the same list object.
    v2 = view(wait=[waiting("x", 100), waiting("y", 100)], now=0.0)
    assert deadline_order(v2, rate, 1000.0) is v2.waiting
    # A retracted request (its first token already out) and one deferred for too long keep their places.
    retracted = waiting("r", 9000, arrival=0.0)
    retracted.output_ids = [5, 5]
    old = waiting("old", 9000, arrival=-5.0)
    order = deadline_order(view(wait=[retracted, old] + q[1:], now=0.05), rate, 1000.0)
    assert [r.rid for r in order][:2] == ["r", "old"]
    pol = load_policy("duet", ctx(ttft_order="fcfs"))
    assert pol.plan(view(wait=q, now=0.05)).aggregated.prefill[0].rid == "long"
    pol = load_policy("duet", ctx())  # deadline order is duet's default
    plan = pol.plan(view(wait=[waiting("long", 30000, arrival=0.0)] + q[1:], now=0.9))
    assert plan.aggregated.prefill[0].rid == "a"


def _plain_deadline_order(v, rate, slo):
    """Moore-Hodgson as written in the textbook (deadline_order is tuned for plan() overhead)."""
    import heapq

    w, now = v.waiting, v.now * 1e3
    t = now + sum(r.remaining_prefill for r in v.prefilling) / rate
    total = sum(r.prompt_len + len(r.output_ids) - r.num_computed for r in w)  # without pending tokens
    if len(w) < 2 or t + total / rate <= min(r.arrival_time for r in w) * 1e3 + slo:
        return list(w)
    heap, late = [], []
    for i, r in enumerate(w):
        n = r.remaining_prefill
        t += n / rate
        if r.output_ids or now - r.arrival_time * 1e3 > 4 * slo:
            continue  # keeps its place
        heapq.heappush(heap, (-n, i))
        if t > r.arrival_time * 1e3 + slo:
            minus_n, j = heapq.heappop(heap)
            late.append(j)
            t += minus_n / rate
    return [r for i, r in enumerate(w) if i not in late] + [w[j] for j in sorted(late)]


def test_deadline_order_is_moore_hodgson():
    # deadline_order runs every plan in one pass with int heap keys; it must give the textbook
    # algorithm's order on any queue, and the queue itself exactly when that order is FCFS.
    rng = random.Random(9)
    reordered = 0
    for _ in range(400):
        q = []
        for i in range(rng.randint(0, 30)):
            r = waiting(f"w{i}", rng.randint(20, 9000), arrival=-rng.uniform(0.0, 6.0))
            if rng.random() < 0.1:
                r.output_ids, r.num_computed = [5] * rng.randint(1, 4), rng.randint(0, 50)  # retracted
            if rng.random() < 0.2:
                r.pending = rng.randint(1, 3000)  # tokens in flight count in the queue's time, not the FCFS check
            q.append(r)
        q.sort(key=lambda r: r.arrival_time)
        pre = [waiting("p", rng.randint(100, 9000))] if rng.random() < 0.5 else []
        v = view(wait=q, pre=pre, now=0.0)
        rate = rng.uniform(5.0, 60.0)
        got, want = deadline_order(v, rate, 1000.0), _plain_deadline_order(v, rate, 1000.0)
        assert [r.rid for r in got] == [r.rid for r in want]
        assert (got is v.waiting) == (want == q)
        reordered += got is not v.waiting
    assert 50 < reordered < 400


def test_projected_decodes_are_the_lanes_requests_after_the_launch():
    # What a joint plan sees of a busy decode lane, read in one tuned pass: the requests that do not
    # finish on the lane (context or max_new_tokens), their cached tokens, the longest remaining
    # output up to k_max; the same as the plain reading on random lanes.
    from sglang_duet.policies.duet_search import Decodes, projected_decodes

    rng = random.Random(4)
    for _ in range(2000):
        ctx_len = rng.choice([64, 300, 4096])
        v = view()
        v.config = CoreConfig(kv_slots=350_001, context_length=ctx_len, max_running_requests=256)
        work = []
        for i in range(rng.randint(0, 10)):
            plen, out = rng.randint(1, 200), rng.randint(0, 100)
            params = rng.choice([None, SamplingParams(max_new_tokens=rng.randint(1, 150)),
                                 SamplingParams(max_new_tokens=None)])
            work.append(ReqWork(f"r{i}", [5], plen + out + rng.randint(-3, 3), [], True, rng.randint(1, 8),
                                params=params, prompt_ids=[1] * plen))
        k_max = rng.randint(1, 10)
        dec = Decodes([], rng.randint(0, 1000), rng.randint(1, k_max), 0.0)
        got = projected_decodes(v, launch(LaneKind.DECODE, LaneBatch(), 32, 10.0, work=work), 5.0, dec, k_max)
        cached, longest, more = dec.cached, dec.longest, []
        for w in work:
            pos = w.start_pos + w.steps
            left = ctx_len - 1 - pos
            if w.params is not None and w.params.max_new_tokens is not None:
                left = min(left, w.params.max_new_tokens - (pos + 1 - len(w.prompt_ids)))
            if left > 0:
                more.append(w.rid)
                cached += pos
                longest = max(longest, min(left, k_max))
        assert (got.cached, got.longest, [w.rid for w in got.more]) == (cached, longest, more)


def test_baselines_keep_fcfs_unless_asked():
    q = [waiting("long", 60000, arrival=0.0), waiting("a", 1000, arrival=0.01)]
    v = view(wait=q, now=0.9)
    assert load_policy("chunked", ctx()).plan(v).aggregated.prefill[0].rid == "long"
    assert load_policy("chunked", ctx(ttft_order="deadline")).plan(v).aggregated.prefill[0].rid == "a"
    assert load_policy("static-split", ctx()).plan(v).prefill_lane.prefill[0].rid == "long"
    assert load_policy("static-split", ctx(ttft_order="deadline")).plan(v).prefill_lane.prefill[0].rid == "a"


# ---- the demand estimate -----------------------------------------------------------------------


def test_decode_pace_target_follows_littles_law():
    # 40 arrivals over 2 s: 20 req/s of 1000-token prompts with 200 new tokens each
    q = [waiting(f"w{i}", 1000, arrival=0.05 * i) for i in range(40)]
    v = view(wait=q, now=2.0)
    for running_target in (0.9, 0.65):  # the batch's target (0.65 by default) apart from the pool's
        pol = load_policy("duet", ctx(kv_target=0.9, running_target=running_target))
        pol.demand.observe(v)
        lam = pol.demand.rate(2.0)
        assert lam == pytest.approx(20.0)
        kv = 0.9 * 350_000 / (lam * (1000 + 100) * 200) * 1e3
        n = running_target * 256 / (lam * 200) * 1e3
        assert pol.weights(v)[1] == pytest.approx(min(M * 100, kv, n))
    assert load_policy("duet", ctx()).demand.running_target == 0.65
    with pytest.raises(ValueError, match="running_target"):
        load_policy("duet", ctx(running_target=0))
    assert load_policy("duet", ctx()).weights(v)[1] == pytest.approx(M * 100)  # too few arrivals seen: no target


# ---- calibration -------------------------------------------------------------------------------


def test_measured_launch_times_calibrate_compute_and_bandwidth():
    """A device whose compute is 20% slower than the model and whose memory is as modelled: after a
    few measured launches of both kinds, duet predicts a compute-bound step 20% longer and a
    memory-bound one as before (a single ratio could not do both)."""
    from sglang_duet.core.plan import LaunchResult

    pol = load_policy("duet", ctx(calibrate=0.3))
    mixed = view(wait=[waiting("p", 6000)])  # a prefill: compute-bound (aggregated, nothing to split)
    decode_only = view(dec=[decoding(f"e{i}", 3000) for i in range(200)])  # memory-bound
    cm_pol = load_policy("duet", ctx())  # uncalibrated, for the model's own split of each launch
    for i in range(30):
        plan = pol.plan(mixed if i % 2 else decode_only)
        batch = plan.aggregated
        comp, mem = pol._raw[id(batch)]
        took = 1.2 * comp + 1.0 * mem  # ms on this device
        pol.on_result(Launch(i, LaneKind.AGGREGATED, batch, [], predicted_ms=plan.predicted_ms),
                      LaunchResult(i, started_at=0.0, finished_at=took / 1e3))
    c = pol.calibration[LaneKind.AGGREGATED]
    assert c.a == pytest.approx(1.2, rel=0.02) and c.b == pytest.approx(1.0, rel=0.02)
    assert pol.calibration[LaneKind.DECODE].a == 1.0 and pol.calibration[LaneKind.PREFILL].b == 1.0
    big = next(c for c in pol.candidates(mixed) if c.mode == "aggregated" and c.budget == 4096)
    big0 = next(c for c in cm_pol.candidates(mixed) if c.mode == "aggregated" and c.budget == 4096)
    assert big.step_ms == pytest.approx(1.2 * big0.step_ms, rel=0.03)  # compute-bound: 20% longer
    dec = next(c for c in pol.candidates(decode_only) if c.mode == "aggregated")
    dec0 = next(c for c in cm_pol.candidates(decode_only) if c.mode == "aggregated")
    assert dec.step_ms == pytest.approx(dec0.step_ms, rel=0.03)  # memory-bound: as modelled
    off = load_policy("duet", ctx(calibrate=0))
    p2 = off.plan(mixed)
    off.on_result(Launch(0, LaneKind.AGGREGATED, p2.aggregated, [], predicted_ms=p2.predicted_ms),
                  LaunchResult(0, started_at=1.0, finished_at=2.0))
    assert (off.calibration[LaneKind.AGGREGATED].a, off.calibration[LaneKind.AGGREGATED].b) == (1.0, 1.0)


# ---- the simulator -----------------------------------------------------------------------------


def test_simulated_duet_attains_at_least_what_chunked_does():
    """A small fixed point, deterministic (virtual time, seeded workload): duet's strict attainment
    (every gap and TTFT within SLO) is at least chunked-2048's."""
    from sglang_duet.simulator import SimConfig, simulate, summarize
    from sglang_duet.simulator.loop import build_cost_model

    cm = build_cost_model("qwen3-8b", "h100")

    def run(policy, budget):
        cfg = SimConfig(policy=policy, workload="azure-conv", rate=32.0, num_requests=300, chunked_prefill_size=budget)
        return summarize(simulate(cfg, cost_model=cm))

    chunked, duet = run("chunked", 2048), run("duet", 8192)
    assert chunked.attainment_max_tbt < 1.0  # a point where the policies differ
    assert duet.attainment_max_tbt >= chunked.attainment_max_tbt
    assert duet.tbt_max_ms <= 100.0


def test_search_vectors_agree_with_candidates():
    pol = load_policy("duet", ctx())
    decs = [decoding(f"d{i}", 1000 + 37 * i, max_new=10 + i % 7) for i in range(100)]
    v = view(wait=[waiting("p", 7000), waiting("q", 500)], dec=decs)
    s = pol.search(v)
    cands = pol.candidates(v)
    assert len(cands) == len(s)
    assert np.allclose([c.score for c in cands], s.score)
    best = s.best()
    assert cands[best].score == max(c.score for c in cands if c.feasible)
    assert all(c.k <= 8 for c in cands)


# ---- one lane (a CPU's model executor) ------------------------------------------------------------


def one_lane(slo=100.0, **options):
    c = ctx(slo=slo, **options)
    c.lanes = 1
    return c


def test_one_lane_never_splits_and_takes_the_best_feasible_aggregated_budget():
    # The scenario in which two lanes split (test_split_when_the_mixed_batch_would_break_the_slo):
    # on one lane a split's launches would run one after the other, so only aggregated batches are
    # priced, with budgets down to ONE_LANE_SMALL_BUDGETS, and the best feasible one is taken.
    decs = [decoding(f"d{i}", 1500, last=0.95) for i in range(200)]
    v = view(wait=[waiting("p", 6000, arrival=0.2)], dec=decs, now=1.0)
    two = load_policy("duet", ctx())
    assert two.plan(v).mode == "split"  # unchanged with two lanes
    assert 256 not in two.budgets
    pol = load_policy("duet", one_lane())
    assert {8, 16, 32, 64, 128, 256} <= set(pol.budgets)
    cands = pol.candidates(v)
    assert cands and all(c.mode == "aggregated" for c in cands)
    plan = pol.plan(v)
    assert plan.mode == "aggregated" and plan.prefill_lane is None and plan.decode_lane is None
    chosen = next(c for c in cands if c.prefill_tokens == plan.aggregated.prefill_tokens)
    assert chosen.feasible and chosen.first_ms <= M * 50
    assert chosen.score == max(c.score for c in cands if c.feasible)


def test_one_lane_when_nothing_fits_takes_the_smallest_chunk_that_progresses():
    # A device far slower than the SLO (a 1 ms TBT SLO on the H100 model: not even a decode-only
    # step fits): two lanes fall back to the fastest decode; one lane takes the fastest step that
    # still prefills, which is the smallest budget above the decode batch.
    decs = [decoding(f"d{i}", 1500) for i in range(16)]
    v = view(wait=[waiting("p", 6000)], dec=decs)
    pol = load_policy("duet", one_lane(slo=1.0))
    cands = pol.candidates(v)
    assert not any(c.feasible for c in cands) and all(c.mode == "aggregated" for c in cands)
    plan = pol.plan(v)
    assert plan.mode == "aggregated" and "smallest chunk that makes progress" in plan.reason
    progressing = [c for c in cands if c.prefill_tokens > 0]
    fastest = min(progressing, key=lambda c: c.step_ms)
    assert plan.aggregated.prefill_tokens == fastest.prefill_tokens == 32 - 16  # budget 32, 16 decodes
    assert plan.predicted_ms["aggregated"] == pytest.approx(fastest.step_ms)
    assert len(plan.aggregated.decode) == 16
    two = load_policy("duet", ctx(slo=1.0)).plan(v)
    assert "fastest decode" in two.reason  # two lanes: unchanged fallback


def test_one_lane_never_splits_in_the_simulated_loop():
    pol = load_policy("duet", one_lane(slo=5.0))
    rng = random.Random(3)
    for step in range(40):
        decs = [decoding(f"d{i}", rng.randint(100, 4000), last=0.99) for i in range(rng.randint(0, 120))]
        plan = pol.plan(view(wait=[waiting(f"p{step}", rng.randint(50, 9000), arrival=0.5)], dec=decs, now=1.0))
        assert plan is None or (plan.mode == "aggregated" and plan.prefill_sms is None and plan.decode_sms is None)


def test_lanes_must_be_one_or_two():
    c = ctx()
    c.lanes = 3
    with pytest.raises(ValueError, match="lanes"):
        load_policy("duet", c)


@pytest.mark.timeout(240)
def test_the_engine_tells_the_policy_how_many_lanes_run(tiny_model_factory):
    # The model executor on a CPU runs one lane (--lanes auto); the emulated GPU runs two.
    from sglang_duet.engine_core import EngineCore
    from sglang_duet.server_args import ServerArgs

    src = tiny_model_factory("llama")
    cpu = EngineCore(ServerArgs(model_path=src, device="cpu", policy="duet", max_total_tokens=4096))
    try:
        assert cpu.policy.ctx.lanes == 1 and cpu.policy.lanes == 1 and 32 in cpu.policy.budgets
    finally:
        cpu.executor.shutdown()
    emu = EngineCore(ServerArgs(executor="emulated", model_config=f"{ROOT}/configs/models/smollm2-135m.json",
                                policy="duet", max_total_tokens=4096))
    assert emu.policy.ctx.lanes == 2 and 32 not in emu.policy.budgets


# ---- plan() outputs pinned -----------------------------------------------------------------------
#
# The search is tuned for host time (plan() overhead, benchmark/policy_overhead.py); such work must
# not change a decision. These fingerprints were computed with the code before that work (commit
# 31ef5cc): every plan's state, move, reason (its numbers as printed), lanes, SM counts, predicted ms
# and calibration to 9 significant digits, over scripted views and a short simulated run.


def _plan_line(pol, plan) -> str:
    d = pol.last
    if plan is None:
        return f"{d.state.value}|{d.move.value}|{d.reason}|{d.candidates}"
    lanes = [(lane.value, [(c.rid, c.start, c.length) for c in b.prefill], list(b.decode), b.steps)
             for lane, b in plan.lane_batches()]
    pred = ",".join(f"{k}={v:.9g}" for k, v in sorted(plan.predicted_ms.items()))
    parts = ",".join(f"{lane.value}={c:.9g}/{m:.9g}" for lane, (c, m) in d.parts.items())
    cal = ",".join(f"{c.a:.9g}/{c.b:.9g}" for c in pol.calibration.values())
    return f"{plan.reason}|{d.candidates}|{lanes}|{plan.prefill_sms}|{plan.decode_sms}|{pred}|{parts}|{cal}"


def _scripted_views(rng: random.Random, batch: int, queue: int):
    """Both lanes idle, a prefill running and a decode launch running, on one random population."""
    now = 50.0
    decs = []
    for i in range(batch):
        out = rng.randint(1, 300)
        decs.append(decoding(f"d{i}", rng.randint(64, 9000), out=out, max_new=out + rng.randint(1, 40),
                             last=now - rng.uniform(0.0, 0.04)))
    wait = [waiting(f"w{i}", rng.randint(20, 9000), arrival=now - rng.uniform(0.0, 1.5)) for i in range(queue)]
    wait.sort(key=lambda r: r.arrival_time)
    pre = []
    if queue and rng.random() < 0.5:
        p = waiting("pre", rng.randint(3000, 12000), arrival=now - 0.4)
        p.state, p.num_computed = ReqState.RUNNING, rng.randint(1, 2500)
        pre = [p]
    kv = rng.choice([300_000, 60_000, 9_000])
    busy_p = launch(LaneKind.PREFILL, LaneBatch(prefill=[PrefillChunk("x", 0, 4096)]), rng.choice([76, 100, 124]),
                    rng.uniform(5.0, 200.0),
                    work=[ReqWork("x", [1] * 4096, 0, [], rng.random() < 0.5)])
    half = decs[: batch // 2]
    busy_d = launch(LaneKind.DECODE, LaneBatch(decode=[r.rid for r in half], steps=rng.randint(1, 8)),
                    rng.choice([8, 32, 56]), rng.uniform(2.0, 90.0),
                    work=[ReqWork(r.rid, [5], r.num_computed, [], True, 4, params=r.params, output_ids=r.output_ids,
                                  prompt_ids=r.prompt_ids) for r in half])
    return [
        view(wait=wait, dec=decs, pre=pre, kv_free=kv, now=now),
        view(wait=wait, dec=decs, pre=pre, kv_free=kv, now=now, idle={LaneKind.DECODE},
             inflight={LaneKind.PREFILL: busy_p}),
        view(wait=wait, dec=decs[batch // 2:], pre=pre, kv_free=kv, now=now, idle={LaneKind.PREFILL},
             inflight={LaneKind.DECODE: busy_d}),
    ]


def _scripted_trace(lanes: int, options: dict | None = None) -> list[str]:
    rng = random.Random(7)
    lines = []
    for slo in (20.0, 50.0, 100.0):
        c = ctx(slo=slo)
        c.lanes = lanes
        c.options = dict(options or {})
        pol = load_policy("duet", c)
        for batch in (0, 1, 7, 64, 256, 700):
            for queue in (0, 1, 5, 32):
                for v in _scripted_views(rng, batch, queue):
                    lines.append(_plan_line(pol, pol.plan(v)))
                    # move the calibration as measured launches would, then plan the same view again
                    pol.calibration[LaneKind.AGGREGATED].update(20.0, 8.0, rng.uniform(20.0, 40.0))
                    pol.calibration[LaneKind.DECODE].update(1.0, 9.0, rng.uniform(8.0, 14.0))
                    pol.calibration[LaneKind.PREFILL].update(30.0, 2.0, rng.uniform(25.0, 45.0))
                    lines.append(_plan_line(pol, pol.plan(v)))
    return lines


def _simulated_trace(monkeypatch, options: dict | None = None) -> list[str]:
    from sglang_duet.simulator import SimConfig, simulate
    from sglang_duet.simulator.loop import build_cost_model

    lines = []
    plan = DuetPolicy.plan

    def traced(self, v):
        p = plan(self, v)
        lines.append(_plan_line(self, p))
        return p

    monkeypatch.setattr(DuetPolicy, "plan", traced)
    cfg = SimConfig(policy="duet", workload="azure-conv", rate=40.0, num_requests=150, chunked_prefill_size=8192,
                    tbt_slo_ms=60.0, policy_options=dict(options or {}))
    simulate(cfg, cost_model=build_cost_model("qwen3-8b", "h100"))
    return lines


# Without the policy changes of stops 22 and 23 (kv_gain 0, running_target 0.9, kv_target 0.9):
# the plans of the code before the plan-overhead work, so that work changed no decision; with the
# defaults: the plans since kv_gain, running_target (stop 22) and kv_target 0.75 (stop 23).
PINNED_PLANS = {
    "scripted, two lanes": (432, "6373e51e33fdba07"),
    "scripted, one lane": (432, "22a982a9a2004c4a"),  # re-pinned: one-lane budgets 8 and 16 (stop 22)
    "simulated": (899, "47919e1e9b9ff932"),
}
PINNED_PLANS_DEFAULT = {
    "scripted, two lanes": (432, "0512312a29e0fffe"),
    "scripted, one lane": (432, "c7941cf83d8d56ee"),
    "simulated": (871, "8a6c7a8dbe63aeeb"),
}


@pytest.mark.parametrize("options, pinned", [({"kv_gain": 0, "running_target": 0.9, "kv_target": 0.9}, PINNED_PLANS),
                                             (None, PINNED_PLANS_DEFAULT)],
                         ids=["kv_gain=0", "defaults"])
def test_plans_are_pinned(monkeypatch, options, pinned):
    import hashlib

    traces = {"scripted, two lanes": _scripted_trace(2, options), "scripted, one lane": _scripted_trace(1, options),
              "simulated": _simulated_trace(monkeypatch, options)}
    got = {k: (len(v), hashlib.sha256("\n".join(v).encode()).hexdigest()[:16]) for k, v in traces.items()}
    assert sum(1 for line in traces["scripted, two lanes"] if "[" in line.split("|")[0]) > 100  # plans launched
    assert got == pinned


def test_a_nearly_full_kv_pool_weighs_decode_pace_more():
    """With the pool past kv_gain_from, decode pace counts up to (1 + kv_gain) times: the same
    queue and decodes get a faster decode lane (more SMs) when KV is short, the same plan when it
    is not, and kv_gain 0 turns the term off (docs: a full pool waits on the KV decodes free)."""
    decs = [decoding(f"d{i}", 500 + (37 * i) % 2500, out=50, max_new=400) for i in range(64)]
    wait = [waiting(f"w{i}", 500 + (53 * i) % 2500, arrival=-0.3) for i in range(8)]

    def decode_sms(kv_free, **opts):
        pol = load_policy("duet", ctx(slo=100.0, **opts))
        w_p = pol.weights(view(wait=wait))[0]
        pol.weights = lambda v: (w_p, 10.0)  # arrivals that need a 10 ms pace (tau binds)
        return pol.plan(view(wait=wait, dec=decs, kv_free=kv_free)).decode_sms

    assert decode_sms(300_000) == decode_sms(300_000, kv_gain=0) == decode_sms(3_000, kv_gain=0)
    assert decode_sms(3_000) > decode_sms(3_000, kv_gain=0)
    pol = load_policy("duet", ctx())
    assert [pol.decode_weight(view(kv_free=f)) for f in (350_000, 35_000, 17_500, 0)] == pytest.approx([1, 1, 2, 3])
    with pytest.raises(ValueError, match="kv_gain_from"):
        load_policy("duet", ctx(kv_gain_from=1.0))


def test_overhead_benchmark_times_another_checkouts_policies(tmp_path):
    # benchmark/policy_overhead.py --policies-dir: before/after runs of plan() overhead load the
    # other checkout's policies/ in place of the installed package (and say which they timed).
    import shutil
    import subprocess
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = tmp_path / "policies"
    shutil.copytree(os.path.join(here, "policies"), other)
    cmd = [sys.executable, "-m", "benchmark.policy_overhead", "--policies", "duet", "--batches", "4", "--repeat", "2"]
    out = subprocess.run(cmd + ["--policies-dir", str(other)], cwd=here, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"policies from {other}" in out.stdout and out.stdout.count("duet ") == 3
    bad = subprocess.run(cmd + ["--policies-dir", str(tmp_path / "nothing")], cwd=here, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--policies-dir" in bad.stderr
