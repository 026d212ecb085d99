"""duet's compiled search (policies/search_kernels.py) gives numpy's numbers bit for bit, on every
search of real simulated runs and on random views, so the plans do not depend on whether numba is
installed."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from sglang_duet.core.request import ReqState, Request
from sglang_duet.core.scheduler_core import ALL_LANES, CoreConfig, SchedulerView
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.policies import duet_scoring
from sglang_duet.policies import search_kernels_loader as search_kernels
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.policies.duet_search import Search
from sglang_duet.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not search_kernels.AVAILABLE, reason="numba not installed (or SGLANG_DUET_NUMPY_SEARCH)")

CM = CostModel.load("qwen3-8b", "h100")


def _same(a, b) -> bool:
    """Equal bit for bit: the same dtype, shape and bytes (so -0.0 != 0.0)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


class _Both:
    """Stands in for duet_scoring.score: runs both paths on every search, records any difference,
    and returns the numpy path's answer (so the run is the reference run)."""

    def __init__(self):
        self.searches = self.splits = self.longer = self.parts = self.kept = 0
        self.diffs: list[str] = []
        self._orig = duet_scoring.score

    def __call__(self, tb, pricer, scales, work, x, sh, budgets, less_n, compiled):
        scramble = np.isfinite(tb.steps)
        scramble[:, 0] = False  # the scratch's constant columns: 0, inf; the rest must be written first
        tb.steps[scramble] = -1.0
        rows = pricer.scale_rows([tuple(p) for p in scales]) if scales.shape[1] == 2 else scales  # numpy's: rows
        want = duet_scoring.score_numpy(tb, pricer, rows, work, x, sh, budgets, less_n)
        tb.steps[scramble] = -1.0
        got = duet_scoring.score_compiled(tb, pricer, scales, work, x, sh, budgets, less_n)
        tb.steps[scramble] = -1.0
        with_rows = duet_scoring.score_compiled(tb, pricer, rows, work, x, sh, budgets, less_n)
        if not (_same(with_rows[3], got[3]) and with_rows[5].best_parts == got[5].best_parts):
            self.diffs.append(f"search {self.searches}: scale rows and pairs price differently")
        self.searches += 1
        self.splits += sh.nb > 0
        if sh.nb:
            G, K = len(tb.grid), tb.k_max + 2
            t = want[4].t
            tp = t[sh.na + G * K:].reshape(G, sh.nb)
            cum = np.cumsum(t[sh.na:sh.na + G * K].reshape(G, K), axis=1)
            self.longer += bool((tp > cum[:, -1:]).any())
        assert got[4].compiled and not want[4].compiled
        names = ("C", "k", "feasible", "score")
        for name, a, b in zip(names, want[:4], got[:4]):
            if not _same(a, b):
                self.diffs.append(f"search {self.searches}: {name} differs")
        if not (_same(want[4].t, got[4].t) and _same(want[4].P, got[4].P)):
            self.diffs.append(f"search {self.searches}: priced rows differ")
        found = got[5]
        best = Search.best(SimpleNamespace(score=want[3]), want[2])
        if best != found.best:
            self.diffs.append(f"search {self.searches}: best differs")
        pairs = [(float(r[0]), float(r[-1])) for r in rows]  # (compute, bandwidth) scale per lane block
        G, K, na, nb = len(tb.grid), tb.k_max + 2, sh.na, sh.nb
        if best is not None:  # Search.parts_of(best), as the Python sums give it
            if best < na:
                ref = want[4].parts_of_ranges([(best, best + 1, *pairs[0])])[0]
            else:
                g, b = divmod(best - na, nb)
                p, d = na + G * K + g * nb + b, na + g * K
                pre, dec = want[4].parts_of_ranges([(p, p + 1, *pairs[2]), (d, d + int(want[1][best]), *pairs[1])])
                ref = pre + dec
            if list(ref) != found.best_parts[:len(ref)]:
                self.diffs.append(f"search {self.searches}: the best candidate's parts differ")
        if x.keep_g >= 0 and nb:  # the kept partition's best split, as _partition_stays finds it in numpy
            lo = na + x.keep_g * nb
            mask = want[2][lo:lo + nb] & (want[0][6, lo:lo + nb] > 0)
            self.kept += 1
            if Search.best(SimpleNamespace(score=want[3]), mask, lo) != found.kept:
                self.diffs.append(f"search {self.searches}: the kept partition's best differs")
            d = na + x.keep_g * K
            ref = [want[4].parts_of_ranges([(d, d + k, *pairs[1])])[0] for k in range(1, K + 1)]
            if ref != [tuple(r) for r in found.kept_parts.tolist()]:
                self.diffs.append(f"search {self.searches}: the kept partition's decode parts differ")
        n = len(want[4].t)
        ranges = [(0, 1, 1.0, 1.0), (0, n, 1.1, 0.9), (n // 3, n, 0.8, 1.3)]
        if want[4].parts_of_ranges(ranges) != got[4].parts_of_ranges(ranges):
            self.diffs.append(f"search {self.searches}: parts differ")
        self.parts += 1
        return want


@pytest.fixture
def both(monkeypatch):
    import sglang_duet.policies.duet as duet_module

    rec = _Both()
    monkeypatch.setattr(duet_module, "score_candidates", rec)
    return rec


@pytest.mark.parametrize("workload,rate,hardware,splits", [("azure-conv", 30.0, "h100", True),
                                                           ("sharegpt4", 14.0, "h100", True),
                                                           ("arxiv-sum", 1.2, "h200", False)])
def test_compiled_search_equals_numpy_on_simulated_runs(both, workload, rate, hardware, splits):
    from sglang_duet.simulator import SimConfig, simulate
    from sglang_duet.simulator.loop import build_cost_model

    cfg = SimConfig(policy="duet", workload=workload, rate=rate, num_requests=120, hardware=hardware)
    simulate(cfg, cost_model=build_cost_model("qwen3-8b", hardware))
    assert both.searches > 100 and both.splits > 10  # searches with split candidates were compared
    assert both.kept > 10 or not splits  # and searches made while one lane was busy
    assert both.diffs == []


def _random_view(rng: random.Random) -> SchedulerView:
    now = 50.0
    dec = []
    for i in range(rng.choice([0, 1, 3, 40, 256])):
        out = rng.randint(1, 300)
        r = Request(f"d{i}", [7] * rng.randint(10, 8000), SamplingParams(max_new_tokens=out + rng.randint(1, 600)),
                    arrival_time=now - 10, seed=0)
        r.output_ids = [5] * out
        r.state, r.num_computed = ReqState.RUNNING, r.seq_len - 1
        r.last_token_time = now - rng.uniform(0, 0.09)
        dec.append(r)
    wait = [Request(f"w{i}", [7] * rng.choice([1, 17, 300, 2048, 9000, 30000]), SamplingParams(max_new_tokens=50),
                    arrival_time=now - rng.uniform(0, 3), seed=0) for i in range(rng.choice([0, 1, 5, 60]))]
    kv_total = 400_000
    return SchedulerView(now=now, waiting=wait, prefilling=[], decoding=dec, inflight={}, idle_lanes=ALL_LANES,
                         kv_free=rng.choice([kv_total, 60_000, 3_000]), kv_total=kv_total,
                         num_running=len(dec), config=CoreConfig(kv_slots=kv_total + 1, context_length=40960,
                                                                 max_running_requests=512))


def test_compiled_search_equals_numpy_on_random_views(both):
    rng = random.Random(7)
    for i in range(300):
        pol = load_policy("duet", PolicyContext(chunked_prefill_size=rng.choice([2048, 8192]),
                                                tbt_slo_ms=rng.choice([30.0, 100.0]), ttft_slo_ms=1000.0,
                                                cost_model=CM, hardware=CM.hw, lanes=1 if i % 5 == 4 else 2))
        for lane, cal in pol.calibration.items():  # calibrated as after some launches
            cal.a, cal.b = rng.uniform(0.8, 1.3), rng.uniform(0.8, 1.3)
        pol.search(_random_view(rng))
    assert both.searches == 300 and both.splits > 50 and both.longer > 0
    assert both.diffs == []


def test_without_numba_the_policy_plans_the_same(monkeypatch):
    """The option `compiled: false` (and a host without numba) runs the numpy path: the same plans."""
    rng = random.Random(3)
    views = [_random_view(rng) for _ in range(40)]
    plans = {}
    for compiled in (True, False):
        ctx = PolicyContext(chunked_prefill_size=8192, tbt_slo_ms=100.0, ttft_slo_ms=1000.0, cost_model=CM,
                            hardware=CM.hw, options={"compiled": compiled})
        pol = load_policy("duet", ctx)
        assert pol.compiled is compiled
        plans[compiled] = [repr(pol.plan(v)) for v in views]
    assert plans[True] == plans[False]
    assert sum(p != "None" for p in plans[True]) > 20


def test_compiled_decode_steps_equal_numpy():
    """The decode lane's k steps (priced every plan while a prefill runs), compiled and in numpy."""
    from sglang_duet.policies.duet_search import decodes_of

    rng = random.Random(11)
    pols = {c: load_policy("duet", PolicyContext(chunked_prefill_size=8192, tbt_slo_ms=100.0, ttft_slo_ms=1000.0,
                                                 cost_model=CM, hardware=CM.hw, options={"compiled": c}))
            for c in (True, False)}
    compared = 0
    for _ in range(200):
        v = _random_view(rng)
        a, b = rng.uniform(0.8, 1.3), rng.uniform(0.8, 1.3)
        for pol in pols.values():
            cal = pol.calibration[next(k for k in pol.calibration if k.value == "decode")]
            cal.a, cal.b = a, b
        dec = decodes_of(v, 8)
        if not dec.n:
            continue
        sms, k = rng.choice(pols[True].grid), rng.randint(1, 10)
        got, want = (pols[c]._decode_steps(dec, sms, k) for c in (True, False))
        assert _same(got.t, want.t) and _same(got.P, want.P)
        compared += 1
    assert compared > 100


def test_compiled_and_numpy_policies_plan_the_same_with_a_lane_busy():
    """Every lane-pair state (the busy-lane ones read the kept partition's best from the compiled
    search): the same plans and decisions from both paths."""
    from sglang_duet.benchmark.policy_overhead import make_views

    decisions = {True: [], False: []}
    for compiled in (True, False):
        for seed, (batch, queue) in enumerate([(16, 0), (64, 3), (256, 40), (256, 300), (700, 20)]):
            for state, v in make_views(batch, queue, seed).items():
                ctx = PolicyContext(chunked_prefill_size=8192, tbt_slo_ms=100.0, ttft_slo_ms=1000.0, cost_model=CM,
                                    hardware=CM.hw, options={"compiled": compiled})
                pol = load_policy("duet", ctx)
                plan = pol.plan(v)
                decisions[compiled].append((state, repr(plan), pol.last.move, pol.last.reason))
    assert decisions[True] == decisions[False]
    assert {d[2].value for d in decisions[True]} >= {"launch", "wait for partner"}


def test_a_compiler_failure_falls_back_to_numpy(monkeypatch, caplog):
    """A numba that cannot compile the kernels (too old, too new) leaves duet planning with numpy."""
    def broken(*args, **kwargs):
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(duet_scoring, "warm_up", broken)
    import sglang_duet.policies.duet as duet_module

    monkeypatch.setattr(duet_module, "warm_up", broken)
    ctx = PolicyContext(chunked_prefill_size=8192, tbt_slo_ms=100.0, ttft_slo_ms=1000.0, cost_model=CM, hardware=CM.hw)
    with caplog.at_level("WARNING"):
        pol = load_policy("duet", ctx)
    assert pol.compiled is False and "planning with numpy" in caplog.text
    ref = load_policy("duet", PolicyContext(chunked_prefill_size=8192, tbt_slo_ms=100.0, ttft_slo_ms=1000.0,
                                            cost_model=CM, hardware=CM.hw, options={"compiled": False}))
    rng = random.Random(5)
    views = [_random_view(rng) for _ in range(20)]
    assert [repr(pol.plan(v)) for v in views] == [repr(ref.plan(v)) for v in views]
