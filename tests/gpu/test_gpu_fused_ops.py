"""The fused layer kernels (kernels/fused_ops.py) compiled on the GPU: each against its torch reference at
Qwen3-8B's sizes, bf16 and fp32; a CUDA graph of them replays to the eager result; the model's forward
with them matches its torch ops.

Triton is imported lazily by fused_ops (not at collection), so these imports are safe in a CPU run."""
from __future__ import annotations

import pytest
import torch

from gpu_common import GPU, requires_triton, small_model
from sglang_duet.kernels import fused_ops
from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend
from sglang_duet.memory.kv_pool import KVCachePool

pytestmark = GPU + [requires_triton]

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 4096, 12288, 32, 8, 128  # Qwen3-8B
TOKENS = [1, 7, 4096]
DTYPES = [torch.bfloat16, torch.float32]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (and no NaN: an element a kernel did not write is NaN here)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    got, ref = got.float(), ref.float()
    assert not got.isnan().any()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)


def cos_sin(T, dtype, seed):
    g = torch.Generator(device="cuda")
    g.manual_seed(seed)
    pos = torch.randint(0, 32768, (T,), generator=g, device="cuda").float()
    inv_freq = 1.0 / (1000000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    emb = torch.cat([pos[:, None] * inv_freq[None, :]] * 2, dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def qk_views(T, dtype, seed):
    """q [T, H, D] and k [T, H_kv, D] as views of one fused q/k/v GEMM output."""
    qkv = randn(T, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype, seed=seed, scale=2.0)
    q, k, _ = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
    return q.view(T, HEADS, HEAD_DIM), k.view(T, KV_HEADS, HEAD_DIM)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
def test_norms(dtype, T):
    x = randn(T, HIDDEN, dtype=dtype, seed=T, scale=2.0)
    residual = randn(T, HIDDEN, dtype=dtype, seed=T + 1, scale=5.0)
    w = randn(HIDDEN, dtype=dtype, seed=T + 2).add_(1)
    assert rel_err(fused_ops.rmsnorm(x, w, 1e-6), fused_ops.rmsnorm_ref(x, w, 1e-6)) <= TOL[dtype]
    normed, new_res = fused_ops.fused_add_rmsnorm(x, residual, w, 1e-6)
    ref_normed, ref_res = fused_ops.fused_add_rmsnorm_ref(x, residual, w, 1e-6)
    assert torch.equal(new_res, ref_res)
    assert rel_err(normed, ref_normed) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_rope(dtype, T, qk_norm):
    q, k = qk_views(T, dtype, seed=T + 3)
    cos, sin = cos_sin(T, dtype, seed=T + 4)
    wq = randn(HEAD_DIM, dtype=dtype, seed=T + 5).add_(1) if qk_norm else None
    wk = randn(HEAD_DIM, dtype=dtype, seed=T + 6).add_(1) if qk_norm else None
    got_q, got_k = fused_ops.qk_norm_rope(q, k, cos, sin, wq, wk, 1e-6)
    ref_q, ref_k = fused_ops.qk_norm_rope_ref(q, k, cos, sin, wq, wk, 1e-6)
    assert rel_err(got_q, ref_q) <= TOL[dtype]
    assert rel_err(got_k, ref_k) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
def test_silu_and_mul(dtype, T):
    gate_up = randn(T, 2 * INTER, dtype=dtype, seed=T + 7, scale=4.0)
    assert rel_err(fused_ops.silu_and_mul(gate_up), fused_ops.silu_and_mul_ref(gate_up)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_graph_replays_the_eager_result(dtype):
    T = 7
    x = randn(T, HIDDEN, dtype=dtype, seed=11)
    residual = randn(T, HIDDEN, dtype=dtype, seed=12)
    w = randn(HIDDEN, dtype=dtype, seed=13).add_(1)
    qkv = randn(T, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype, seed=14)
    cos, sin = cos_sin(T, dtype, seed=15)
    wq, wk = randn(HEAD_DIM, dtype=dtype, seed=16), randn(HEAD_DIM, dtype=dtype, seed=17)
    gate_up = randn(T, 2 * INTER, dtype=dtype, seed=18)

    def step():
        normed, new_res = fused_ops.fused_add_rmsnorm(x, residual, w, 1e-6)
        q, k, _ = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q, k = fused_ops.qk_norm_rope(q.view(T, HEADS, HEAD_DIM), k.view(T, KV_HEADS, HEAD_DIM), cos, sin, wq, wk, 1e-6)
        return normed, new_res, q, k, fused_ops.silu_and_mul(gate_up), fused_ops.rmsnorm(x, w, 1e-6)

    side = torch.cuda.Stream()  # warm up (Triton compiles) outside the capture, as torch.cuda.graph wants
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for i, buf in enumerate((x, residual, qkv, cos, sin, gate_up)):  # new inputs, same addresses
        buf.copy_(randn(*buf.shape, dtype=dtype, seed=100 + i))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        assert torch.equal(got, want)


def test_model_forward_fused_matches_torch_ops(tmp_path, monkeypatch):
    """The small Llama (separate q/k/v and gate/up GEMMs, as the loader leaves them on a GPU) in float32:
    the fused forward's logits match the torch ops' (and the fused forward did call the kernels)."""
    model = small_model(tmp_path, dtype="float32")
    calls = []
    silu_mul = fused_ops.FusedOps.silu_mul
    monkeypatch.setattr(fused_ops.FusedOps, "silu_mul", staticmethod(lambda g, u: calls.append(1) or silu_mul(g, u)))
    c = model.config
    prompts = [list(range(3, 40)), list(range(100, 117))]
    logits = {}
    for fused in (False, True):
        model.use_fused_ops = fused
        pool = KVCachePool(c.num_hidden_layers, 256, c.num_key_value_heads, c.head_dim, torch.float32, "cuda")
        slots = [list(range(1, 1 + len(prompts[0]) + 1)), list(range(100, 100 + len(prompts[1]) + 1))]
        fb = ForwardBatch.build([(p, 0, s, True) for p, s in zip(prompts, slots)], "cuda")
        prefill = model(fb, TorchAttentionBackend(), pool)
        nxt = prefill.argmax(-1).tolist()
        fb = ForwardBatch.build([([t], len(p), s, True) for t, p, s in zip(nxt, prompts, slots)], "cuda")
        logits[fused] = (prefill, model(fb, TorchAttentionBackend(), pool))
    assert len(calls) == 2 * c.num_hidden_layers  # the fused forwards only: prefill and decode, each layer
    for got, want in zip(logits[True], logits[False]):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
