"""benchmark/cpu_vs_peer.py's bookkeeping: medians over rounds per server and load, ratios ours/peer
and the targets (throughput >= peer, latencies <= peer), the report. No servers are started."""
from __future__ import annotations

from benchmark import cpu_vs_peer as cvp


def _rec(tag, tput, tpot, ttft, itl=10.0):
    return {"tag": tag, "output_throughput": tput, "median_tpot_ms": tpot, "median_ttft_ms": ttft,
            "median_itl_ms": itl}


def test_medians_ratios_and_targets():
    records = [_rec("ours/burst", 100, 40, 900), _rec("peer/burst", 150, 30, 1000),
               _rec("ours/burst", 300, 20, 800), _rec("peer/burst", 170, 34, 1200),
               _rec("ours/burst", 200, 30, 700), _rec("peer/burst", 160, 32, 1100),
               _rec("ours/serial", 20, 15, 50)]  # no peer record for serial: no row
    summary = cvp.summarize(records)
    assert summary["burst"]["ours"] == {"output_throughput": 200, "median_tpot_ms": 30, "median_ttft_ms": 800}
    assert summary["burst"]["peer"]["output_throughput"] == 160
    rows = {(r[0], r[1]): r for r in cvp.ratio_rows(summary)}
    assert set(rows) == {("burst", "output_throughput"), ("burst", "median_tpot_ms"), ("burst", "median_ttft_ms")}
    assert rows["burst", "output_throughput"][4] == 200 / 160 and rows["burst", "output_throughput"][5]
    assert rows["burst", "median_tpot_ms"][4] == 30 / 32 and rows["burst", "median_tpot_ms"][5]
    assert rows["burst", "median_ttft_ms"][5]  # 800 <= 1100
    worse = cvp.ratio_rows(cvp.summarize([_rec("ours/burst", 100, 40, 900), _rec("peer/burst", 150, 30, 1000)]))
    assert [r[5] for r in worse] == [False, False, True]
    text = cvp.render(list(rows.values()), {"peer_name": "vLLM-CPU fp32", "machine": "test box", "command": "x",
                                            "ours": "u", "peer": "p", "rounds": 3, "load_before": 1.0,
                                            "load_after": 2.0})
    assert "vLLM-CPU fp32" in text and "| burst | output_throughput | 200.0 | 160.0 | 1.25 (want >= 1) | yes |" in text


def test_loads_are_the_issue_table():
    burst = cvp.LOADS["burst"]
    assert (burst.num_prompts, burst.max_concurrency, burst.request_rate) == (32, 16, float("inf"))
    assert cvp.LOADS["rate1"].request_rate == 1.0 and cvp.LOADS["serial"].max_concurrency == 1
    a = cvp.bench_args(burst, "http://h:1", "/tok", 3, quick=False, tag="ours/burst")
    assert (a.backend, a.random_input_len, a.random_output_len, a.num_prompts, a.max_concurrency) == \
        ("openai", 128, 64, 32, 16)
    assert a.random_range_ratio == 1.0 and a.base_url == "http://h:1" and a.seed == 3
