"""Triton attention kernels against the torch reference, on CPU through Triton's interpreter.

TRITON_INTERPRET=1 must be in the environment before triton is imported (the @triton.jit
decorator reads it), so it is set here at import time when no GPU is present. Shapes are tiny:
the interpreter runs every program in Python-level numpy."""
from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set (its @jit reads it at import): "
                    "run with TRITON_INTERPRET=1 in the environment", allow_module_level=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install triton) - Triton backend not testable")

from attn_cases import CASES, clone_pool, make_case, run_backend  # noqa: E402

from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from sglang_duet.kernels.attention.triton_backend import (  # noqa: E402
    TritonAttentionBackend,
    decode_attention,
    num_kv_splits,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads", [(4, 2), (8, 2)])  # GQA groups 2 and 4
def test_matches_torch_reference(case, heads):
    H, H_kv = heads
    pool, fb, qkv = make_case(CASES[case], H, H_kv, 16, torch.float32, DEVICE, seed=hash(case) % 1000)
    ref_pool = clone_pool(pool)
    ref = run_backend(TorchAttentionBackend(), ref_pool, fb, qkv)
    # block sizes smaller than the requests so the loops and masks cross block boundaries
    got = run_backend(TritonAttentionBackend(H_kv, block_m=16, block_n=16), pool, fb, qkv)
    for r, o in zip(ref, got):
        assert o.shape == r.shape and o.dtype == r.dtype
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    # run() stored the new tokens' k/v exactly where the reference did
    torch.testing.assert_close(pool.buffer, ref_pool.buffer, atol=0, rtol=0)


def test_decode_split_counts_agree():
    """Any number of KV splits (including empty splits) gives the same result."""
    pool, fb, qkv = make_case(CASES["decode"], 4, 2, 16, torch.float32, DEVICE, seed=7, layers=1)
    q, k, v = qkv[0]
    pool.set_kv(0, fb.out_cache_loc, k, v)
    kb, vb = pool.get_kv(0)
    outs = [decode_attention(q, kb, vb, torch.empty_like(q), fb.kv_indptr, fb.kv_indices, s, block_n=16)
            for s in (1, 4, 8)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


def test_num_kv_splits_heuristic():
    assert num_kv_splits(256, 8, 4096) == 1  # a big batch fills the GPU by itself
    assert num_kv_splits(1, 8, 4096) == 16
    assert num_kv_splits(1, 8, 300) == 1  # too short to split
    s = num_kv_splits(4, 8, 2048)
    assert s & (s - 1) == 0 and 1 <= s <= 16


def _table_batch(fb):
    """The same batch as `fb` (ForwardBatch.build's), its inputs gathered from a req-to-token table: the
    index tensors are then views into one packed buffer (offsets), as the executors hand them over."""
    from sglang_duet.core.plan import ReqWork
    from sglang_duet.memory.req_to_token import ReqToTokenTable

    kv_indptr, qo_indptr = fb.kv_indptr.tolist(), fb.qo_indptr.tolist()
    ids, wants = fb.input_ids.tolist(), set(fb.sample_indices.tolist())
    work = [ReqWork(f"r{b}", ids[qo_indptr[b]:qo_indptr[b + 1]], fb.prefix_lens_cpu[b],
                    fb.kv_indices[kv_indptr[b]:kv_indptr[b + 1]].tolist(), qo_indptr[b + 1] - 1 in wants,
                    table_row=2 * b + 1) for b in range(fb.num_requests)]
    table = ReqToTokenTable(2 * len(work) + 2, max(fb.seq_lens_cpu) + 3, fb.device)
    assert table.prepare(work)
    return table.forward_batch([(w.input_ids, w.start_pos, w.table_row, w.sample) for w in work])


@pytest.mark.parametrize("case", list(CASES))
def test_batches_built_from_the_req_to_token_table_give_the_same_output(case):
    pool, fb, qkv = make_case(CASES[case], 8, 2, 16, torch.float32, DEVICE, seed=11)
    tb = _table_batch(fb)
    assert torch.equal(tb.kv_indices, fb.kv_indices) and tb.kv_indptr.storage_offset() > 0
    ref_pool = clone_pool(pool)
    ref = run_backend(TritonAttentionBackend(2, block_m=16, block_n=16), ref_pool, fb, qkv)
    got = run_backend(TritonAttentionBackend(2, block_m=16, block_n=16), pool, tb, qkv)
    for r, o in zip(ref, got):
        assert torch.equal(o, r)
    assert torch.equal(pool.buffer, ref_pool.buffer)
