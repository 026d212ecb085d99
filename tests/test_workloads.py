"""Workload sampling, arrival processes, trace replay and SLO presets."""
import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest

from sglang_duet.workloads import (DEFAULT_TRACE_DIR, TRACE_DIR_ENV, QuantileLengths, RequestSpec,
                                   Workload, WorkloadError, load_slo, load_slo_presets)

TRACE_DIR = Path(os.environ.get(TRACE_DIR_ENV) or DEFAULT_TRACE_DIR)
needs_traces = pytest.mark.skipif(not (TRACE_DIR / "azure_conv_2023.csv").exists(),
                                  reason="shared traces not present")

# Published medians (workloads.md): (input p50, output p50).
MEDIANS = {"azure-conv": (1020, 129), "azure-code": (1469, 13), "arxiv-sum": (2730, 167),
           "sharegpt4": (1730, 415)}


def _arrays(reqs):
    return (np.array([r.arrival_s for r in reqs]), np.array([r.input_len for r in reqs]),
            np.array([r.output_len for r in reqs]))


@pytest.mark.parametrize("name", sorted(MEDIANS))
def test_quantile_medians_reproduced(name):
    _, ins, outs = _arrays(Workload.load(name).sample(20000, rate=1.0, seed=0))
    p50_in, p50_out = MEDIANS[name]
    assert abs(np.median(ins) / p50_in - 1) < 0.05
    assert abs(np.median(outs) / p50_out - 1) < 0.05
    assert ins.min() >= 1 and outs.min() >= 1


def test_quantile_inverse_cdf():
    q = QuantileLengths.from_pairs([[0, 10], [50, 20], [100, 100]])
    assert q.quantile(25) == 15 and q.quantile(75) == 60
    with pytest.raises(WorkloadError):
        QuantileLengths.from_pairs([[0, 1], [50, 2]])  # does not reach p100


def test_poisson_rate():
    arr, _, _ = _arrays(Workload.load("sharegpt4").sample(20000, rate=4.0, seed=3))
    assert arr[0] == 0.0 and np.all(np.diff(arr) >= 0)
    assert abs((len(arr) - 1) / arr[-1] / 4.0 - 1) < 0.05
    gaps = np.diff(arr)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.1


def test_gamma_cv():
    w = Workload.load("azure-conv", arrival={"process": "gamma", "cv": 2.0})
    arr, _, _ = _arrays(w.sample(20000, rate=5.0, seed=4))
    gaps = np.diff(arr)
    assert abs(gaps.std() / gaps.mean() / 2.0 - 1) < 0.10
    assert abs(1 / gaps.mean() / 5.0 - 1) < 0.05
    assert Workload.load("azure-code").cv == 13.2


def test_default_rate_and_infinite_rate():
    arr, _, _ = _arrays(Workload.load("azure-conv").sample(5000, seed=0))
    assert abs((len(arr) - 1) / arr[-1] / 5.53 - 1) < 0.05
    assert all(r.arrival_s == 0.0 for r in Workload.load("fixed").sample(10, rate=math.inf))
    with pytest.raises(WorkloadError):
        Workload.load("sharegpt4").sample(10)  # no default rate


def test_deterministic_per_seed():
    w = Workload.load("azure-code")
    a = w.sample(500, rate=2.0, seed=7)
    assert a == w.sample(500, rate=2.0, seed=7)
    assert a != w.sample(500, rate=2.0, seed=8)
    assert isinstance(a[0], RequestSpec)
    # Arrivals come from their own stream: same seed and rate, same times for any lengths.
    b = Workload.load("sharegpt4", arrival={"process": "gamma", "cv": 13.2}).sample(500, rate=2.0, seed=7)
    assert [r.arrival_s for r in a] == [r.arrival_s for r in b]


def test_fixed_and_uniform():
    reqs = Workload.load("fixed", input_len=2048, output_len=64).sample(50, rate=1.0)
    assert {(r.input_len, r.output_len) for r in reqs} == {(2048, 64)}
    _, ins, outs = _arrays(Workload.load("uniform", input_range=[100, 200],
                                         output_range=[5, 5]).sample(5000, rate=1.0))
    assert ins.min() >= 100 and ins.max() <= 200 and abs(ins.mean() - 150) < 3 and set(outs) == {5}


def test_unknown_workload():
    with pytest.raises(WorkloadError):
        Workload.load("no-such-workload")


def test_missing_trace_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not shipped"):
        Workload.load("azure-conv-trace", trace_path=str(tmp_path / "absent.csv"))


def _csv_rows(name, n):
    with open(TRACE_DIR / name, newline="") as fh:
        return [row for _, row in zip(range(n), csv.DictReader(fh))]


@needs_traces
def test_azure_trace_replay_reads_the_csv():
    w = Workload.load("azure-conv-trace")
    rows = _csv_rows("azure_conv_2023.csv", 200)
    reqs = w.sample(200)  # as recorded
    t0 = float(rows[0]["arrived_at"])
    for r, row in zip(reqs, rows):
        assert r.input_len == max(1, int(row["num_prefill_tokens"]))
        assert r.output_len == max(1, int(row["num_decode_tokens"]))
        assert r.arrival_s == pytest.approx(float(row["arrived_at"]) - t0)
    assert 5.0 < w.trace.mean_rate < 6.0 and len(w.trace) == 19366
    # Scaled to twice the recorded rate: the same times, halved.
    fast = w.sample(200, rate=2 * w.trace.mean_rate)
    assert [f.arrival_s for f in fast] == pytest.approx([r.arrival_s / 2 for r in reqs])
    # Past the end the replay wraps and time keeps rising.
    tail = Workload.load("azure-conv-trace", start=19360).sample(10)
    assert np.all(np.diff([r.arrival_s for r in tail]) >= 0)


@needs_traces
def test_arxiv_trace_lengths_with_poisson_arrivals():
    w = Workload.load("arxiv-trace")
    rows = _csv_rows("arxiv_summarization.csv", 100)
    reqs = w.sample(100, rate=3.0, seed=1)
    assert [r.input_len for r in reqs] == [int(row["num_prefill_tokens"]) for row in rows]
    assert [r.output_len for r in reqs] == [int(row["num_decode_tokens"]) for row in rows]
    shuffled = Workload.load("arxiv-trace", order="shuffle").sample(100, rate=3.0, seed=1)
    assert [r.input_len for r in shuffled] != [r.input_len for r in reqs]
    with pytest.raises(WorkloadError):
        w.sample(10)  # no arrival times in the file and no rate given


def test_slo_presets():
    presets = load_slo_presets()
    assert {"distserve-chatbot", "distserve-code", "distserve-summarization", "duetserve"} <= set(presets)
    chat = load_slo("distserve-chatbot")
    assert (chat.ttft_s, chat.tpot_s, chat.attainment) == (0.25, 0.1, 0.9)
    assert load_slo("duetserve").tbt_s == 0.1
    assert load_slo("distserve-summarization").ttft_s == 15.0
