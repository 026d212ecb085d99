"""`--executor emulated --tp-size N`: one process emulates an N-GPU tensor-parallel group, priced by
cost_model/tp.py (N times the compute, bandwidth and memory, plus the all-reduces), with the policy
planning on the same model and the KV pool sized as the group's memory minus the weights once."""
from __future__ import annotations

import os

import pytest

from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.cost_model.tp import TPCostModel
from sglang_duet.executor.emulated import emulated_kv_slots
from sglang_duet.sampling_params import SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN3_14B = os.path.join(REPO, "configs", "models", "qwen3-14b.json")


def test_the_engine_emulates_a_tp_group_in_one_process():
    from sglang_duet.engine import Engine

    eng = Engine(policy="duet", executor="emulated", tp_size=2, model_config=QWEN3_14B,
                 extra={"emulated_time_scale": 0.01, "emulated_truth": "off"})
    try:
        core = eng.core
        assert core.tp_driver is None  # no ranks: the group is priced, not run
        cm = core.executor.cm
        assert isinstance(cm, TPCostModel) and cm.tp == 2 and core.device == "emulated:h100x2"
        ctx = core.policy.ctx
        assert ctx.cost_model is cm and ctx.hardware is cm.hw  # the policy plans on the group's model
        one = CostModel.load("qwen3-14b", "h100")
        assert core.kv_slots == emulated_kv_slots(cm) > 2 * emulated_kv_slots(one)  # the weights count once
        # an all-reduce per layer costs something: a TP step is not one GPU's step halved
        assert cm.batch_time([(512, 0)]) > one.batch_time([(512, 0)]) / 2
        outs = eng.generate(["Hello there", "What is the capital of France?"], {"max_new_tokens": 6})
        assert [o["meta_info"]["completion_tokens"] for o in outs] == [6, 6]
        decided = [d for d in core.policy.decisions if d.predicted_ms is not None]
        assert decided  # duet priced its plans with the TP model
        # the executor times each launch with the group's model (truth off: exactly the belief)
        from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, ReqWork

        work = [ReqWork("x", [5] * 512, 0, list(range(1, 513)), True, 1, 0, SamplingParams(), [], [5] * 512)]
        lc = core.executor.price(Launch(999, LaneKind.AGGREGATED, LaneBatch(), work))
        assert lc.device_s == pytest.approx(cm.batch_time([(512, 0)]), rel=1e-6)
    finally:
        eng.shutdown()


def test_flags_accept_an_emulated_group_and_refuse_what_cannot_work(capsys):
    from sglang_duet.server.args import parse_args

    a = parse_args(["--executor", "emulated", "--tp-size", "2", "--lanes", "2"])  # split lanes: the emulator has them
    assert (a.executor, a.tp_size, a.lanes) == ("emulated", 2, "2")
    with pytest.raises(SystemExit):
        parse_args(["--executor", "emulated", "--tp-size", "2", "--nnodes", "2", "--dist-init-addr", "h:1"])
    assert "--nnodes 2" in capsys.readouterr().err
    a = parse_args(["--tp-size", "2", "--lanes", "2"])  # real ranks split lanes too (a process group pair per lane)
    assert (a.executor, a.tp_size, a.lanes) == ("model", 2, "2")
