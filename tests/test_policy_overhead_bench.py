"""benchmark/policy_overhead.py --simulated: plan() timed over a simulated run (the views a policy
really gets). Its numbers depend on the CPU, so only what it records and how it fails are checked."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmark.policy_overhead import simulated_plans  # noqa: E402
from sglang_duet.policies.duet import DuetPolicy  # noqa: E402

STATES = {"both idle", "prefill running, decode idle", "decode running, prefill idle"}


def test_every_plan_of_a_simulated_run_is_recorded_and_the_policy_is_left_as_it_was():
    plan = DuetPolicy.plan
    first = simulated_plans("duet", "azure-conv", 30.0, 80, 512, "qwen3-8b", "h100")
    assert DuetPolicy.plan is plan
    assert len(first) > 80  # at least a plan per request
    assert {s for s, _, _, _ in first} <= STATES and all(ms >= 0 for *_, ms in first)
    assert any(q > 0 for _, _, q, _ in first) and any(n > 0 for _, n, _, _ in first)
    # the run is deterministic (virtual clock): the same views in the same order, whatever the timing
    again = simulated_plans("duet", "azure-conv", 30.0, 80, 512, "qwen3-8b", "h100")
    assert [r[:3] for r in again] == [r[:3] for r in first]


def test_simulated_flag_names_itself_on_bad_input():
    for bad in ("azure-conv", "azure-conv:x", ":3", "azure-conv:0"):
        out = subprocess.run([sys.executable, "-m", "benchmark.policy_overhead", "--simulated", bad], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "--simulated" in out.stderr, (bad, out.stderr)
