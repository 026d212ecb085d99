"""`python -m sglang_duet.calibrate`: the CPU smoke mode runs the whole code path and writes a
calibration file the cost model loads; without a GPU anything else is refused with a clear message."""
from __future__ import annotations

import json

import pytest
import torch

from sglang_duet import calibrate
from sglang_duet.cost_model.hardware import HardwareSpec
from sglang_duet.cost_model.roofline import CostModel

# A one-layer Llama: the smoke run's model steps take milliseconds.
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 512, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


def test_cpu_quick_writes_a_loadable_calibration(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "cal" / "cpu-calibrated.yaml"
    assert calibrate.main(["--device", "cpu", "--quick", "--model-config", str(cfg), "--hardware", "h100",
                           "--out", str(out), "--quiet"]) == 0
    spec = HardwareSpec.load(out)
    assert spec.source == str(out) and spec.measured["quick"] is True
    assert spec.measured["partition_backend"] == "none" and spec.name == "h100" and spec.total_sms == 132
    xs = [p[0] for p in spec.curves.compute.points]
    assert xs == [8, 72, 132]  # three sizes spread over the grid, whole GPU included
    assert all(v > 0 for _, v in spec.curves.compute.points + spec.curves.bandwidth.points)
    assert spec.launch_overhead_s >= 0
    assert CostModel.load("qwen3-8b", str(out)).decode_time(1, 1024, sms=32) > 0
    rep = json.loads((tmp_path / "cal" / "cpu-calibrated.report.json").read_text())
    kinds = {(r["kind"], r["sms"], r["batch"]) for r in rep["rows"]}
    assert kinds == {("decode", s, b) for s in (8, 132) for b in (1, 2)} | {("prefill", 8, 1), ("prefill", 132, 1)}
    assert rep["median_abs_error_before"] is not None and rep["median_abs_error_after"] is not None
    md = (tmp_path / "cal" / "cpu-calibrated.report.md").read_text()
    assert "Median absolute error: before" in md and "QUICK smoke run" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_without_a_gpu(tmp_path, capsys):
    out = tmp_path / "x.yaml"
    assert calibrate.main(["--out", str(out), "--quiet"]) == 2
    assert "--device cpu --quick" in capsys.readouterr().err
    assert calibrate.main(["--device", "cpu", "--out", str(out), "--quiet"]) == 2  # CPU without --quick
    assert not out.exists()


def test_helpers():
    assert calibrate.spread([8, 16, 24, 32, 132], 3) == [8, 24, 132]
    assert calibrate.spread([8, 132], 5) == [8, 132]
    pts = [calibrate.SizePoint(8, 8, 2.0, 5.0), calibrate.SizePoint(9, 8, 3.0, 4.0), calibrate.SizePoint(132, 132, 9, 9)]
    assert calibrate.curves(pts) == ([(8, 3.0), (132, 9)], [(8, 5.0), (132, 9)])
