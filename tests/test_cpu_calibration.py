"""The CPU cost model (sglang_duet/cost_model/cpu_calibration.py): on a CPU, a policy that plans with
the cost model gets one fitted from timed forward passes of the actual model (cached per model and
machine), not the GPU hardware file. Checked by structure and counts, never by speed."""
from __future__ import annotations

import json

import pytest

from sglang_duet.cost_model import cpu_calibration as cc
from sglang_duet.cost_model.hardware import HardwareSpec
from sglang_duet.cost_model.roofline import CostModel

pytestmark = pytest.mark.timeout(300)


def test_fit_recovers_a_known_cpu():
    """Points priced by a CpuCostModel with known parameters: the fit finds parameters that price
    them (almost) exactly."""
    model = CostModel.load("smollm2-135m", "h100").model
    base = HardwareSpec.load("h100")
    truth = cc.CpuCalibration("k", compute=5e10, attention=2e10, bandwidth=8e9, per_step_s=0.004, per_request_s=0.0015)
    cm_true = cc.cpu_cost_model(model, base, truth, 4)
    shapes = [[(16, 0)], [(128, 0)], [(512, 0)], [(1, 32)], [(1, 32)] * 8, [(1, 512)] * 8, [(1, 128)] * 32]
    points = [(s, cm_true.batch_time(s)) for s in shapes]
    params, err = cc.fit(CostModel(model, base, 4), points)
    assert err < 0.05, (params, err)
    cal = cc.CpuCalibration("k", *params)
    cm_fit = cc.cpu_cost_model(model, base, cal, 4)
    for s, t in points:
        assert abs(cm_fit.batch_time(s) - t) / t < 0.1


def test_cpu_cost_model_is_priced_alike_by_the_policies_pricer():
    """The host terms are operators, so SummaryPricer's vectorised pricing stays exact."""
    from sglang_duet.policies.base import SummaryPricer

    model = CostModel.load("smollm2-135m", "h100").model
    cal = cc.CpuCalibration("k", 5e10, 2e10, 8e9, 0.004, 0.0015)
    cm = cc.cpu_cost_model(model, HardwareSpec.load("h100"), cal, 4)
    assert SummaryPricer(cm).exact
    # a decode step of R requests costs at least R host times more than an empty one would
    assert cm.decode_time(8, 64) - cm.decode_time(1, 64) >= 7 * 0.0015


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_DUET_CACHE", str(tmp_path))
    monkeypatch.delenv("SGLANG_DUET_CPU_COST_MODEL", raising=False)
    # the wiring, not the busy-machine gate (tests/test_cpu_calibration_noise.py): the timing here
    # is always cached, whatever else runs on the machine
    monkeypatch.setattr(cc, "wait_clock", lambda: (lambda: 0.0))
    monkeypatch.setattr(cc, "MAX_CACHED_ERR", float("inf"))
    return tmp_path / "cpu-calibration"


