"""duet's demand_rate option (policies/duet_feedback.Demand, rate_from): Little's lambda from the
admissions when the queue grows, the arrivals otherwise; off by default."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from policies.duet import DuetPolicy
from policies.duet_feedback import Demand
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.policies.base import PolicyContext


def _req(t: float):
    return SimpleNamespace(arrival_time=t, num_retractions=0, prompt_ids=[7] * 1000, max_new_tokens=150)


def _run(rate_from: str, admit_every: int) -> tuple[float, float]:
    """40 arrivals at 20/s; at every `admit_every`-th arrival the oldest waiting request leaves the
    queue (is admitted). Returns (lambda at the end, the decode-pace target in ms)."""
    d = Demand(window_s=20.0, kv_target=0.75, running_target=0.65, rate_from=rate_from)
    waiting: list = []
    cfg = SimpleNamespace(context_length=32768, max_running_requests=64)
    view = None
    for i in range(40):
        t = i * 0.05
        if i % admit_every == 0 and waiting:
            waiting.pop(0)
        waiting.append(_req(t))
        view = SimpleNamespace(now=t, waiting=waiting, config=cfg, kv_total=200_000)
        d.observe(view)
    return d.rate(view.now), d.target_ms(view, ceiling=85.0)


def test_admitted_rate_follows_admissions_when_the_queue_grows():
    arrivals, tau_arr = _run("arrivals", admit_every=4)
    admitted, tau_adm = _run("admitted", admit_every=4)
    assert arrivals == pytest.approx(40 / 1.95)  # 40 seen over 1.95 s
    assert admitted == pytest.approx(arrivals / 4, rel=0.1)  # about a quarter left the queue
    assert tau_arr < tau_adm <= 85.0  # a slower pace is enough for what is admitted


def test_admitted_rate_is_the_arrival_rate_when_everyone_is_admitted():
    (lam_adm, tau_adm), (lam_arr, tau_arr) = _run("admitted", admit_every=1), _run("arrivals", admit_every=1)
    assert lam_adm == pytest.approx(lam_arr, rel=0.03)  # each admitted as the next arrives: one behind
    assert tau_adm == pytest.approx(tau_arr, rel=0.03)


def test_option_reaches_the_policy_and_defaults_to_arrivals():
    cm = CostModel.load("qwen3-8b", "h200")
    assert DuetPolicy(PolicyContext(cost_model=cm, hardware=cm.hw)).demand.rate_from == "arrivals"
    pol = DuetPolicy(PolicyContext(cost_model=cm, hardware=cm.hw, options={"demand_rate": "admitted"}))
    assert pol.demand.rate_from == "admitted"
    with pytest.raises(ValueError, match="demand_rate must be one of"):
        DuetPolicy(PolicyContext(cost_model=cm, hardware=cm.hw, options={"demand_rate": "served"}))
