"""The discrete-event simulator: completes, is deterministic, reproduces the qualitative TBT story,
and a reduced sweep writes its table and plots."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from sglang_duet.cost_model.truth import TruthConfig
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


# -- delivery-time tokens and the truth model ---------------------------------------------------
SPECS = [RequestSpec(0.02 * i, 200 + 1500 * (i % 5), 10 + 3 * (i % 9)) for i in range(60)]


def test_exact_truth_gives_the_policy_its_own_predictions():
    """truth == belief, no noise, host time, switch cost or contention: every launch takes what the
    plain cost model says, and the policy's predictions are exact."""
    cfg = SimConfig(policy="chunked", chunked_prefill_size=2048, truth=TruthConfig.exact(contention="none"),
                    record_launches=True)
    res = simulate(cfg, specs=SPECS, cost_model=CM)
    assert len(res.launches) == sum(res.stats["launches"].values()) > 20
    for la in res.launches:
        assert la.actual_s == pytest.approx(la.belief_s, rel=1e-9)
        assert la.predicted_s == pytest.approx(la.actual_s, rel=1e-9)


def test_perturbed_truth_moves_launch_times_away_from_the_predictions():
    f = 0.85
    cfg = SimConfig(policy="chunked", chunked_prefill_size=2048, record_launches=True,
                    truth=TruthConfig.exact(contention="none", perturb=(f, f)))
    res = simulate(cfg, specs=SPECS, cost_model=CM)
    ratios = sorted(la.actual_s / la.predicted_s for la in res.launches)
    # every roofline term is 1/f slower; only the fixed kernel overhead is not
    assert 1.0 < ratios[0] and ratios[-1] <= 1 / f + 1e-9
    assert ratios[len(ratios) // 2] > 1 / f - 0.03
    for la in res.launches:
        assert la.predicted_s == pytest.approx(la.belief_s, rel=1e-9)  # the policy still plans with its belief


def test_truth_noise_is_reproducible_per_seed():
    def run(seed):
        cfg = SimConfig(policy="duet", chunked_prefill_size=8192, truth=TruthConfig(seed=seed))
        return [r.token_times for r in simulate(cfg, specs=SPECS, cost_model=CM).records]

    assert run(3) == run(3) and run(3) != run(4)


def test_tokens_are_timed_at_delivery_one_step_at_a_time():
    """k-step decode launches release each step's tokens when the step ends: a request never gets two
    tokens at one instant, and its gaps are the steps it waited for."""
    from sglang_duet.simulator.metrics import all_gaps

    specs = [RequestSpec(0.0, 100, 60) for _ in range(8)] + [RequestSpec(0.3 + 0.05 * i, 7000, 4) for i in range(4)]
    cfg = SimConfig(policy="static-split", chunked_prefill_size=8192, record_launches=True,
                    policy_options={"lookahead": 4}, truth=TruthConfig.exact(contention="none"))
    res = simulate(cfg, specs=specs, cost_model=CM)
    assert any(la.steps > 1 for la in res.launches), "no k-step launch to test"
    gaps = all_gaps(res.records)
    assert gaps.min() > 0
    for r in res.records:
        assert len(r.token_times) == r.output_len


def test_truth_flags():
    from sglang_duet.simulate import base_config, parse_args

    on = base_config(parse_args(["--seed", "5"]))
    assert on.truth == TruthConfig(seed=5) and on.contention is None
    off = base_config(parse_args(["--truth", "off", "--truth-perturb", "0.85,1.15", "--truth-seed", "2"]))
    assert off.truth == TruthConfig.exact(perturb=(0.85, 1.15), seed=2)
    mixed = base_config(parse_args(["--truth-hardware", "h200", "--truth-noise", "0", "--truth-host-us", "50,5",
                                    "--truth-switch-us", "0", "--truth-attention", "summed", "--contention", "none"]))
    t = mixed.truth
    assert (t.hardware, t.noise_sigma, t.switch_s) == ("h200", 0.0, 0.0)
    assert (t.host_base_s, t.host_per_req_s) == (pytest.approx(50e-6), pytest.approx(5e-6))
    assert not t.per_request_attention and mixed.contention == "none"


# ---- goodput tables (multi-seed, tuned baselines) --------------------------------------------------


def test_policy_spec_options_reach_the_policy():
    from sglang_duet.simulator.sweep import PolicySpec, spec_config

    s = PolicySpec.parse("static-split:8192+decode_sms=40+ttft_order=deadline")
    assert (s.policy, s.chunked_prefill_size, s.label) == ("static-split", 8192, "static-split-8192-sd40-ttft_order=deadline")
    cfg = spec_config(SimConfig(policy_options={"lookahead": 2}), s)
    assert cfg.policy_options == {"lookahead": 2, "decode_sms": 40, "ttft_order": "deadline"}
    assert PolicySpec.parse("chunked:512").label == "chunked-512"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        PolicySpec.parse("duet+oops")


def test_find_goodput_brackets_and_interpolates():
    from sglang_duet.simulator.goodput_table import find_goodput

    calls = []

    def attain(rate):  # falls linearly from 1 at rate 10 to 0 at rate 20: crosses 0.9 at 11
        calls.append(rate)
        return min(1.0, max(0.0, (20 - rate) / 10))

    g = find_goodput(attain, start=4.0, rel_tol=0.02)
    assert g.flag == "" and g.rate == pytest.approx(11.0, rel=0.02)
    assert len(calls) == len(set(calls))  # no rate simulated twice
    low = find_goodput(attain, start=40.0)  # starting above: shrinks into a bracket
    assert low.flag == "" and low.rate == pytest.approx(11.0, rel=0.07)
    never = find_goodput(lambda r: 0.0, start=1.0, min_rate=0.5)
    assert never.flag == "<"
    always = find_goodput(lambda r: 1.0, start=1.0, max_rate=10.0)
    assert always.flag == ">" and always.rate <= 10.0


def test_t_interval_and_paired_ratios():
    from sglang_duet.simulator.goodput_table import Goodput, SeedRun, summarise_table, t_interval

    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(m - lo) and hi - m == pytest.approx(4.303 / 3 ** 0.5, rel=1e-3)
    assert t_interval([5.0]) == (5.0, 5.0, 5.0)

    def runs(vals):
        return [SeedRun(i, {"attainment_max_tbt": Goodput(v, ""), "attainment": Goodput(2 * v, "")})
                for i, v in enumerate(vals)]

    s = summarise_table({"base": runs([10.0, 20.0]), "duet-8192": runs([12.0, 20.0])})
    assert s["base"]["attainment_max_tbt"]["duet_ratio_per_seed"] == [pytest.approx(1.2), 1.0]
    assert s["base"]["attainment_max_tbt"]["duet_ratio_ci"][0] == pytest.approx(1.1)


def test_seed_picks_a_trace_window_and_the_truth_noise():
    from sglang_duet.simulator.goodput_table import seed_config

    cfg = seed_config(SimConfig(workload="arxiv-trace"), 2, 100)
    assert cfg.workload_options == {"start": 200} and cfg.truth.seed == 2 and cfg.seed == 2
    assert seed_config(SimConfig(workload="azure-conv"), 2, 100).workload_options == {}


def test_goodput_table_command_writes_md_and_json(tmp_path):
    """A tiny table: one member per family, two seeds, a handful of requests."""
    from sglang_duet.simulator import goodput_table

    out = tmp_path / "t"
    assert goodput_table.main(["--workload", "azure-conv", "--seeds", "2", "--num-requests", "30",
                               "--tune-requests", "30", "--chunked-budgets", "2048", "--static-sms", "32",
                               "--contenders", "duet:8192", "--start-rate", "8", "--rel-tol", "0.3",
                               "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "table.json").read_text())
    assert {"aggregated-8192", "duet-8192"} < set(data["summary"]) and len(data["summary"]) == 4
    assert data["tuning"]["static-split"]["best"].startswith("static-split-8192-sd32")
    # the best of the grid was tried with the deadline queue order too
    assert "chunked-2048-ttft_order=deadline" in data["tuning"]["chunked"]["members"]
    row = data["summary"][data["tuning"]["chunked"]["best"]]["attainment_max_tbt"]
    assert len(row["per_seed"]) == 2 and len(row["duet_ratio_per_seed"]) == 2
    md = (out / "table.md").read_text()
    assert "goodput_table" in md and "best chunked (tuned)" in md and "| duet-8192 |" in md


def test_goodput_table_passes_the_tp_size_through(tmp_path, monkeypatch):
    """--tp-size 2: every simulated point is a TP group of 2 priced by the TP cost model (the
    policies' too), and the table gives goodput per GPU."""
    from sglang_duet.cost_model.tp import TPCostModel
    from sglang_duet.simulator import goodput_table

    seen = []
    real = goodput_table.simulate

    def recording(cfg, cost_model=None):
        seen.append((cfg.tp_size, getattr(cost_model, "tp", None)))
        return real(cfg, cost_model=cost_model)

    monkeypatch.setattr(goodput_table, "simulate", recording)
    out = tmp_path / "t"
    assert goodput_table.main(["--workload", "azure-conv", "--model", "qwen3-14b", "--tp-size", "2", "--seeds", "2",
                               "--num-requests", "20", "--tune-requests", "20", "--chunked-budgets", "2048",
                               "--static-sms", "32", "--baseline-orders", "", "--contenders", "duet:8192",
                               "--start-rate", "4", "--rel-tol", "0.5", "--out", str(out), "--quiet"]) == 0
    # every point: a group of 2 in the config and in the cost model it is priced with (tuning and the
    # per-seed runs pass theirs in)
    assert seen and all(tp == 2 and cm == 2 for tp, cm in seen), seen
    assert isinstance(goodput_table.build_cost_model("qwen3-14b", "h100", 2), TPCostModel)
    data = json.loads((out / "table.json").read_text())
    assert data["tp_size"] == 2 and "x 2 (tensor parallel)" in data["title"]
    md = (out / "table.md").read_text()
    assert "strict per GPU (/2)" in md and "--tp-size 2" in md
    row = data["summary"]["duet-8192"]["attainment_max_tbt"]["mean_ci"]
    assert f"{row[0] / 2:.2f}" in md.split("| duet-8192 |")[1].split("\n")[0]
    with pytest.raises(SystemExit):
        goodput_table.main(["--tp-size", "0", "--out", str(out)])


def test_cluster_sim_runs_on_the_truth_it_is_given():
    """Disaggregated instances are timed by the same truth as colocated runs (not the exact model)."""
    from sglang_duet.disagg.cluster_sim import ClusterConfig, load_tp_cost_model, simulate_cluster
    from sglang_duet.disagg.placement import SearchConfig
    from sglang_duet.cost_model.truth import truth_cost_model

    specs = [RequestSpec(0.05 * i, 400, 20) for i in range(12)]
    exact = simulate_cluster(ClusterConfig(truth=None), specs)
    slow = simulate_cluster(ClusterConfig(truth=TruthConfig.exact(perturb=(0.5, 0.5))), specs)
    assert slow.sim_time_s > exact.sim_time_s
    assert slow.config.truth.perturb == (0.5, 0.5)
    # a TP group's truth keeps its TP (its all-reduces) on the truth's curves
    tp2 = load_tp_cost_model("qwen3-8b", "h100", 2)
    t = truth_cost_model(tp2, TruthConfig(perturb=(0.85, 1.0)))
    assert t.tp == 2 and t.batch_time([(512, 0)]) > tp2.batch_time([(512, 0)])
    cfg = SearchConfig(seed=3)
    assert cfg.cluster().truth == TruthConfig(seed=3)


def test_goodput_table_reuse_reruns_only_the_named_policy(tmp_path):
    from sglang_duet.simulator import goodput_table

    first, second = tmp_path / "a", tmp_path / "b"
    args = ["--workload", "azure-conv", "--seeds", "1", "--num-requests", "30", "--tune-requests", "30",
            "--chunked-budgets", "2048", "--static-sms", "32", "--contenders", "duet:8192", "--no-aggregated",
            "--baseline-orders", "",
            "--start-rate", "8", "--rel-tol", "0.3", "--quiet"]
    goodput_table.main(args + ["--out", str(first)])
    a = json.loads((first / "table.json").read_text())
    a["points"]["chunked-2048"][0]["goodput"]["attainment_max_tbt"]["rate"] = 123.0  # marks the reused run
    (first / "table.json").write_text(json.dumps(a))
    goodput_table.main(args + ["--out", str(second), "--reuse", str(first / "table.json")])
    b = json.loads((second / "table.json").read_text())
    assert b["summary"]["chunked-2048"]["attainment_max_tbt"]["per_seed"] == [123.0]
    assert b["points"]["duet-8192"] == a["points"]["duet-8192"]  # simulated again, deterministically
    assert "reused from" in (second / "table.md").read_text()


def test_tune_tries_the_best_member_in_deadline_order_and_reuses_known_members():
    from sglang_duet.simulator.goodput_table import PolicySpec, tune

    fams = {"chunked": [PolicySpec.parse("chunked:2048")]}
    known = {"chunked": {"best": "chunked-2048", "members": {
        "chunked-2048": {"goodput": 5.0, "flag": "", "spec": "chunked:2048"}}}}
    seen = []
    out = tune(SimConfig(workload="azure-conv"), fams, 30, 8.0, cost_model=CM, log=seen.append, known=known)
    members = out["chunked"]["members"]
    assert set(members) == {"chunked-2048", "chunked-2048-ttft_order=deadline"}
    assert members["chunked-2048"]["goodput"] == 5.0  # not measured again
    assert not any("tuning chunked-2048\n" == s or s == "  tuning chunked-2048" for s in seen)
    assert out["chunked"]["best"] == max(members, key=lambda k: members[k]["goodput"])


def test_headline_collects_duet_against_the_best_baseline(tmp_path, capsys):
    from sglang_duet.simulator import goodput_table
    from sglang_duet.simulator.goodput_table import Goodput, SeedRun, summarise_table

    def runs(vals):
        return [SeedRun(i, {"attainment_max_tbt": Goodput(v, ""), "attainment": Goodput(v, "")})
                for i, v in enumerate(vals)]

    summary = summarise_table({"chunked-2048": runs([10.0, 11.0]), "static-split-8192-sd48": runs([12.0, 13.0]),
                               "aggregated-8192": runs([2.0, 2.0]), "duet-8192": runs([13.0, 13.0])})
    roles = {"chunked-2048": "best chunked (tuned)", "static-split-8192-sd48": "best static-split (tuned)"}
    path = tmp_path / "sim-x" / "table.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"summary": summary, "roles": roles}))
    assert goodput_table.main(["--collect", str(path)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith("| sim-x | 13.00") and "static-split-8192-sd48 12.50" in row and "6.50x" in row


def test_tp2_simulation_prices_compute_bound_prefill_faster_than_tp1():
    """--tp-size 2: the emulated group and the policy both use the TP cost model; KV = 2 GPUs - weights."""
    from sglang_duet.cost_model.tp import TPCostModel
    from sglang_duet.executor.emulated import MEM_FRACTION_DEFAULT

    specs = [RequestSpec(0.0, 4000, 2)]  # one long prompt, exact truth: compute-bound prefill decides
    cfg = dict(policy="aggregated", chunked_prefill_size=8192, truth=None, record_launches=True)
    r1 = simulate(SimConfig(**cfg), specs=specs)
    r2 = simulate(SimConfig(**cfg, tp_size=2), specs=specs)
    assert r2.records[0].token_times[0] < r1.records[0].token_times[0]
    assert r2.launches[0].actual_s < r1.launches[0].actual_s
    assert r2.launches[0].belief_s == pytest.approx(r2.launches[0].actual_s)  # the policy's model is the TP one
    cm2 = build_cost_model("qwen3-8b", "h100", 2)
    assert isinstance(cm2, TPCostModel) and cm2.tp == 2
    weights = cm2.model.num_params() * cm2.b
    assert r2.stats["kv_slots"] > 2 * r1.stats["kv_slots"]  # the weights are paid for once, not per GPU
    slots = int((2 * CM.hw.memory_bytes * MEM_FRACTION_DEFAULT - weights) // cm2.model.kv_bytes_per_token(2))
    assert r2.stats["kv_slots"] == slots - 1  # the allocator keeps slot 0 as padding


def test_tp_size_flag_is_checked():
    with pytest.raises(SystemExit):
        main(["--tp-size", "0", "--num-requests", "2", "--quiet"])


def test_goodput_table_runs_on_a_measured_truth_file():
    """--truth-file: the table's emulated GPU is the measured truth (configs/truth/), perturbable."""
    from sglang_duet.cost_model.truth import TruthConfig
    from sglang_duet.simulator import goodput_table

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "truth", "h200-2026-11-30.yaml")
    t = goodput_table.base_config(goodput_table.parse_args(["--truth-file", path])).truth
    assert t == TruthConfig.from_file(path) and t != TruthConfig()
    assert t.contention == "measured" and t.host_hidden is False
    p = goodput_table.base_config(goodput_table.parse_args(["--truth-file", path, "--truth-perturb", "0.9,1.1"])).truth
    assert p.perturb == (0.9, 1.1) and p.contention == "measured"
    # the no-host ablation: the same file's truth with its host time at zero
    nh = goodput_table.base_config(goodput_table.parse_args(["--truth-file", path.replace(".yaml", "-no-host.yaml")])).truth
    assert (nh.host_base_s, nh.host_per_req_s) == (0.0, 0.0) and t.host_base_s > 0
    assert dataclasses.replace(nh, host_base_s=t.host_base_s, host_per_req_s=t.host_per_req_s) == t
