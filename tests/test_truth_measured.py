"""The measured truth's parameters (cost_model/truth.py, executor/emulated.py): host time not hidden
by overlap, a prefill-step scale, two-lane contention read from a measurement, and truth files.

Their defaults leave the emulator as it was (a simulation's numbers pinned from the commit before
they existed); each parameter moves exactly what it names on the emulated device's virtual clock."""
from __future__ import annotations

import os

import pytest

from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, ReqWork
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.cost_model.truth import TruthConfig
from sglang_duet.executor.emulated import EmulatedExecutor
from sglang_duet.simulator.loop import SimConfig, simulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUTH_FILE = os.path.join(ROOT, "configs", "truth", "h200-2026-11-30.yaml")
QUIET = dict(noise_sigma=0.0, host_base_s=0.0, host_per_req_s=0.0, switch_s=0.0)  # only what a test turns on


@pytest.fixture(scope="module")
def cm():
    return CostModel.load("qwen3-8b", "h200")


_ids = iter(range(1, 10**6))


def _launch(lane: LaneKind, sms, rows, steps: int = 1) -> Launch:
    lid = next(_ids)
    work = [ReqWork(f"r{lid}_{i}", [1] * q, c, [], True, steps=steps) for i, (q, c) in enumerate(rows)]
    return Launch(lid, lane, LaneBatch(), work, sms)


def _finish(ex: EmulatedExecutor, launch: Launch) -> float:
    """Run the virtual clock until `launch`'s final part; its end time."""
    while True:
        for r in ex.poll(None):
            if r.launch_id == launch.launch_id and r.final:
                return r.finished_at


# ---- defaults ----------------------------------------------------------------------------------


def test_defaults_leave_a_simulation_as_it_was_before_these_parameters():
    # Sums of every token's delivery time, launches and spans, from the commit before the measured
    # truth existed (e3b06ae), default truth on an H200: the new defaults must not move one bit.
    golden = {"chunked": (23203.968005645, {"aggregated": 956, "prefill": 0, "decode": 0}, 5.843641121),
              "static-split": (24009.163231954, {"aggregated": 0, "prefill": 44, "decode": 932}, 6.984312863),
              "duet": (23775.509870299, {"aggregated": 911, "prefill": 6, "decode": 7}, 5.946110603)}
    for pol, opts in (("chunked", {}), ("static-split", {"decode_sms": 48}), ("duet", {})):
        res = simulate(SimConfig(policy=pol, hardware="h200", rate=12.0, num_requests=40, seed=1, policy_options=opts))
        got = (round(sum(t for r in res.records for t in r.token_times), 9), res.stats["launches"],
               round(res.sim_time_s, 9))
        assert got == golden[pol], pol


def test_describe_names_the_new_fields_only_when_they_are_set():
    assert set(TruthConfig().describe()) == {"hardware", "perturb", "noise_sigma", "seed", "host_base_s",
                                             "host_per_req_s", "switch_s", "contention", "per_request_attention"}
    d = TruthConfig(host_hidden=False, prefill_step_scale=1.1, contention="measured",
                    contention_points=((32, 1.3, 1.1),)).describe()
    assert (d["host_hidden"], d["prefill_step_scale"], d["contention_points"]) == (False, 1.1, [[32.0, 1.3, 1.1]])


# ---- each parameter ----------------------------------------------------------------------------


def test_prefill_step_scale_stretches_steps_with_a_multi_token_row_only(cm):
    def times(scale):
        ex = EmulatedExecutor(cm, clock_mode="virtual", truth=TruthConfig(prefill_step_scale=scale, **QUIET))
        out = []
        for rows in ([(2048, 1024), (1, 500)], [(1, 1000)] * 16):  # a mixed step, then a decode-only one
            start = ex.now()
            launch = _launch(LaneKind.AGGREGATED, None, rows)
            ex.submit(launch)
            out.append(_finish(ex, launch) - start)
        return out

    (mixed1, dec1), (mixed2, dec2) = times(1.0), times(1.25)
    assert mixed2 == pytest.approx(1.25 * mixed1, rel=1e-12)
    assert dec2 == dec1


def test_host_time_is_serial_when_not_hidden_by_overlap(cm):
    def end_of_second(hidden):
        truth = TruthConfig(noise_sigma=0.0, host_base_s=2e-3, host_per_req_s=0.0, switch_s=0.0,
                            host_hidden=hidden)
        ex = EmulatedExecutor(cm, clock_mode="virtual", truth=truth)
        a = _launch(LaneKind.AGGREGATED, None, [(1, 1000)] * 8)
        b = _launch(LaneKind.AGGREGATED, None, [(1, 1000)] * 8)
        ex.submit(a)
        ex.submit(b)  # queued behind a (overlap scheduling)
        dev = ex.price(b).device_s
        return _finish(ex, b), dev

    hidden, dev = end_of_second(True)
    serial, _ = end_of_second(False)
    assert hidden == pytest.approx(2e-3 + 2 * dev, rel=1e-9)  # b's host time ran beside a
    assert serial == pytest.approx(2 * (2e-3 + dev), rel=1e-9)


