"""The discrete-event simulator: completes, is deterministic, reproduces the qualitative TBT story,
and a reduced sweep writes its table and plots."""
from __future__ import annotations

import json
import os

import pytest

from sglang_duet.simulate import main
from sglang_duet.simulator import SimConfig, simulate, summarize
from sglang_duet.simulator.loop import build_cost_model
from sglang_duet.simulator.sweep import crossing
from sglang_duet.workloads import RequestSpec

CM = build_cost_model("qwen3-8b", "h100")


def test_small_run_finishes_every_request_at_its_length():
    specs = [RequestSpec(0.01 * i, 50 + 300 * (i % 4), 5 + i % 7) for i in range(40)]
    res = simulate(SimConfig(policy="duet", chunked_prefill_size=512), specs=specs, cost_model=CM)
    assert len(res.records) == 40
    for r in res.records:
        assert len(r.token_times) == r.output_len
        assert r.token_times[0] > r.arrival and r.token_times == sorted(r.token_times)
    m = summarize(res)
    assert m.num_requests == 40 and 0 < m.ttft_p50_ms < m.ttft_p99_ms and m.throughput_tok_s > 0


def test_deterministic_by_seed():
    cfg = SimConfig(policy="duet", rate=10.0, num_requests=80, chunked_prefill_size=8192)
    a, b = simulate(cfg, cost_model=CM), simulate(cfg, cost_model=CM)
    assert [r.token_times for r in a.records] == [r.token_times for r in b.records]
    cfg.seed = 1
    c = simulate(cfg, cost_model=CM)
    assert [r.input_len for r in a.records] != [r.input_len for r in c.records]


def test_chunked_holds_tbt_where_aggregated_does_not():
    """H100 + Qwen3-8B, azure-conv at 16 req/s: prefill-first stalls every stream behind long prompts."""
    def run(policy, budget):
        cfg = SimConfig(policy=policy, rate=16.0, num_requests=300, chunked_prefill_size=budget)
        return summarize(simulate(cfg, cost_model=CM))

    agg, chunked, duet = run("aggregated", 8192), run("chunked", 2048), run("duet", 8192)
    assert agg.tbt_p99_ms > 100.0 and agg.tbt_max_ms > 300.0
    assert chunked.tbt_p99_ms < 100.0 and chunked.tbt_max_ms < 100.0
    assert duet.tbt_max_ms <= 100.0 and duet.attainment_max_tbt == 1.0
    assert agg.attainment_max_tbt < 0.5  # the strict variant sees the stalls the TPOT mean hides


def test_crossing_interpolates_and_flags_bounds():
    assert crossing([(1, 1.0), (2, 0.95), (3, 0.85)], 0.9) == (pytest.approx(2.5), "")
    assert crossing([(1, 0.5)], 0.9) == (pytest.approx(0.2), "<")
    assert crossing([(1, 1.0), (2, 0.99)], 0.9) == (2, ">")


def test_reduced_sweep_writes_table_and_plots(tmp_path):
    out = tmp_path / "sweep"
    main(["--sweep", "--policies", "chunked:2048,duet:8192", "--workload", "azure-conv", "--num-requests", "60",
          "--start-rate", "20", "--refine", "0", "--out", str(out), "--quiet"])
    summary = (out / "summary.md").read_text()
    assert "| chunked-2048 |" in summary and "| duet-8192 |" in summary and "python -m sglang_duet.simulate" in summary
    data = json.loads((out / "points.json").read_text())
    assert set(data["goodput"]) == {"chunked-2048", "duet-8192"}
    for name in ("attainment.png", "throughput.png", "tbt_cdf.png"):
        p = out / name
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) < 150_000
