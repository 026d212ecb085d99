"""The cost model's fitted step terms (cost_model/fit.py) and the offline refit
(`python -m sglang_duet.calibrate --refit`): defaults change nothing, the fit recovers known
terms, the committed H200 calibration is what the refit of the committed measurements gives."""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from sglang_duet import calibrate
from sglang_duet.cost_model import fit as F
from sglang_duet.cost_model.hardware import HardwareSpec, HardwareSpecError, StepTerms
from sglang_duet.cost_model.roofline import CostModel

REPO = Path(__file__).resolve().parents[1]
# The committed calibration is the one of the model as it runs now (fused norm/RoPE/SiLU kernels, third
# call of the 2026-11-30 lease); the earlier call's data (torch ops) stays beside it for the record.
DATA = REPO / "benchmark" / "results" / "gpu" / "h200-2026-11-30-fused-calibration"
COMMITTED = REPO / "configs" / "hardware" / "h200-calibrated.yaml"

SHAPES = [[(1, 1024)], [(1, 4096)] * 32, [(1, 1024)] * 128, [(1024, 0)], [(8192, 0)],
          [(512, 100), (1, 3000), (1, 50)], [(3000, 0)] + [(1, 2000 + 37 * i) for i in range(100)]]
# batch_time of SHAPES with the roofline before the step terms existed (same code path otherwise)
BEFORE = {
    ("h100", None): [0.0063070504, 0.013590908835820896, 0.013988847462686567, 0.02163441783878011,
                     0.19688750888732878, 0.011451829161300836, 0.08376420133807373],
    ("h100", 16): [0.013572478181818181, 0.03012670189959295, 0.03785889099819059, 0.15916827325270386,
                   1.5196169034919684, 0.08003603806701591, 0.5150414201700843],
    ("h200", None): [0.004582592466666667, 0.009666118666666664, 0.009943846666666666, 0.02087752317708857,
                     0.19181515013807504, 0.010898292829957551, 0.07507649736692944],
    ("h200", 16): [0.0134504111827957, 0.029848882795698927, 0.037698318529157455, 0.15911469591796992,
                   1.5192578529181513, 0.08000419003707762, 0.5144366371479515],
}
KNOWN = {"gemm_efficiency": 0.7, "gemm_pad_rows": 48.0, "gemm_bandwidth_efficiency": 1.1,
         "attention_efficiency": 0.5, "activation_traffic": 5.0, "launch_overhead_s": 12e-6}


@pytest.mark.parametrize("hw,sms", sorted(BEFORE, key=str))
def test_default_predictions_are_unchanged(hw, sms):
    cm = CostModel.load("qwen3-8b", hw)
    assert cm.hw.step_terms == StepTerms()
    assert [cm.batch_time(s, sms) for s in SHAPES] == BEFORE[(hw, sms)]  # bit for bit


def test_neutral_terms_change_nothing_and_bad_terms_are_refused():
    spec = HardwareSpec.load("h200")
    neutral = F.apply(spec, F.params_of(F.theta_of(spec)))
    a, b = CostModel.load("qwen3-8b", "h200"), CostModel(CostModel.load("qwen3-8b", "h200").model, neutral)
    assert [a.batch_time(s, 32) for s in SHAPES] == [b.batch_time(s, 32) for s in SHAPES]
    for bad in ({"gemm_efficiency": 0}, {"gemm_bandwidth_efficiency": -1}, {"gemm_pad_rows": -1},
                {"activation_traffic": -0.5}):
        with pytest.raises(HardwareSpecError, match=next(iter(bad))):
            StepTerms(**bad)


def test_each_term_moves_the_operators_it_names():
    base = CostModel.load("qwen3-8b", "h200")
    ops0 = {o[0]: o for o in base._ops([(1, 100)] * 8)}
    terms = StepTerms(gemm_efficiency=0.5, gemm_pad_rows=8, gemm_bandwidth_efficiency=2.0, activation_traffic=3.0)
    cm = CostModel(base.model, dataclasses.replace(base.hw, step_terms=terms))
    ops = {o[0]: o for o in cm._ops([(1, 100)] * 8)}
    # 8 rows (T = R = 8): 8 padding rows double a GEMM's FLOPs, efficiency 0.5 doubles them again
    for name in F.GEMM_OPS:
        assert ops[name][1] == pytest.approx(4 * ops0[name][1]) and ops[name][2] == pytest.approx(ops0[name][2] / 2)
    for name in ("embed", "attn_norm", "qk_norm", "rope", "mlp_norm", "act", "final_norm"):
        assert ops[name][1] == ops0[name][1] and ops[name][2] == pytest.approx(3 * ops0[name][2])
    assert ops["attention"] == ops0["attention"]


def _calibrated_curves() -> HardwareSpec:
    points = [calibrate.SizePoint(**p) for p in json.loads((DATA / "points.json").read_text())]
    c, b = calibrate.curves(points)
    base = HardwareSpec.load("h200")
    return dataclasses.replace(base, curves=dataclasses.replace(
        base.curves, compute=type(base.curves.compute)(tuple(c)), bandwidth=type(base.curves.bandwidth)(tuple(b))))


