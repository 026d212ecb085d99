"""benchmark/step_latency.py runs end to end on a CPU (--quick) and writes its JSON and markdown."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _load():
    spec = importlib.util.spec_from_file_location("step_latency", os.path.join(ROOT, "benchmark", "step_latency.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_quick_cpu_run(tmp_path):
    mod = _load()
    cfg = os.path.join(ROOT, "configs", "models", "smollm2-135m.json")
    assert mod.main(["--model-config", cfg, "--device", "cpu", "--quick", "--quiet", "--profile",
                     "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "results.json").read_text())
    assert rep["attention_backend"] == "torch" and rep["cuda_graphs"] is False
    assert rep["ceilings"]["copy_bytes_per_s"] > 0 and rep["ceilings"]["matmul_flops_per_s"] > 0
    kinds = {(r["kind"], r["batch"], r["tokens"]) for r in rep["rows"]}
    assert kinds == {("decode", 1, 16), ("decode", 2, 16), ("prefill", 1, 16)}
    for r in rep["rows"]:
        assert r["measured_ms"] > 0 and r["floor_ms"] > 0 and r["predicted_ms"] > 0
        assert r["ratio"] == r["measured_ms"] / r["floor_ms"] or abs(r["ratio"] - r["measured_ms"] / r["floor_ms"]) < 1e-6
    assert rep["median_abs_error"] is not None
    md = (tmp_path / "results.md").read_text()
    assert "| decode | 2 | 16 |" in md and "median absolute error" in md
    # --profile: the smallest decode step and prefill, their ops counted (CPU ops on a CPU)
    assert set(rep["profiles"]) == {"decode b1 ctx 16 (eager)", "prefill 16"}
    for prof in rep["profiles"].values():
        assert prof["events"] >= len(prof["top"]) > 0 and prof["device_ms"] > 0
        assert sum(n for _, n, _ in prof["top"]) <= prof["events"]
    assert "## Kernels of one step" in md and "aten::" in md
