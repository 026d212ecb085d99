"""benchmark/gpu_ab_emulated.py's --truth, --policy and --latency (the default table is
tests/test_gpu_ab_emulated.py's): on the first lease's one-seed A/B (H200, 2026-11-30)."""
from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmark", "results", "gpu", "h200-2026-11-30", "ab.json")
TRUTH = os.path.join(ROOT, "configs", "truth", "h200-2026-11-30.yaml")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_ab_emulated", os.path.join(ROOT, "benchmark", "gpu_ab_emulated.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(text: str, label: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label} | 0 |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_truth_file_and_policy_variant_add_a_row_and_a_column(tmp_path):
    mod = _module()
    out = tmp_path / "t.md"
    assert mod.main([RESULTS, "--hardware", "h200", "--truth", TRUTH, "--truth", "noise=0",
                     "--policy", "duet+decode_gain=0.25", "--latency", "--out", str(out)]) == 0
    text = out.read_text()
    header = next(ln for ln in text.splitlines() if ln.startswith("| source | seed |"))
    assert "| duet+decode_gain=0.25 |" in header
    gpu, on, measured, quiet = (_row(text, lbl) for lbl in (
        "GPU (measured)", "emulator, truth on", "emulator, h200-2026-11-30", "emulator, noise=0"))
    variant = header.strip("|").split("|").index(" duet+decode_gain=0.25 ")
    assert gpu[variant] == "-"  # the GPU did not run it
    assert measured[variant] != "-" and measured[2:6] != on[2:6]  # the measured truth moves the emulation
    assert quiet[2:6] != on[2:6]  # a spec over the default truth is a truth of its own
    # 'duet / best other' leaves the variant out: the measured row's ratio is duet over the four baselines
    g = {p: float(measured[2 + i]) for i, p in enumerate(["aggregated", "chunked", "static-split", "duet"])}
    best = max(v for k, v in g.items() if k != "duet")
    assert measured[-1] == f"{g['duet'] / best:.2f}"
    assert "TTFT p99 / TBT p99" in text and "| emulator, h200-2026-11-30 | " in text


def test_only_the_given_truth_and_bad_flags(tmp_path, capsys):
    mod = _module()
    out = tmp_path / "t.md"
    assert mod.main([RESULTS, "--hardware", "h200", "--no-default-truths", "--truth", TRUTH, "--out", str(out)]) == 0
    text = out.read_text()
    assert "emulator, truth on" not in text and "| emulator, h200-2026-11-30 | 0 |" in text
    with pytest.raises(SystemExit, match="--truth: no such file"):
        mod.main([RESULTS, "--truth", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="unknown truth option"):
        mod.main([RESULTS, "--truth", "bogus=1"])
    with pytest.raises(SystemExit, match="--policy duet-paper"):
        mod.main([RESULTS, "--policy", "duet-paper+k_max=2"])
    with pytest.raises(SystemExit):
        mod.main([RESULTS, "--no-default-truths"])
    assert "--no-default-truths needs at least one --truth" in capsys.readouterr().err


def test_lane_overlap_counts_only_prefill_beside_decode():
    from types import SimpleNamespace as L

    mod = _module()
    launches = [L(lane="prefill", started=0.0, actual_s=1.0), L(lane="decode", started=0.5, actual_s=0.2),
                L(lane="decode", started=0.9, actual_s=0.3), L(lane="aggregated", started=0.0, actual_s=5.0),
                L(lane="prefill", started=2.0, actual_s=1.0), L(lane="decode", started=2.5, actual_s=1.0)]
    assert mod.lane_overlap(launches) == pytest.approx(0.2 + 0.1 + 0.5)


def test_launches_table_has_the_gpu_counts(tmp_path):
    mod = _module()
    out = tmp_path / "t.md"
    assert mod.main([RESULTS, "--hardware", "h200", "--no-default-truths", "--truth", TRUTH, "--launches",
                     "--out", str(out)]) == 0
    text = out.read_text()
    assert "Launches aggregated / prefill / decode and lane overlap" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| GPU (measured) | ") and " / " in ln)
    import json

    with open(RESULTS) as f:
        duet = next(r for r in json.load(f)["runs"] if r["policy"] == "duet")
    n = duet["executor"]["launches"]
    assert f"{n['aggregated']} / {n['prefill']} / {n['decode']}, {duet['executor']['lane_overlap_s']:.2f}" in line


def test_predictions_table_puts_the_gpu_ratios_beside_the_emulators(tmp_path):
    mod = _module()
    out = tmp_path / "t.md"
    assert mod.main([RESULTS, "--hardware", "h200", "--truth", "off", "--no-default-truths", "--predictions",
                     "--out", str(out)]) == 0
    text = out.read_text()
    import json

    with open(RESULTS) as f:
        chunked = next(r for r in json.load(f)["runs"] if r["policy"] == "chunked")
    gpu = next(ln for ln in text.splitlines() if ln.startswith("| GPU (measured) | ") and " / " in ln)
    assert f"{chunked['measured_over_predicted']['aggregated']['median']:.2f} / - / -" in gpu
    exact = next(ln for ln in text.splitlines() if ln.startswith("| emulator, off | ") and " / " in ln)
    assert "| 1.00 / - / - |" in exact  # the exact truth takes what chunked predicted, launch for launch
