"""The default policy on a CPU (sglang_duet/cost_model/cpu_budget.py): with no --policy, chunked prefill
mixed with the running decodes, its token budget the largest whose step this CPU's calibrated cost
model predicts within --tbt-slo-ms. Made-up calibrations stand in for timing; everything is checked
by the cost model's own predictions, order and counts, never by speed."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from sglang_duet.cost_model import cpu_budget as cb
from sglang_duet.cost_model import cpu_calibration as cc
from sglang_duet.cost_model.hardware import HardwareSpec
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.model_loader.serving_config import CPU_PREFILL_BUDGET
from sglang_duet.sampling_params import SamplingParams
from sglang_duet.server.args import check_server_args, parse_args
from sglang_duet.server_args import ServerArgs, fill_resolved_policy

pytestmark = pytest.mark.timeout(300)

SMOLLM = CostModel.load("smollm2-135m", "h100").model
# a 2-core VM's fit of SmolLM2-135M (one thread): ~2 ms a prefill token, ~3 ms per request of a step
SLOW = cc.CpuCalibration("slow", compute=8e10, attention=3e10, bandwidth=7e9, per_step_s=0.002, per_request_s=0.003)


def faster(cal: cc.CpuCalibration, x: float) -> cc.CpuCalibration:
    """The same CPU x times faster in every respect."""
    return dataclasses.replace(cal, compute=cal.compute * x, attention=cal.attention * x,
                               bandwidth=cal.bandwidth * x, per_step_s=cal.per_step_s / x,
                               per_request_s=cal.per_request_s / x)


def cpu_model(cal: cc.CpuCalibration, model=SMOLLM) -> cc.CpuCostModel:
    return cc.cpu_cost_model(model, HardwareSpec.load("h100"), cal, 4)


def step_ms(cm, budget: int, decodes: int = cb.REFERENCE_DECODES, context: int = cb.REFERENCE_CONTEXT) -> float:
    return cm.batch_time(cb.reference_step(budget, decodes, context)) * 1e3


# ---- the budget rule, a pure function of the cost model -----------------------------------------------


def test_the_budget_is_the_largest_whose_predicted_step_fits_the_target():
    cm = cpu_model(faster(SLOW, 40))
    for target in (50.0, 100.0, 300.0):
        b = cb.budget_for_target(cm, target)
        assert b.limited_by == "target" and b.tokens % cb.BUDGET_STEP == 0
        assert cb.MIN_BUDGET <= b.tokens < cb.MAX_BUDGET
        assert step_ms(cm, b.tokens) <= target < step_ms(cm, b.tokens + cb.BUDGET_STEP)  # largest that fits
        assert b.predicted_ms == pytest.approx(step_ms(cm, b.tokens))


def test_a_faster_cpu_gets_a_larger_budget():
    budgets = [cb.budget_for_target(cpu_model(faster(SLOW, x)), 100.0).tokens for x in (10, 20, 40, 80)]
    assert budgets == sorted(budgets) and len(set(budgets)) == len(budgets), budgets
    # a longer TBT target buys a larger budget on the same CPU
    cm = cpu_model(faster(SLOW, 20))
    assert cb.budget_for_target(cm, 200.0).tokens > cb.budget_for_target(cm, 100.0).tokens


def test_the_budget_is_clamped():
    slow = cb.budget_for_target(cpu_model(SLOW), 100.0)  # even 60 tokens + 4 decodes miss 100 ms here
    assert (slow.tokens, slow.limited_by) == (cb.MIN_BUDGET, "minimum") and slow.predicted_ms > 100.0
    fast = cb.budget_for_target(cpu_model(faster(SLOW, 10_000)), 100.0)
    assert (fast.tokens, fast.limited_by) == (cb.MAX_BUDGET, "maximum") and fast.predicted_ms <= 100.0
    custom = cb.budget_for_target(cpu_model(faster(SLOW, 10_000)), 100.0, lo=32, hi=256, step=32)
    assert custom.tokens == 256
    with pytest.raises(ValueError, match="multiples of 64"):
        cb.budget_for_target(cpu_model(SLOW), 100.0, lo=50)


def test_the_reference_step_is_the_chunked_policy_s_batch():
    """Decodes take their token of the budget first; the rest is one chunk after `context` tokens."""
    assert cb.reference_step(64, 4, 1024) == [(60, 1024)] + [(1, 1024)] * 4
    assert sum(q for q, _ in cb.reference_step(512, 3, 10)) == 512


# ---- resolving an unset --policy -------------------------------------------------------------------------


def stub_engine(device="cpu", context_length=8192):
    return SimpleNamespace(device=device, context_length=context_length)


@pytest.fixture
def calibrations(monkeypatch):
    """calibrated_cost_model replaced by one that returns the SLOW CPU x 20 and counts its calls."""
    calls = []
    monkeypatch.delenv(cc.COST_MODEL_ENV, raising=False)

    def fake(engine, hardware, policy=None):
        calls.append(policy)
        return cpu_model(faster(SLOW, 20))

    monkeypatch.setattr(cc, "calibrated_cost_model", fake)
    return calls


def test_no_policy_on_a_cpu_is_chunked_with_the_calibrated_budget(calibrations):
    eng = stub_engine()
    args, why = cb.resolve_default_policy(eng, ServerArgs())
    expected = cb.budget_for_target(cpu_model(faster(SLOW, 20)), 100.0)
    assert (args.policy, args.chunked_prefill_size) == ("chunked", expected.tokens)
    assert (why.policy, why.chunked_prefill_size, why.source) == ("chunked", expected.tokens, "cpu-calibration")
    assert "100 ms" in why.reason and "--tbt-slo-ms" in why.reason
    assert calibrations == ["chunked"] and isinstance(eng.cpu_cost_model, cc.CpuCostModel)
    # --tbt-slo-ms is the target
    args300, _ = cb.resolve_default_policy(stub_engine(), ServerArgs(tbt_slo_ms=300.0))
    assert args300.chunked_prefill_size > args.chunked_prefill_size


def test_explicit_flags_win(calibrations):
    for given in (ServerArgs(policy="aggregated"), ServerArgs(policy="chunked", chunked_prefill_size=32),
                  ServerArgs(policy="duet")):
        assert cb.resolve_default_policy(stub_engine(), given) == (given, None)
    args, why = cb.resolve_default_policy(stub_engine(), ServerArgs(chunked_prefill_size=256))
    assert (args.policy, args.chunked_prefill_size, why.source) == ("chunked", 256, "flag")
    assert calibrations == []  # nothing timed for a budget nobody needs


def test_elsewhere_no_policy_stays_aggregated(calibrations):
    cases = [(stub_engine("cuda:0"), ServerArgs()), (stub_engine("cpu"), ServerArgs(executor="emulated")),
             (stub_engine("cpu"), ServerArgs(disaggregation_mode="prefill"))]
    for eng, given in cases:
        args, why = cb.resolve_default_policy(eng, given)
        assert (args.policy, args.chunked_prefill_size, why) == ("aggregated", None, None)
    assert calibrations == []


def test_without_a_calibration_the_budget_is_fixed_and_says_why(monkeypatch, calibrations, caplog):
    monkeypatch.setenv(cc.COST_MODEL_ENV, "0")
    with caplog.at_level("INFO", logger=cb.__name__):
        args, why = cb.resolve_default_policy(stub_engine(), ServerArgs())
    assert (args.policy, args.chunked_prefill_size, why.source) == ("chunked", CPU_PREFILL_BUDGET, "fixed")
    assert cc.COST_MODEL_ENV in why.reason and calibrations == []
    assert [r.getMessage() for r in caplog.records if "no --policy" in r.getMessage()] == [
        f"no --policy on a CPU: chunked (mixed chunked prefill, options {{'surge_tokens': {cb.CPU_SURGE_TOKENS}}}), "
        f"--chunked-prefill-size {CPU_PREFILL_BUDGET}: "
        f"{why.reason}"]  # one start-up line

    monkeypatch.delenv(cc.COST_MODEL_ENV)

    def broken(engine, hardware, policy=None):
        raise RuntimeError("no forward pass")

    monkeypatch.setattr(cc, "calibrated_cost_model", broken)
    args, why = cb.resolve_default_policy(stub_engine(), ServerArgs())
    assert (args.chunked_prefill_size, why.source) == (CPU_PREFILL_BUDGET, "fixed")
    assert "failed" in why.reason and "no forward pass" in why.reason


def test_the_main_process_reports_what_the_scheduler_resolved():
    args = ServerArgs()
    fill_resolved_policy(args, {"name": "chunked", "chunked_prefill_size": 128})
    assert (args.policy, args.chunked_prefill_size) == ("chunked", 128)
    given = ServerArgs(policy="my_policy.py", chunked_prefill_size=-1)
    fill_resolved_policy(given, {"name": "MyPolicy", "chunked_prefill_size": 4096})
    assert (given.policy, given.chunked_prefill_size) == ("my_policy.py", -1)  # flags as given


def test_the_cli_leaves_policy_unset():
    args = parse_args([])
    assert args.policy is None and args.chunked_prefill_size is None and check_server_args(args) is None
    assert parse_args(["--policy", "aggregated"]).policy == "aggregated"


# ---- a real engine (tiny model) ----------------------------------------------------------------------------


@pytest.fixture
def slow_cpu(monkeypatch, tmp_path):
    """Every calibration returns a CPU on which a step of the tiny model's takes 30 ms per request
    (nothing timed, nothing cached), counted."""
    monkeypatch.setenv("SGLANG_DUET_CACHE", str(tmp_path))
    monkeypatch.delenv(cc.COST_MODEL_ENV, raising=False)
    calls = []

    def load(engine, cm):
        calls.append(engine)
        return dataclasses.replace(SLOW, per_request_s=0.03)

    monkeypatch.setattr(cc, "load_or_calibrate", load)
    return calls


def engine_core(model_dir, **kw):
    from sglang_duet.engine_core import EngineCore

    return EngineCore(ServerArgs(model_path=model_dir, max_total_tokens=4096, disable_radix_cache=True, **kw))


def test_an_engine_without_policy_runs_chunked_with_the_calibrated_budget(tiny_model_factory, slow_cpu):
    eng = engine_core(tiny_model_factory("llama"))
    try:
        assert eng.policy.name == "chunked" and eng.args.policy == "chunked"
        decodes, context = min(cb.REFERENCE_DECODES, 256), min(cb.REFERENCE_CONTEXT, eng.context_length // 2)
        expected = cb.budget_for_target(eng.policy.ctx.cost_model, 100.0, decodes, context).tokens
        assert eng.prefill_budget == eng.policy.ctx.chunked_prefill_size == expected == eng.args.chunked_prefill_size
        assert eng.default_policy.source == "cpu-calibration" and eng.default_policy.chunked_prefill_size == expected
        # the policy plans with the very model the budget came from: timed (here: loaded) once
        assert len(slow_cpu) == 1 and eng.policy.ctx.cost_model is eng.cpu_cost_model
        assert eng.policy.describe()["chunked_prefill_size"] == expected
        assert eng.policy.surge_tokens == cb.CPU_SURGE_TOKENS == eng.default_policy.options["surge_tokens"]
    finally:
        eng.shutdown()


def test_a_burst_is_prefilled_at_once_while_a_lone_prompt_is_chunked(tiny_model_factory, slow_cpu, tmp_path):
    """The default's surge: with one stream decoding, three 100-token prompts arriving together get their first
    tokens in one step (the stream's token too); a --policy-config surge_tokens of 0 chunks them at the budget,
    and so does an explicit --policy chunked."""
    model = tiny_model_factory("llama")
    params = SamplingParams(temperature=0.0, max_new_tokens=50, ignore_eos=True)

    def steps_to_first_tokens(eng) -> tuple[int, list[int]]:
        eng.add_request("stream", [1, 2, 3, 4], params)
        for _ in range(3):
            eng.step(None)
        for r in "abc":
            eng.add_request(r, [5 + i % 50 for i in range(100)], SamplingParams(max_new_tokens=1))
        started, stream = set(), []
        while started != set("abc"):
            updates = eng.step(None)
            started |= {u.rid for u in updates if u.rid in "abc" and u.new_token_ids}
            stream.append(sum(len(u.new_token_ids) for u in updates if u.rid == "stream"))
            assert len(stream) < 50
        return len(stream), stream

    eng = engine_core(model)
    try:
        assert eng.prefill_budget == cb.MIN_BUDGET
        assert steps_to_first_tokens(eng) == (1, [1])
    finally:
        eng.shutdown()
    off = tmp_path / "off.json"
    off.write_text('{"surge_tokens": 0}')
    for kw in ({"policy_config": str(off)}, {"policy": "chunked", "chunked_prefill_size": cb.MIN_BUDGET}):
        eng = engine_core(model, **kw)
        try:
            assert eng.policy.surge_tokens == 0
            steps, stream = steps_to_first_tokens(eng)
            assert steps >= 300 // cb.MIN_BUDGET and stream == [1] * steps, kw
        finally:
            eng.shutdown()


def test_an_engine_without_calibration_runs_chunked_with_the_fixed_budget(tiny_model_factory, slow_cpu,
                                                                         monkeypatch):
    monkeypatch.setenv(cc.COST_MODEL_ENV, "0")
    eng = engine_core(tiny_model_factory("llama"))
    try:
        assert eng.policy.name == "chunked" and eng.prefill_budget == CPU_PREFILL_BUDGET
        assert eng.default_policy.source == "fixed" and not slow_cpu  # nothing timed
        assert not isinstance(eng.policy.ctx.cost_model, cc.CpuCostModel)
    finally:
        eng.shutdown()


def stream_beside_long_prompt(eng, prompt_tokens: int) -> tuple[list[int], int]:
    """A short request decodes; a long prompt arrives. Per step until the long prompt's first token:
    how many tokens the short stream got. And how many steps the prompt took."""
    params = SamplingParams(temperature=0.0, max_new_tokens=400, ignore_eos=True)
    eng.add_request("short", [1, 2, 3, 4], params)
    for _ in range(3):  # prefilled and decoding
        eng.step(None)
    eng.add_request("long", [5 + i % 50 for i in range(prompt_tokens)], SamplingParams(max_new_tokens=1))
    per_step = []
    while True:
        updates = eng.step(None)
        per_step.append(sum(len(u.new_token_ids) for u in updates if u.rid == "short"))
        if any(u.rid == "long" and u.new_token_ids for u in updates):
            return per_step, len(per_step)
        assert len(per_step) < 100


def test_a_stream_keeps_receiving_tokens_while_a_long_prompt_is_prefilled(tiny_model_factory, slow_cpu):
    """The budget (the minimum, 64, on the slow CPU) splits a 300-token prompt over 5+ steps, and every one of them
    also gives the running stream its token; explicit --policy aggregated with the same budget does
    not (prefill-first: the stream waits the whole prefill)."""
    model = tiny_model_factory("llama")
    eng = engine_core(model)
    try:
        assert eng.prefill_budget == cb.MIN_BUDGET
        per_step, steps = stream_beside_long_prompt(eng, 300)
    finally:
        eng.shutdown()
    assert steps >= 300 // cb.MIN_BUDGET  # the prompt went in chunks...
    assert per_step == [1] * steps  # ...and each step carried the stream's token
    eng = engine_core(model, policy="aggregated", chunked_prefill_size=cb.MIN_BUDGET)
    try:
        per_step, steps = stream_beside_long_prompt(eng, 300)
    finally:
        eng.shutdown()
    assert steps >= 300 // cb.MIN_BUDGET and per_step[:-1] == [0] * (steps - 1)  # the stream froze


# ---- a real server -------------------------------------------------------------------------------------------


def test_a_server_without_policy_reports_its_budget_and_keeps_a_stream_flowing():
    """A CPU server started with no --policy: /get_server_info says chunked with the calibrated budget
    (a TBT target no CPU meets gives the minimum, 64), and every step that prefills a 1000-token prompt
    also carries the running stream's decode: the policy's own plan log, counted (16 chunks of at
    most 63 tokens, 1000 tokens in all, each beside 1 decode)."""
    import re
    import threading

    import httpx
    from server_utils import TINY_CONFIG, ServerProcess

    with ServerProcess(["--load-format", "dummy", "--model-config", TINY_CONFIG, "--tbt-slo-ms", "0.01",
                        "--disable-radix-cache", "--log-level", "debug"]) as s:
        info = httpx.get(s.url("/get_server_info"), timeout=30).json()
        assert (info["policy"], info["chunked_prefill_size"]) == ("chunked", cb.MIN_BUDGET)
        default = info["policy_info"]["default"]
        assert (default["source"], default["chunked_prefill_size"]) == ("cpu-calibration", cb.MIN_BUDGET)
        assert default["reason"].startswith("the minimum") and info["policy_info"]["chunked_prefill_size"] == 64
        flowing, done = threading.Event(), threading.Event()

        def stream():
            body = {"input_ids": [1, 2, 3, 4], "stream": True,
                    "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True, "temperature": 0}}
            with httpx.stream("POST", s.url("/generate"), json=body, timeout=300) as r:
                for n, line in enumerate(r.iter_lines()):
                    if n >= 5:
                        flowing.set()
                    if done.is_set():
                        return  # closing the stream aborts it

        t = threading.Thread(target=stream)
        t.start()
        try:
            assert flowing.wait(120)
            r = httpx.post(s.url("/generate"), json={"input_ids": [5 + i % 500 for i in range(1000)],
                                                     "sampling_params": {"max_new_tokens": 1}}, timeout=300)
            log = s.log_tail(1 << 26)
        finally:
            done.set()
            t.join(60)
    assert r.status_code == 200 and r.json()["meta_info"]["prompt_tokens"] == 1000
    # "chunked plan aggregated [aggregated: 1p/63t + 1d x1] ...": a chunk of the long prompt (the
    # stream's own prefill was 4 tokens with no decode) and the stream's token, in one step
    chunks = [int(n) for n in re.findall(r"chunked plan aggregated \[aggregated: 1p/(\d+)t \+ 1d x1\]", log)]
    assert sum(chunks) == 1000 and len(chunks) == 16 and max(chunks) == 63, chunks


def test_the_help_states_each_default_once():
    from sglang_duet.server.args import make_parser

    text = " ".join(make_parser("sglang-duet").format_help().split())
    assert text.count("(default: 30000)") == 1 and "(default: None) (default: None)" not in text
    assert "unset: chunked on a CPU" in text