def test_a_cpu_policy_gets_the_calibrated_model(tiny_model_factory, cache, monkeypatch):
    from sglang_duet.engine import Engine

    import sglang_duet.engine_core as engine_core

    built = []
    real_load = engine_core.load_policy

    def counting_load(name, ctx=None):
        built.append(ctx)
        return real_load(name, ctx)

    monkeypatch.setattr(engine_core, "load_policy", counting_load)
    tiny = tiny_model_factory("smollm")
    eng = Engine(tiny, policy="duet", max_total_tokens=4096)
    try:
        assert len(built) == 1 and isinstance(built[0].cost_model, cc.CpuCostModel)  # built once, calibrated
        ctx = eng.core.policy.ctx
        assert eng.core.core.policy is eng.core.policy  # the core plans with the rebuilt policy
        assert isinstance(ctx.cost_model, cc.CpuCostModel) and ctx.hardware.name.startswith("cpu-calibrated")
        assert ctx.cost_model.hw is ctx.hardware and ctx.hardware.source.startswith("cpu-calibration:")
        files = list(cache.glob("*.json"))
        assert len(files) == 1
        saved = json.loads(files[0].read_text())
        assert len(saved["points"]) >= 4 and all(p["seconds"] > 0 for p in saved["points"])
        # prefill and decode shapes were both timed
        assert any(len(p["reqs"]) == 1 and p["reqs"][0][1] == 0 for p in saved["points"])
        assert any(len(p["reqs"]) > 1 for p in saved["points"])
        assert eng.generate("Hello", {"max_new_tokens": 4, "temperature": 0})["meta_info"]["completion_tokens"] == 4
    finally:
        eng.shutdown()

    # a second start loads the cache: no timing at all
    def no_timing(*a, **k):
        raise AssertionError("the cached calibration should have been used")

    monkeypatch.setattr(cc, "measure", no_timing)
    eng = Engine(tiny, policy="chunked", max_total_tokens=4096)
    try:
        assert eng.core.policy.ctx.hardware.measured["compute"] == saved["compute"]
    finally:
        eng.shutdown()
    # policies that do not plan with the cost model, or the opt-out, keep the configured hardware
    for policy, env in (("aggregated", "1"), ("duet", "0")):
        monkeypatch.setenv("SGLANG_DUET_CPU_COST_MODEL", env)
        eng = Engine(tiny, policy=policy, max_total_tokens=4096)
        try:
            assert not isinstance(eng.core.policy.ctx.cost_model, cc.CpuCostModel)
        finally:
            eng.shutdown()
    assert len(list(cache.glob("*.json"))) == 1


def test_the_cache_key_names_what_changes_a_rank_s_timings(monkeypatch):
    import torch

    model = CostModel.load("smollm2-135m", "h100").model
    key = cc.calibration_key(model, "torch.float32", "TorchAttention")
    assert key == cc.calibration_key(model, "torch.float32", "TorchAttention", 1, 1)
    others = {cc.calibration_key(model, "torch.float32", "TorchAttention", 2),
              cc.calibration_key(model, "torch.float32", "TorchAttention", 2, 2),
              cc.calibration_key(model, "torch.bfloat16", "TorchAttention"),
              cc.calibration_key(model, "torch.float32", "OtherAttention"),
              cc.calibration_key(model, "torch.float32", "TorchAttention", cpu_paths=("packed",)),
              cc.calibration_key(model, "torch.float32", "TorchAttention", cpu_paths=("packed", "compiled"))}
    monkeypatch.setattr(torch, "get_num_threads", lambda: 977)
    others.add(cc.calibration_key(model, "torch.float32", "TorchAttention"))
    assert len(others) == 7 and key not in others


def test_timed_batches_never_hold_more_kv_than_the_pool():
    """A small pool shortens the decode shapes' contexts (the two-lane executor's static decode
    buffers are sized from the pool: `--lanes 2 --max-total-tokens 1024` failed at start-up with
    "4128 kv indices exceed the static buffer"), and every decode shape is still timed."""
    class Recorder:
        def __init__(self):
            self.kv = []

        def run(self, launch):
            self.kv.append(sum(len(w.kv_slots) for w in launch.work))

    for capacity, context in [(1023, 4096), (100_000, 300)]:
        ex = Recorder()
        points = cc.measure(ex, capacity, context, budget_s=1e9)
        assert max(ex.kv) <= capacity
        decodes = [p.reqs for p in points if p.reqs[0][0] == 1]
        assert [len(r) for r in decodes] and sorted(len(r) for r in decodes) == sorted(b for b, _ in cc.DECODE_SHAPES)
        assert all(c + 1 < context for reqs in decodes for _, c in reqs)


def test_the_cpu_paths_of_an_executor():
    from types import SimpleNamespace as NS

    eager = NS(model=NS(has_packed_weights=False), decode_step=None)
    assert cc.cpu_paths(eager) == ()
    packed = NS(model=NS(has_packed_weights=True), decode_step=NS(active=False))  # a compile that failed
    assert cc.cpu_paths(packed) == ("packed",)
    both = NS(model=NS(has_packed_weights=True), decode_step=NS(active=True))
    assert cc.cpu_paths(both) == ("packed", "compiled")