def _rows(cm: CostModel, sizes=(16, 32, 64, 96, 132)) -> list[F.StepRow]:
    shapes = [("decode", b, c) for b in (1, 32, 128) for c in (1024, 4096)] + [("prefill", 1, n) for n in (1024, 4096)]
    rows = [F.StepRow(k, s, b, t, 1.0) for s in sizes for k, b, t in shapes]
    return [dataclasses.replace(r, measured_ms=F.predict_ms(cm, r)) for r in rows]


def test_fit_recovers_known_terms_from_rows_the_model_generated():
    curves = _calibrated_curves()
    truth = CostModel(CostModel.load("qwen3-8b", "h200").model, F.apply(curves, KNOWN))
    rows = _rows(truth)
    got = F.fit(rows, CostModel(truth.model, curves))  # starts from the base file's terms
    for k, v in KNOWN.items():
        assert got.params[k] == pytest.approx(v, rel=1e-6), k
    assert got.median_abs_error < 1e-9
    # the fit's linearisation is the roofline itself: its in-sample prediction is batch_time's
    model = CostModel(truth.model, F.apply(curves, got.params))
    assert got.predicted_ms == pytest.approx([F.predict_ms(model, r) for r in rows], rel=1e-9)


def test_fit_respects_the_datasheet_bounds_and_held_out_protocols():
    curves = _calibrated_curves()
    # GEMMs 'faster than the datasheet' in the rows: the fit stops at the bound
    fast = dict(KNOWN, gemm_efficiency=2.0)
    truth = CostModel(CostModel.load("qwen3-8b", "h200").model, F.apply(curves, fast))
    rows = _rows(truth)
    got = F.fit(rows, CostModel(truth.model, curves))
    assert got.params["gemm_efficiency"] == pytest.approx(curves.peak_flops_bf16 / curves.compute())
    ev = F.evaluate(rows[:20], CostModel(truth.model, curves), CostModel.load("qwen3-8b", "h200"))
    assert all(x is not None for x in ev.held_out_size_ms) and all(x is not None for x in ev.held_out_shape_ms)
    with pytest.raises(ValueError, match="unknown terms"):
        F.fit(rows, CostModel(truth.model, curves), free=("gemm_time", "nope"))


def test_nnls_matches_the_best_active_set():
    rng = np.random.default_rng(7)
    for _ in range(40):
        A = rng.normal(size=(12, 5))
        y = rng.normal(size=12)
        x = F.nnls(A, y)
        assert (x >= 0).all()
        best = min((np.linalg.norm(A @ _ls(A, y, s) - y) for n in range(6) for s in itertools.combinations(range(5), n)
                    if (_ls(A, y, s) >= 0).all()))
        assert np.linalg.norm(A @ x - y) == pytest.approx(best, rel=1e-9, abs=1e-12)


def _ls(A, y, cols) -> np.ndarray:
    x = np.zeros(A.shape[1])
    if cols:
        x[list(cols)] = np.linalg.lstsq(A[:, list(cols)], y, rcond=None)[0]
    return x


def test_refit_of_the_committed_measurements_gives_the_committed_calibration(tmp_path):
    out = tmp_path / "h200-calibrated.yaml"
    md = tmp_path / "refit.md"
    assert calibrate.main(["--refit", str(DATA / "points.json"), "--rows", str(DATA / "report.json"),
                           "--step-latency", str(DATA / "step_latency.json"), "--out", str(out),
                           "--report", str(md), "--quiet"]) == 0
    got, want = yaml.safe_load(out.read_text()), yaml.safe_load(COMMITTED.read_text())
    assert got["base"] == want["base"] == "h200"
    assert got["compute_curve"] == want["compute_curve"] and got["bandwidth_curve"] == want["bandwidth_curve"]
    for k in ("gemm_efficiency", "gemm_pad_rows", "gemm_bandwidth_efficiency", "attention_efficiency",
              "activation_traffic", "launch_overhead_s"):
        assert got[k] == pytest.approx(want[k], rel=1e-6), k
    v = got["measured"]["validation"]
    assert v["rows"] == 43 and v["model"] == "qwen3-8b"  # 35 device rows + 8 step-latency rows
    for k, x in want["measured"]["validation"].items():
        assert v[k] == (pytest.approx(x, rel=1e-6) if isinstance(x, float) else x), k
    assert v["median_abs_error_held_out_sm_count"] <= 0.10 and v["median_abs_error_in_sample"] <= 0.10
    assert v["median_abs_error_before"] > 0.1  # the shipped estimates were off
    assert "held out" in md.read_text() and "step_latency" in md.read_text()
    # the committed file loads by name, with its terms, and the policies' pricers stay exact on it
    cm = CostModel.load("qwen3-8b", "h200-calibrated")
    assert cm.hw.step_terms.gemm_pad_rows == pytest.approx(want["gemm_pad_rows"])
    assert cm.hw.launch_overhead_s == pytest.approx(want["launch_overhead_s"])


