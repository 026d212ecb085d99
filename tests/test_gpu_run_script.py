"""scripts/gpu_run.sh, the one command a lent GPU runs: its phase logic, checked on a CPU.

A lease is 15 minutes of device time; a script that reports success while a phase never ran (an
arithmetic syntax error once dropped the whole test phase) wastes it. GPU_RUN_DRY=1 runs every
phase's shell logic with each python command only checking itself (--help, pytest --collect-only).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_run.sh"


def _run(tmp_path, call, **env):
    e = dict(os.environ, GPU_RUN_DRY="1", GPU_RUN_WORK=str(tmp_path / "work"), OUT=str(tmp_path / "out"),
             GPU_RUN_PYTHON=sys.executable)
    e.update(env)
    p = subprocess.run(["bash", str(SCRIPT), call], cwd=REPO, env=e, capture_output=True, text=True, timeout=300)
    summary = tmp_path / "work" / f"summary-{'_'.join(call.split())}.txt"
    lines = summary.read_text().splitlines() if summary.exists() else []
    return p, {ln.split()[0]: ln.split()[1] for ln in lines}


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_runs_every_phase_of_both_calls(tmp_path):
    p1, s1 = _run(tmp_path, "lease1")
    assert p1.returncode == 0, p1.stdout + p1.stderr
    assert s1 == {"smoke": "ok", "prewarm": "ok", "tests": "ok", "duet": "ok"}
    p2, s2 = _run(tmp_path, "lease2")
    assert p2.returncode == 0, p2.stdout + p2.stderr
    assert s2 == {"prewarm": "ok", "bench": "ok", "calibrate": "ok", "ab": "ok"}
    # the pytest phases really collected the GPU suite (not an empty selection)
    assert "collected" in (tmp_path / "work" / "tests.log").read_text()
    with tarfile.open(tmp_path / "out" / "results-lease2.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("summary-lease2.txt") for n in names) and any(n.endswith("bench.log") for n in names)
    assert not (REPO / "sglang_duet" / "kernels").is_symlink()  # a dry run leaves the checkout alone


def test_third_call_and_a_chosen_phase_list(tmp_path):
    """lease3 (after a first lease) runs the fused-op tests and the torch-ops A/B too; a quoted list
    runs exactly those phases, in the script's order, and names its files without spaces."""
    p, s = _run(tmp_path, "lease3", GPU_RUN_AB_SEEDS="3", GPU_RUN_AB_RATE="20", GPU_RUN_AB_REQUESTS="96",
                GPU_RUN_AB_POLICIES="aggregated chunked:2048 static-split+decode_sms=48 duet")
    assert p.returncode == 0, p.stdout + p.stderr
    assert s == {k: "ok" for k in ("prewarm", "fused", "tests", "bench", "bench_torch_ops", "calibrate", "ab")}
    log = (tmp_path / "work" / "gpu_run.log").read_text()
    assert "--seeds 3" in log and "SGLANG_DUET_TORCH_OPS=1" in log
    assert "--num-requests 96 --rate 20" in log
    assert "--policies aggregated chunked:2048 static-split+decode_sms=48 duet" in log
    assert "test_gpu_fused_ops.py" in log
    # a chosen list runs in the script's order; without a calibration of this call the A/B plans with
    # the committed one of a past lease
    p, s = _run(tmp_path, "ab bench_triton fused", GPU_RUN_HW="h200")
    assert p.returncode == 0, p.stdout + p.stderr
    assert list(s) == ["fused", "bench_triton", "ab"]
    assert (tmp_path / "out" / "results-ab_bench_triton_fused.tgz").exists()
    log = (tmp_path / "work" / "gpu_run.log").read_text()
    assert "--attention-backend triton" in log
    assert "--hardware configs/hardware/h200-calibrated.yaml" in log
    p, _ = _run(tmp_path, "ab nonsense")
    assert p.returncode == 2 and "usage" in p.stderr


def test_a_failing_phase_fails_the_call_and_the_rest_still_run(tmp_path):
    p, s = _run(tmp_path, "lease2", GPU_RUN_PYTHON="false")
    assert p.returncode == 1
    assert s == {"prewarm": "FAILED", "bench": "FAILED", "calibrate": "FAILED", "ab": "FAILED"}


def test_phases_without_time_are_skipped_not_run(tmp_path):
    p, s = _run(tmp_path, "lease2", GPU_RUN_BUDGET_S="20")
    assert p.returncode == 0
    assert set(s.values()) == {"skipped"}


def test_unknown_call_is_a_usage_error(tmp_path):
    p, _ = _run(tmp_path, "everything")
    assert p.returncode == 2 and "usage" in p.stderr
