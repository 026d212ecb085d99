"""benchmark/cpu_decode.py on a tiny model: the floor covers every weight byte once (not the one-row
copies), and the engine part decodes the requested tokens."""
from __future__ import annotations

import torch

from benchmark import cpu_decode
from sglang_duet.model_loader.loader import load_model


def test_the_floor_reads_each_weight_once(tiny_model_factory):
    model = load_model(tiny_model_factory("smollm"), dtype="float32").model
    assert model.has_gemv_weights
    floor = cpu_decode.floor_ms(model)
    matrices = [p for p in model.parameters() if p.dim() == 2]  # q/k/v, gate/up as their fused views' parts
    assert floor["MB"] * 1e6 == sum(p.numel() * 4 for p in matrices)
    assert set(floor) == {"MB", "sum over the bytes", "F.linear, [out, in]", "x @ w_t, [in, out]"}


def test_the_engine_part_decodes_one_request(tiny_model_factory):
    torch.set_num_threads(1)
    ms, ids, init_s = cpu_decode.engine_ms_per_token(tiny_model_factory("smollm"), 8, False)
    assert len(ids) == 10 and ms > 0 and init_s > 0  # 8 + 2 tokens: eos ignored