def test_pricers_stay_exact_on_the_calibrated_terms():
    from policies.pricing import SummaryPricer
    from sglang_duet.cost_model.truth import TruthPricer

    cm = CostModel.load("qwen3-8b", str(COMMITTED))
    assert SummaryPricer(cm).exact  # affine in the batch summary: the vectorised path prices it
    p = TruthPricer(cm, per_request_attention=False)
    for shape in SHAPES:
        for sms in (None, 32):
            assert p.price([(q, c, 1) for q, c in shape], sms).step_s == [pytest.approx(cm.batch_time(shape, sms),
                                                                                      rel=1e-9)]


def test_refit_cli_errors_name_the_flag(tmp_path, capsys):
    out = tmp_path / "x.yaml"
    with pytest.raises(SystemExit) as e:
        calibrate.main(["--refit", str(DATA / "points.json"), "--out", str(out)])
    assert e.value.code == 2 and "--rows" in capsys.readouterr().err
    assert calibrate.main(["--refit", str(tmp_path / "missing.json"), "--rows", str(DATA / "report.json"),
                           "--out", str(out), "--quiet"]) == 2
    assert "--refit" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text(json.dumps({"rows": [], "base": "h200"}))
    assert calibrate.main(["--refit", str(DATA / "points.json"), "--rows", str(tmp_path / "empty.json"),
                           "--out", str(out), "--quiet"]) == 2
    assert "no model-step rows" in capsys.readouterr().err
    assert not out.exists()


def test_device_run_fits_the_step_terms_and_survives_a_missing_step_latency_file(tmp_path):
    """The CPU smoke mode runs the device path: the fit's terms land in the file and the report."""
    from test_calibrate_smoke import TINY

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "cpu.yaml"
    assert calibrate.main(["--device", "cpu", "--quick", "--model-config", str(cfg), "--hardware", "h100",
                           "--out", str(out), "--step-latency", str(tmp_path / "absent.json"), "--quiet"]) == 0
    d = yaml.safe_load(out.read_text())
    assert set(F.params_of(np.ones(6))) <= set(d)  # every fitted term written
    rep = json.loads((tmp_path / "cpu.report.json").read_text())
    assert rep["fit"]["params"] == {k: d[k] for k in rep["fit"]["params"]}
    assert all(r["held_out_ms"] is not None for r in rep["rows"])  # two sizes: each predicted by the other
    assert rep["measured"]["quick"] is True
    # and the refit of what it saved gives the same terms
    again = tmp_path / "again.yaml"
    assert calibrate.main(["--refit", str(tmp_path / "cpu.points.json"), "--rows", str(tmp_path / "cpu.report.json"),
                           "--model-config", str(cfg), "--dtype-bytes", "4", "--out", str(again), "--quiet"]) == 0
    d2 = yaml.safe_load(again.read_text())
    for k in rep["fit"]["params"]:
        assert d2[k] == pytest.approx(d[k], rel=1e-6), k


def test_the_fits_linear_form_is_the_roofline_for_any_terms():
    """Per side of each max(), the roofline is linear in theta: the fit's features give batch_time
    exactly for random terms, on rows where every operator's side flips (huge padding, batched prefills)."""
    curves = _calibrated_curves()
    model = CostModel.load("qwen3-8b", "h200").model
    bare = CostModel(model, F.bare(curves))
    rng = np.random.default_rng(3)
    rows = [F.StepRow("prefill", 32, 4, 512, 1.0), F.StepRow("decode", 132, 64, 2048, 1.0),
            F.StepRow("prefill", 8, 1, 8192, 1.0), F.StepRow("decode", 16, 1, 100, 1.0)]
    for _ in range(20):
        theta = np.array([rng.uniform(0.8, 3), rng.uniform(0, 5000), rng.uniform(0.8, 3), rng.uniform(0.8, 3),
                          rng.uniform(0, 20), rng.uniform(0, 5e-5)])
        cm = CostModel(model, F.apply(curves, F.params_of(theta)))
        for r in rows:
            assert F._features(bare, r).predict(theta) * 1e3 == pytest.approx(F.predict_ms(cm, r), rel=1e-12)


def test_a_cpu_calibration_on_a_gpu_calibration_drops_the_gpu_step_terms():
    from sglang_duet.cost_model.cpu_calibration import CpuCalibration, cpu_spec

    cal = CpuCalibration(key="k", compute=1e11, attention=5e10, bandwidth=2e10, per_step_s=0.0, per_request_s=0.0,
                         median_rel_err=0.0, points=[])
    assert HardwareSpec.load(COMMITTED).step_terms != StepTerms()
    assert cpu_spec(HardwareSpec.load(COMMITTED), cal).step_terms == StepTerms()
