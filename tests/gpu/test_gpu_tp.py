"""Tensor parallelism on two GPUs (NCCL for the model's collectives, gloo for the step broadcast):
greedy output of --tp-size 2 in float32 token-exact with the CPU engine at --tp-size 1."""
from __future__ import annotations

import pytest
import torch

from gpu_common import GPU
from sglang_duet.engine import Engine

pytestmark = [*GPU, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

PROMPTS = ["The capital of France is", "Hello world! How", "def add(a, b):"]
GREEDY = {"max_new_tokens": 16, "temperature": 0}
SEEDED = {"max_new_tokens": 16, "temperature": 0.9, "seed": 3}


@pytest.mark.parametrize("family", ["llama", "qwen3", "smollm"])
def test_tp2_nccl_fp32_token_exact_vs_cpu(family, tiny_model_factory):
    path = tiny_model_factory(family)
    ref = Engine(path, dtype="float32", device="cpu", max_total_tokens=2048)
    try:
        want = [o["output_ids"] for o in ref.generate(PROMPTS, GREEDY)]
    finally:
        ref.shutdown()
    eng = Engine(path, dtype="float32", device="cuda", tp_size=2, attention_backend="torch", max_total_tokens=2048)
    try:
        assert eng.core.tp_driver.group.backend == "nccl"
        got = [o["output_ids"] for o in eng.generate(PROMPTS, GREEDY)]
        again = [o["output_ids"] for o in eng.generate(PROMPTS, SEEDED)]
        assert [o["output_ids"] for o in eng.generate(PROMPTS, SEEDED)] == again  # seeded: reproducible
    finally:
        eng.shutdown()
    assert got == want


def test_tp2_split_lanes_nccl_token_exact_vs_cpu(tiny_model_factory):
    """--lanes 2 under TP on two GPUs: each lane's collectives on its own NCCL communicator, the
    prefill and decode lanes in flight together, tokens equal to the CPU engine's."""
    path = tiny_model_factory("qwen3")
    ref = Engine(path, dtype="float32", device="cpu", max_total_tokens=8192)
    try:
        want = [o["output_ids"] for o in ref.generate(PROMPTS, GREEDY)]
    finally:
        ref.shutdown()
    eng = Engine(path, dtype="float32", device="cuda", tp_size=2, lanes="2", policy="static-split",
                 attention_backend="torch", max_total_tokens=8192, chunked_prefill_size=8)
    try:
        assert eng.core.tp_driver.group.num_lanes == 2
        got = [o["output_ids"] for o in eng.generate(PROMPTS, GREEDY)]
        assert eng.core.executor.stats.max_lanes_in_flight == 2
    finally:
        eng.shutdown()
    assert got == want
