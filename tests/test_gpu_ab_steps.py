"""benchmark/gpu_ab_steps.py: steps rebuilt from delivery times recover the host time, the decode
lane's slowdown and the occupancy a synthetic GPU run was made with."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from sglang_duet.cost_model.roofline import CostModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H0, H1 = 1.2e-3, 40e-6  # the synthetic run's host time per step: h0 + h1 * rows


def _module():
    spec = importlib.util.spec_from_file_location("gpu_ab_steps", os.path.join(ROOT, "benchmark", "gpu_ab_steps.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_ab_steps"] = mod  # its dataclass looks its module up while being defined
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cm():
    return CostModel.load("qwen3-8b", "h200")


def _decode_run(cm, policy: str, sms, slowdown: float = 1.0, pending_until: float | None = None) -> dict:
    """20 requests prefilled at t=0.1 s, decoding together until each reaches its length (10..48
    tokens): every step takes slowdown * model + H0 + H1 * rows. `pending_until`: one more request
    arrives at 0 and gets its one token then (a prompt pending beside the decodes until that time)."""
    n = 20
    inputs = [500 + 37 * i for i in range(n)]
    outs = [10 + 2 * i for i in range(n)]
    times = {i: [0.1] for i in range(n)}
    t, k = 0.1, 1
    while True:
        rows = [i for i in range(n) if outs[i] > k]
        if not rows:
            break
        model = cm.batch_time([(1, inputs[i] + k - 1) for i in rows], sms)
        t += slowdown * model + H0 + H1 * len(rows)
        for i in rows:
            times[i].append(round(t, 6))
        k += 1
    detail = [{"arrival_s": 0.0, "input_len": inputs[i], "output_len": outs[i], "delivery_s": times[i]} for i in range(n)]
    if pending_until is not None:
        detail.append({"arrival_s": 0.0, "input_len": 4000, "output_len": 1, "delivery_s": [pending_until]})
    return {"policy": policy, "seed": 0, "status": "ok", "chunked_prefill_size": 2048, "detail": detail,
            "options": {"decode_sms": sms} if sms else {}}


def test_host_fit_recovers_the_host_time_of_decode_only_steps(cm):
    mod = _module()
    dec, mixed, _ = mod.aggregated_steps(_decode_run(cm, "aggregated", None), cm)
    assert len(dec) > 30 and not mixed
    d = np.array(dec)
    h0, h1 = mod.lad_fit(d[:, 1], d[:, 2] - d[:, 0])
    assert (h0, h1) == pytest.approx((H0, H1), rel=0.02, abs=2e-6)


def test_a_pending_prompt_makes_a_step_mixed_not_decode_only(cm):
    mod = _module()
    dec, _, _ = mod.aggregated_steps(_decode_run(cm, "aggregated", None, pending_until=10.0), cm)
    assert dec == []  # a prompt waited through every step: none of them was decode-only


def test_split_decode_lane_slowdown_beside_a_prefill(cm):
    mod = _module()
    run = _decode_run(cm, "static-split+decode_sms=48", 48, slowdown=1.4, pending_until=10.0)
    s = mod.split_decode_steps(run, cm, (H0, H1))
    assert not s["idle"] and len(s["pending"]) > 20
    assert all(x == pytest.approx(1.4, rel=1e-3) for _, x in s["pending"])  # the host time taken off
    alone = mod.split_decode_steps(_decode_run(cm, "static-split", 48), cm, (H0, H1))
    assert not alone["pending"] and all(x == pytest.approx(1.0, rel=1e-3) for _, x in alone["idle"])


def test_command_prints_the_fit_and_occupancy(cm, tmp_path, capsys):
    mod = _module()
    runs = [_decode_run(cm, "aggregated", None), _decode_run(cm, "static-split+decode_sms=48", 48, 1.3, 10.0)]
    doc = {"meta": {"num_requests": 20, "rate": 10.0, "model": "qwen3-8b", "ttft_slo_ms": 1000.0,
                    "cost_model_config": "configs/models/qwen3-8b.json"}, "runs": runs}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    assert mod.main([str(path), "--hardware", "h200"]) == 0
    out = capsys.readouterr().out
    assert "gap - model = 1.200 ms + 40.0 us x rows" in out
    assert "Decode lane beside a prefill, host fit removed: median 1.300" in out
    # occupancy: at most 20 decoding, 21 waiting before the first tokens, 1 of 21 past the TTFT SLO (10 s)
    line = next(ln for ln in out.splitlines() if ln.startswith("| static-split+decode_sms=48 | 0 | "))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2].endswith("/ 20") and cells[3].endswith("/ 21") and cells[4:6] == ["100", "5%"]
