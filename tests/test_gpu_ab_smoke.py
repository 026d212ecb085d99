"""benchmark/gpu_ab.py runs end to end on a CPU: one tiny model, one two-lane executor, two policies.

Asserts counts and order only (never seconds): both policies are reported, every request ran to its
token count, delivery times never go backwards, no TTFT is negative, the KV pool is free after each
run, the split policy used both lanes and the aggregated one neither.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_ab", os.path.join(ROOT, "benchmark", "gpu_ab.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_cpu_ab_two_policies(tmp_path):
    mod = _load()
    cfg = os.path.join(ROOT, "configs", "models", "tiny-overhead.json")
    rc = mod.main(["--device", "cpu", "--model-config", cfg, "--policies", "aggregated,static-split",
                   "--num-requests", "4", "--rate", "200", "--max-input", "40", "--max-output", "6",
                   "--warmup", "1", "--kv-tokens", "2048", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["meta"]["sm_partition_backend"] == "none" and doc["meta"]["capture_sms"] == [32]
    runs = {r["policy"]: r for r in doc["runs"]}
    assert list(runs) == ["aggregated", "static-split"] and not doc["skipped"] and doc["in_progress"] is None
    for name, run in runs.items():
        assert run["status"] == "ok", run.get("error")
        assert run["requests"] == 4 and run["finished"] == 4 and run["kv_free_after"] is True
        assert len(run["detail"]) == 4
        for r in run["detail"]:
            assert 1 <= r["output_len"] <= 6 and 1 <= r["input_len"] <= 40
            assert r["finished"] and r["finish_reason"]["type"] == "length"
            assert r["completion_tokens"] == r["output_len"] == len(r["delivery_s"]) == len(r["device_s"])
            d = r["delivery_s"]
            assert all(a <= b for a, b in zip(d, d[1:])), d
            assert d[0] - r["arrival_s"] >= 0  # TTFT, from the scheduled arrival
        m = run["delivery"]
        assert m["num_requests"] == 4 and m["ttft_p50_ms"] >= 0
        assert run["core"]["generated_tokens"] == sum(r["output_len"] for r in run["detail"])
    la = runs["aggregated"]["executor"]["launches"]
    assert la["aggregated"] > 0 and la["prefill"] == la["decode"] == 0
    ls = runs["static-split"]["executor"]["launches"]
    assert ls["aggregated"] == 0 and ls["prefill"] > 0 and ls["decode"] > 0
    assert runs["static-split"]["executor"]["splits_used"] == [32]
    assert runs["static-split"]["core"]["plans"]["aggregated"] == 0
    # the same trace for both: same requests, lengths and arrival schedule
    a, b = runs["aggregated"]["detail"], runs["static-split"]["detail"]
    shape = lambda d: [(r["rid"], r["input_len"], r["output_len"]) for r in d]  # noqa: E731
    assert shape(a) == shape(b)
    assert all(abs(x["arrival_s"] - y["arrival_s"]) < 1e-6 for x, y in zip(a, b))
    assert [x["arrival_s"] for x in a] == sorted(x["arrival_s"] for x in a)
    md = (tmp_path / "results.md").read_text()
    assert "| aggregated | 0 | ok |" in md and "| static-split | 0 | ok |" in md


def test_help_parses():
    with pytest.raises(SystemExit) as e:
        _load().main(["--help"])
    assert e.value.code == 0


def test_tuned_variants_are_their_own_entries():
    """--policies takes the simulator's specs: each variant keeps its label, runs its policy with its
    budget and options, and --policy-options for the policy's name still apply beneath the spec's."""
    mod = _load()
    args = mod.build_parser().parse_args([])
    user = mod.parse_policy_options(["static-split:ttft_order=deadline", "static-split:decode_sms=16"])
    assert mod.policy_settings(args, "chunked", {}) == ("chunked", {}, 512)
    assert mod.policy_settings(args, "chunked:2048", {}) == ("chunked", {}, 2048)
    assert mod.policy_settings(args, "static-split", user) == (
        "static-split", {"ttft_order": "deadline", "decode_sms": 16}, 2048)
    assert mod.policy_settings(args, "static-split:4096+decode_sms=48", user) == (
        "static-split", {"ttft_order": "deadline", "decode_sms": 48}, 4096)
    assert mod.policy_settings(args, "duet+k_max=2", {}) == ("duet", {"decode_sms_grid": "16,32,48,64", "k_max": 2}, 2048)
