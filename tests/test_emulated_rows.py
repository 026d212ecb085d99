"""The emulated GPU's per-launch rows (issue #14): gathered once when a launch starts, column by
column, and read by its pricing and every step's report. Everything it reports must equal what a
straightforward per-row emulator reports (the one before, kept here as the reference): token ids
of every part, partial and final, logprobs, launch start and end times, on random launches of
both lanes (multi-step decodes, rows that stop stepping early or sample nothing, seeds of any size
and sign, banned ids), through the scheduler core with aborts, on the roofline truth and on the
constant-step device."""
from __future__ import annotations

import random

import pytest

from sglang_duet.core.plan import NO_TOKEN, LaneBatch, LaneKind, Launch, ReqWork, RowResult
from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.cost_model.constant import ConstantCostModel, ConstantPricer
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.cost_model.truth import BreakdownPricer, LaunchCost, TruthConfig, TruthPricer
from sglang_duet.executor.emulated import VECTOR_ROWS, EmulatedExecutor, emulated_kv_slots, token_id
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams
from emulated_driver import drive

CM = CostModel.load("qwen3-8b", "h100")
CONST = ConstantCostModel.like(CM, 0.01)


def reference_price(pricer, work: list[tuple[int, int, int]], sms) -> LaunchCost:
    """The launch's cost priced row by row, as the emulator did before the column layout."""
    if isinstance(pricer, ConstantPricer):
        return BreakdownPricer(pricer.cm).price(work, sms)  # the generic per-step shapes
    if not isinstance(pricer, TruthPricer):
        return pricer.price(work, sms)
    lc = LaunchCost()
    steps = max(s for _, _, s in work)
    T = n1 = c1 = 0
    multi = []
    for q, c, _ in work:
        T += q
        if q == 1:
            n1 += 1
            c1 += c
        else:
            multi.append((q, c))
    pricer._add_step(lc, T, len(work), sms, n1, c1, multi)
    for j in range(1, steps):
        rows = [c for _, c, s in work if s > j]
        pricer._add_step(lc, len(rows), len(rows), sms, len(rows), sum(rows) + j * len(rows), ())
    return lc


class ReferenceExecutor(EmulatedExecutor):
    """Prices each launch and hashes each step's tokens row by row (token_id per row)."""

    def price(self, launch, rows=None):
        sms = None if launch.lane == LaneKind.AGGREGATED else launch.sms
        return reference_price(self.pricer, [(len(w.input_ids), w.start_pos, w.steps) for w in launch.work], sms)

    def _report(self, run, t, final):
        launch, j = run.launch, run.step
        if final:
            self.busy_s[launch.lane.value] += t - run.started
        work = launch.work
        rows = [token_id(w.sampling_seed, w.start_pos + len(w.input_ids) + j, self.token_lo, self.token_hi, self.banned)
                if (w.steps if w.sample else 0) > j else NO_TOKEN for w in work]
        lps = {w.rid: [{"token_id": tok, "logprob": 0.0, "top": []}]
               for w, tok in zip(work, rows) if tok != NO_TOKEN and w.params is not None
               and getattr(w.params, "logprobs", False)}
        self._done.append(RowResult(launch.launch_id, work, rows, started_at=run.started, finished_at=t,
                                    final=final, logprobs=lps or None))


def _seen(parts) -> list:
    return [(p.launch_id, p.final, p.started_at, p.finished_at, list(p.rows), p.logprobs) for p in parts]


LP = SamplingParams(logprobs=True)
PLAIN = SamplingParams()


def random_launch(rng: random.Random, lid: int, lane: LaneKind) -> Launch:
    n = rng.choice([1, 2, VECTOR_ROWS - 1, VECTOR_ROWS, VECTOR_ROWS + 1, 40, 300])
    steps = 1 if lane == LaneKind.PREFILL else rng.choice([1, 1, 2, 3, 5])
    work = []
    for i in range(n):
        prefill = lane != LaneKind.DECODE and rng.random() < 0.2
        q = rng.randrange(2, 300) if prefill else 1
        seed = rng.choice([rng.randrange(2 ** 63), rng.randrange(-2 ** 70, 2 ** 70), rng.randrange(100)])
        work.append(ReqWork(
            f"l{lid}-{i}", [7] * q, rng.randrange(0, 5000), [],
            sample=not prefill or rng.random() < 0.5,  # a prefill chunk that is not the last samples nothing
            steps=1 if prefill else rng.randint(1, steps),  # rows that stop stepping before the launch ends
            sampling_seed=seed, params=rng.choice([None, PLAIN, PLAIN, LP])))
    if steps > 1 and all(w.steps < steps for w in work):
        work[0].steps = steps
    sms = None if lane == LaneKind.AGGREGATED else rng.choice([40, 66, 92])
    return Launch(lid, lane, LaneBatch(), work, sms=sms)