def _beside(cm, truth: TruthConfig, sd: int, sp: int) -> tuple[float, float]:
    """(decode slowdown, prefill slowdown) of a decode launch on sd SMs inside a long prefill on sp SMs."""
    ex = EmulatedExecutor(cm, clock_mode="virtual", truth=truth)
    pre = _launch(LaneKind.PREFILL, sp, [(8192, 0)])
    ex.submit(pre)
    dec = _launch(LaneKind.DECODE, sd, [(1, 1024)] * 32)
    alone = ex.price(dec).device_s
    ex.submit(dec)
    prefill_rate = next(r.rate for r in ex._running.values() if r.launch is pre)
    return _finish(ex, dec) / alone, 1 / prefill_rate


def test_measured_contention_slows_each_lane_by_its_interpolated_factor(cm):
    truth = TruthConfig(contention="measured", contention_points=((64, 1.2, 1.15), (32, 1.32, 1.09)), **QUIET)
    assert _beside(cm, truth, 32, 100) == pytest.approx((1.32, 1.09), rel=1e-9)
    assert _beside(cm, truth, 48, 84) == pytest.approx((1.26, 1.12), rel=1e-9)  # halfway
    assert _beside(cm, truth, 16, 116) == pytest.approx((1.32, 1.09), rel=1e-9)  # clamped below
    assert _beside(cm, truth, 96, 36) == pytest.approx((1.2, 1.15), rel=1e-9)  # clamped above
    phase = _beside(cm, TruthConfig(contention="phase", **QUIET), 32, 100)
    assert phase[0] < 1.1  # the bandwidth-share model: the GPU measured x1.32 where it says ~x1.03


def test_measured_contention_leaves_a_lane_alone_at_its_own_time(cm):
    truth = TruthConfig(contention="measured", contention_points=((32, 1.32, 1.09),), **QUIET)
    ex = EmulatedExecutor(cm, clock_mode="virtual", truth=truth)
    dec = _launch(LaneKind.DECODE, 32, [(1, 1024)] * 32)
    ex.submit(dec)
    assert _finish(ex, dec) == pytest.approx(ex.price(dec).device_s, rel=1e-12)


@pytest.mark.parametrize("kw, msg", [
    (dict(contention="measured"), "needs contention_points"),
    (dict(contention_points=((32, 0.9, 1.1),)), "decode x >= 1"),
    (dict(prefill_step_scale=0.0), "prefill_step_scale"),
])
def test_bad_measured_parameters_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TruthConfig(**kw)


# ---- parse and files ---------------------------------------------------------------------------


def test_parse_reads_the_measured_keys_and_refuses_bad_ones():
    t = TruthConfig.parse("host_hidden=0,prefill_step_scale=1.09,contention=measured,"
                          "contention_points=32:1.32:1.09/64:1.21:1.15")
    assert (t.host_hidden, t.prefill_step_scale, t.contention) == (False, 1.09, "measured")
    assert t.contention_points == ((32.0, 1.32, 1.09), (64.0, 1.21, 1.15))
    with pytest.raises(ValueError, match="decode_sms:decode_x:prefill_x"):
        TruthConfig.parse("contention_points=32:1.3")
    with pytest.raises(ValueError, match="boolean"):
        TruthConfig.parse("host_hidden=maybe")


def test_truth_file_sets_the_fitted_values_and_a_spec_overrides_them():
    t = TruthConfig.from_file(TRUTH_FILE, seed=4)
    assert (t.host_base_s, t.host_per_req_s) == pytest.approx((1096e-6, 38.7e-6))
    assert (t.host_hidden, t.prefill_step_scale, t.contention, t.per_request_attention, t.seed) == (
        False, 1.09, "measured", False, 4)
    assert t.lane_slowdowns(32) == pytest.approx((1.318, 1.091))
    over = TruthConfig.parse(f"file={TRUTH_FILE},noise=0,prefill_step_scale=1.2")
    assert (over.noise_sigma, over.prefill_step_scale, over.host_hidden) == (0.0, 1.2, False)
    ab = TruthConfig.from_file(os.path.join(ROOT, "configs", "truth", "h200-2026-11-30-ab-contention.yaml"))
    assert ab.host_base_s == t.host_base_s  # built on the first file (a path relative to its own folder)
    assert ab.lane_slowdowns(48) == pytest.approx((1.3995, 1.133))


def test_truth_file_that_is_not_a_mapping_is_refused(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        TruthConfig.from_file(str(bad))


def test_simulate_reads_a_truth_file_and_its_flags_apply_over_it():
    from sglang_duet.simulate import base_config, parse_args

    cfg = base_config(parse_args(["--truth-file", TRUTH_FILE, "--seed", "3", "--truth-noise", "0"]))
    t = cfg.truth
    assert (t.contention, t.prefill_step_scale, t.host_hidden, t.seed, t.noise_sigma) == ("measured", 1.09, False, 3, 0.0)


def test_measured_contention_without_points_is_refused_by_the_executor(cm):
    with pytest.raises(ValueError, match="needs a truth with contention_points"):
        EmulatedExecutor(cm, clock_mode="virtual", contention="measured", truth=TruthConfig())
