"""The constant-step device (`--executor emulated --emulated-step-ms`, cost_model/constant.py) under
every policy: duet prices with a cost model that has no operator inventory, and a server's policy
plans with the constant step once the device is installed, not with the roofline it started with."""
from __future__ import annotations

import os
import sys

import pytest

from sglang_duet.cost_model.constant import ConstantCostModel, install_constant_device
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.policies.base import BUILTIN_POLICIES, PolicyContext, load_policy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmark.policy_overhead import make_views  # noqa: E402

ROOFLINE = CostModel.load("qwen3-8b", "h100")


@pytest.mark.parametrize("name", sorted(BUILTIN_POLICIES))
def test_every_policy_plans_every_lane_state_on_a_constant_step(name):
    cm = ConstantCostModel.like(ROOFLINE, 0.01)
    pol = load_policy(name, PolicyContext(chunked_prefill_size=8192, tbt_slo_ms=100.0, ttft_slo_ms=1000.0,
                                          cost_model=cm, hardware=ROOFLINE.hw))
    for state, view in make_views(16, 4).items():
        plan = pol.plan(view)  # duet used to fail here: the constant model has no `_ops`
        if plan is not None and name == "duet":
            # every launch costs the one step: what duet predicts for each lane is a whole number of steps
            for lane, ms in plan.predicted_ms.items():
                assert ms == pytest.approx(round(ms / 10.0) * 10.0) and ms >= 10.0, (state, lane, ms)


def test_duet_work_weights_from_batch_time_alone():
    """A model whose time does not grow with context: the work of a prefill is its tokens (wA = 0);
    one that does: wA > 0, and the fit gives back both weights of a linear model."""
    from sglang_duet.policies.pricing import SummaryPricer

    const = SummaryPricer(ConstantCostModel.like(ROOFLINE, 0.01))
    assert not const.exact
    w_t, w_a = const.work_weights()
    assert w_a == 0.0 and w_t == pytest.approx(10.0 / 1024)

    class Linear(ConstantCostModel):  # 2 us per token and 1 ns per attention pair, nothing else
        def batch_time(self, reqs, sms=None, bandwidth_share=1.0):
            return sum(2e-6 * n + 1e-9 * n * (c + (n + 1) / 2) for n, c in reqs)

    w_t, w_a = SummaryPricer(Linear.like(ROOFLINE, 0.01)).work_weights()
    assert w_t == pytest.approx(2e-3) and w_a == pytest.approx(1e-6)


def test_installing_the_constant_device_rebuilds_the_policy_on_it():
    from sglang_duet.engine_core import EngineCore
    from sglang_duet.sampling_params import SamplingParams
    from sglang_duet.server_args import ServerArgs

    e = EngineCore(ServerArgs(executor="emulated", model_config=f"{REPO}/configs/models/smollm2-135m.json",
                              max_total_tokens=20000, policy="duet", lanes="1"))
    before = e.policy
    assert before.pricer.cm is not None and not isinstance(before.pricer.cm, ConstantCostModel)
    cm = install_constant_device(e, 4.0)
    assert e.policy is not before and e.core.policy is e.policy and type(e.policy) is type(before)
    assert e.policy.pricer.cm is cm and e.policy.ctx.cost_model is cm
    predicted = []
    plan = e.policy.plan

    def recording(view):
        p = plan(view)
        if p is not None:
            predicted.extend(p.predicted_ms.values())
        return p

    e.policy.plan = recording
    for i in range(8):
        e.add_request(f"c{i}", list(range(100, 200)), SamplingParams(max_new_tokens=3, ignore_eos=True))
    while e.has_work():
        e.step(0.05)
    assert predicted and all(ms == pytest.approx(4.0) for ms in predicted)  # one lane: one step a launch
