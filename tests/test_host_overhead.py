"""benchmark/host_overhead.py: its accounting (device limit, critical-path deltas, event parsing)
and a smoke run on a tiny setting. Counts only: nothing here depends on how fast the machine is."""
from __future__ import annotations

import math
import sys

import pytest

from server_utils import REPO

sys.path.insert(0, REPO)

from benchmark import host_overhead as ho  # noqa: E402


def test_device_limit_counts_prefill_steps():
    # 256 x 16 prompt tokens fit one 8192-token prefill step; then 255 decode steps of 256 tokens
    limit, steps = ho.device_limit(256, 16, 256, 0.010, 8192)
    assert steps == 256 and limit == pytest.approx(256 * 256 / (256 * 0.010))
    # 1024 x 16 = 16384 prompt tokens: two prefill steps
    assert ho.device_limit(1024, 16, 256, 0.010, 8192)[1] == 257
    assert ho.device_limit(1, 16, 1, 0.010, 8192) == (pytest.approx(100.0), 1)


def test_critical_path_delta():
    edges = [0.1, 0.5, 1.0]
    before = {"critical_path": {"gaps": 10, "gap_s": 0.002, "wake_s": 0.001, "cpu_s": 0.001, "hist": [5, 5, 0, 0],
                                "edges_ms": edges}}
    after = {"critical_path": {"gaps": 110, "gap_s": 0.052, "wake_s": 0.011, "cpu_s": 0.031, "hist": [5, 55, 49, 1],
                               "edges_ms": edges}}
    d = ho.critical_path_delta(before, after)
    assert d["gaps"] == 100
    assert d["mean_ms"] == pytest.approx(0.5) and d["wake_ms"] == pytest.approx(0.1)
    assert d["cpu_ms"] == pytest.approx(0.3)
    assert d["p50_ms"] == 0.5 and d["p99_ms"] == 1.0
    assert math.isnan(ho.critical_path_delta(after, after)["mean_ms"])


def test_completion_tokens_from_event():
    ev = b'data: {"text":"say \\"completion_tokens\\": 99","output_ids":[1,2],"meta_info":{"id":"x",' \
         b'"prompt_tokens":3,"completion_tokens":12,"cached_tokens":0}}'
    assert ho.completion_tokens(ev) == 12


def test_last_completion_tokens_of_a_read():
    """The raw client scans each read (several events, or a part of one) for the last complete count."""
    two = b'data: {"meta_info":{"completion_tokens":4}}\n\ndata: {"meta_info":{"completion_tokens":5}}\n\n'
    assert ho.last_completion_tokens(two) == 5
    cut = two[:-6]  # '..."completion_tokens":5' with nothing after the number: maybe 57, not complete
    assert ho.last_completion_tokens(cut) == 4
    assert ho.last_completion_tokens(b'data: {"text":"x"') is None


def test_smoke_run_accounting(tmp_path):
    """A few streams, a few tokens, a 2 ms step: every token arrives, the launches are at least the
    minimum the device needs, one critical-path gap per launch after the first of each level,
    and the markdown table is written."""
    out = tmp_path / "r.md"
    rows = ho.main(["--streams", "1,3", "--output-len", "6", "--step-ms", "2", "--repeats", "1",
                    "--stream-interval", "2", "--out", str(out), "--title", "smoke"])
    assert [r["streams"] for r in rows] == [1, 3]
    for r in rows:
        assert r["errors"] == []
        assert r["tokens"] == r["expected"] == r["streams"] * 6
        assert r["min_steps"] == 6  # one prefill step (the first token), five decode steps
        assert r["launches"] >= r["min_steps"]
        # overlap scheduling (the default): the decode steps are handed over while the step before
        # them runs, so they follow no idle gap; every launch is one or the other, or the level's first
        assert r["cp"]["overlapped"] >= 1
        assert r["cp"]["gaps"] + r["cp"]["overlapped"] == r["launches"] - 1
        assert 0 < r["busy"] <= 1.05
        assert 0 <= r["cp"]["idle_gaps"] <= r["launches"] - 1 and r["cp"]["idle_ms"] >= 0
        assert r["limit_tok_s"] == pytest.approx(r["streams"] * 6 / (6 * 0.002))
        assert r["ratio"] == pytest.approx(r["tok_s"] / r["limit_tok_s"])
        # --stream-interval 2 over 6 tokens: events at tokens 1, 3, 5, 6 (fewer if merged)
        assert r["streams"] <= r["events"] <= 4 * r["streams"]
        assert set(r["cpu_s"]) >= {"main", "scheduler", "detokenizer", "client"}
    text = out.read_text()
    assert "## smoke" in text and "| 3 | 18 |" in text and "host_overhead.py --streams 1,3" in text


def test_server_args_for_the_constant_device(capsys):
    from sglang_duet.server.args import parse_args

    a = parse_args(["--executor", "emulated", "--emulated-step-ms", "10", "--stream-interval", "8"])
    assert a.emulated_step_ms == 10.0 and a.stream_interval == 8
    assert parse_args([]).stream_interval == 1 and parse_args([]).emulated_step_ms is None
    for bad, msg in ((["--emulated-step-ms", "10"], "--emulated-step-ms needs --executor emulated"),
                     (["--executor", "emulated", "--emulated-step-ms", "0"], "--emulated-step-ms 0.0: must be positive"),
                     (["--stream-interval", "0"], "--stream-interval 0: must be at least 1")):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_cpu_per_step_runs_the_real_loop_pieces_in_process(tmp_path):
    """--cpu-per-step: the scheduler process's, the detokenizer's and the main process's fan-out work
    per decode step, in process,
    on a virtual clock: every request decodes in the measured steps, the parts add up to at most
    the scheduler's total, and the table is written (values are CPU times: only their shape is checked)."""
    out = tmp_path / "cpu.md"
    rows = ho.main(["--cpu-per-step", "--streams", "4,16", "--repeats", "1", "--out", str(out)])
    assert [r["streams"] for r in rows] == [4, 16]
    for r in rows:
        assert r["steps"] > 0 and r["scheduler"] > 0 and r["detok"] > 0 and r["main"] > 0
        assert r["events"] == r["steps"] * r["streams"]  # every stream's handler sent one event per step
        assert r["apply"] + r["plan"] + r["executor"] <= r["engine"] * 1.01 + 1e-6
    text = out.read_text()
    assert "| batch | scheduler ms/step" in text and "| 16 |" in text
