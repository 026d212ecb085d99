"""benchmark/gpu_ab_emulated.py: the GPU A/B's traces and settings replayed through the emulator.

Runs on the first lease's committed results (H200, 2026-11-30): the measured row must be the
results file's own numbers, and each emulated run must replay the GPU run's trace (same requests,
same lengths), which the request counts and token totals check."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmark", "results", "gpu", "h200-2026-11-30", "ab.json")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_ab_emulated", os.path.join(ROOT, "benchmark", "gpu_ab_emulated.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def doc():
    with open(RESULTS) as f:
        return json.load(f)


def test_measured_row_is_the_results_files_own(doc):
    mod = _module()
    got = mod.measured(doc)
    assert got[("duet", 0)] == doc["runs"][3]["delivery"]["goodput_strict_req_s"]
    assert set(got) == {(p, 0) for p in ("aggregated", "chunked", "static-split", "duet")}


def test_emulation_replays_the_gpu_trace(doc):
    mod = _module()
    meta = doc["meta"]
    m = mod.emulate(meta, "chunked", meta["policy_settings"]["chunked"], 0, "h200", None)
    gpu = next(r for r in doc["runs"] if r["policy"] == "chunked")
    assert m["num_requests"] == gpu["requests"] == 64
    # every request ran to its length: the emulator served the same trace the GPU did
    def tokens(d):
        return round(d["throughput_tok_s"] * d["sim_time_s"])

    assert tokens(m) == tokens(gpu["delivery"]) > 64
    assert 0 < m["goodput_strict_req_s"]


def test_table_has_every_source_and_ratio(doc, tmp_path, capsys):
    mod = _module()
    out = tmp_path / "t.md"
    assert mod.main([RESULTS, "--hardware", "h200", "--out", str(out)]) == 0
    text = out.read_text()
    for label in ("GPU (measured)", "emulator, truth on", "emulator, exact"):
        assert f"| {label} | 0 |" in text
    # duet 6.224 over chunked 5.985 (and over the best of the others, chunked too), medians over one seed
    assert "| GPU (measured) | median | | | | | 1.04 | | 1.04 |" in text