@pytest.mark.parametrize("cm,truth", [(CM, TruthConfig(seed=5)), (CM, TruthConfig.exact()),
                                      (CM, TruthConfig(per_request_attention=False, contention="bandwidth")),
                                      (CONST, TruthConfig.exact(contention="none")), (CONST, TruthConfig(seed=2))])
def test_random_launches_report_what_a_per_row_emulator_reports(cm, truth):
    rng = random.Random(11)
    kw = dict(clock_mode="virtual", truth=truth, token_range=(100, 5000), banned_tokens={101, 4999, 7})
    fast, ref = EmulatedExecutor(cm, **kw), ReferenceExecutor(cm, **kw)
    lanes = [LaneKind.AGGREGATED, LaneKind.PREFILL, LaneKind.DECODE]
    masked = multi = vector = 0
    for lid in range(120):
        launch = random_launch(rng, lid, rng.choice(lanes))
        masked += any((w.steps if w.sample else 0) < max(x.steps for x in launch.work) for w in launch.work)
        multi += max(w.steps for w in launch.work) > 1
        vector += len(launch.work) >= VECTOR_ROWS
        for ex in (fast, ref):
            ex.submit(launch)
        assert fast.price(launch).step_s == ref.price(launch).step_s
        if rng.random() < 0.6:  # let some launches overlap and queue; drain the rest part by part
            while fast.busy():
                assert fast.next_completion() == ref.next_completion()
                got, want = fast.poll(), ref.poll()
                assert _seen(got) == _seen(want) and got
    while fast.busy():
        assert _seen(fast.poll()) == _seen(ref.poll())
    assert not ref.busy() and fast.busy_s == ref.busy_s and fast.truth_stats == ref.truth_stats
    assert masked > 10 and multi > 10 and vector > 10  # the random launches reach every case


def test_the_column_pricers_equal_the_per_row_ones():
    """TruthPricer.price_rows and ConstantPricer against the per-row pricing, step by step and
    phase by phase (float sums in the same order: equal, not approximately equal)."""
    rng = random.Random(3)
    for cm in (CM, CONST):
        ex = EmulatedExecutor(cm, clock_mode="virtual", truth=TruthConfig())
        for lid in range(200):
            launch = random_launch(rng, lid, rng.choice([LaneKind.AGGREGATED, LaneKind.DECODE, LaneKind.PREFILL]))
            work = [(len(w.input_ids), w.start_pos, w.steps) for w in launch.work]
            got, want = ex.pricer.price(work, launch.sms), reference_price(ex.pricer, work, launch.sms)
            for k in LaunchCost.__slots__:
                assert getattr(got, k) == getattr(want, k), k


def _run_core(executor_cls, cm, truth, aborts: bool):
    """A scheduler core on the emulated GPU: 60 requests arriving over time, some asking for
    logprobs, a look-ahead decode policy, some aborted mid-stream. Returns every update and when."""
    rng = random.Random(9)
    ex = executor_cls(cm, clock_mode="virtual", truth=truth, token_range=(10, 30000), banned_tokens={11})
    policy = load_policy("duet", PolicyContext(chunked_prefill_size=512, tbt_slo_ms=60, ttft_slo_ms=1000,
                                               cost_model=cm, hardware=cm.hw))
    core = SchedulerCore(CoreConfig(kv_slots=emulated_kv_slots(cm), context_length=8192, max_running_requests=64,
                                    chunked_prefill_size=512), policy, clock=ex.now)
    return drive(core, ex, rng, 60, 1.5, 900, 120, 4, 3.0, 0.3 if aborts else 0.0)


@pytest.mark.parametrize("cm,truth", [(CM, TruthConfig(seed=1)), (CONST, TruthConfig.exact(contention="none"))])
def test_the_core_with_aborts_sees_what_a_per_row_emulator_gives(cm, truth):
    got = _run_core(EmulatedExecutor, cm, truth, aborts=True)
    want = _run_core(ReferenceExecutor, cm, truth, aborts=True)
    assert got == want
    assert any(u[3] and u[3].get("type") == "abort" for u in got)  # some requests were aborted
    assert any(u[4] for u in got)  # and some asked for logprobs
    assert any(len(u[2]) > 1 for u in got) or len(got) > 100
