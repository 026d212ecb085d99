"""The fused layer kernels (kernels/fused_ops.py) against their torch references, and the model's forward
with them against the torch ops; on CPU through Triton's interpreter (on a GPU, compiled).

TRITON_INTERPRET=1 must be in the environment before triton is imported (the @triton.jit decorator reads
it): set here at import time when no GPU is present (tests/conftest.py does the same). Shapes are small:
the interpreter runs every program as NumPy. Outputs are allocated inside the API, so every kernel call
here runs with torch.empty/empty_like returning NaN-filled tensors: an element a kernel fails to write
shows up as a NaN.
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set (its @jit reads it at import): "
                    "run with TRITON_INTERPRET=1 in the environment", allow_module_level=True)
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
tl = triton.language

from sglang_duet.kernels import fused_ops  # noqa: E402
from sglang_duet.kernels.attention.base import ForwardBatch  # noqa: E402
from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from sglang_duet.memory import KVCachePool  # noqa: E402
from sglang_duet.model_loader.loader import load_model  # noqa: E402
from sglang_duet.models.llama import rope_inv_freq  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16]


@contextmanager
def poisoned_outputs():
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with mock.patch.object(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k))), \
         mock.patch.object(torch, "empty_like", lambda *a, **k: poison(real_like(*a, **k))):
        yield


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    got, ref = got.float(), ref.float()
    assert not got.isnan().any(), "an output element was not written"
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def gen(seed: int) -> torch.Generator:
    g = torch.Generator(device=DEVICE)
    g.manual_seed(seed)
    return g


def randn(*shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g, device=DEVICE) * scale).to(dtype)


def cos_sin(T: int, D: int, dtype, g):
    """[T, 1, D] as LlamaForCausalLM.rope_cos_sin makes them, at random positions."""
    pos = torch.randint(0, 4096, (T,), generator=g, device=DEVICE)
    freqs = pos.float()[:, None] * rope_inv_freq(D, 10000.0, None).to(DEVICE)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


# ---- kernels vs references ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D", [(1, 576), (5, 64), (3, 4096), (4, 100)])
def test_rmsnorm(dtype, T, D):
    g = gen(T * 7919 + D)
    x = randn(T, D + 24, dtype=dtype, g=g, scale=3.0)[:, 5:5 + D]  # a row-strided view
    w = randn(D, dtype=dtype, g=g).add_(1)
    with poisoned_outputs():
        got = fused_ops.rmsnorm(x, w, 1e-6)
    assert rel_err(got, fused_ops.rmsnorm_ref(x, w, 1e-6)) <= TOL[dtype]
    with poisoned_outputs():  # leading dims are flattened: [T, 2, D/2 ...] as one batch of rows
        got3 = fused_ops.rmsnorm(x.reshape(T, 1, D), w, 1e-6)
    assert torch.equal(got3.view(T, D), got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,D", [(1, 576), (6, 64), (2, 4096), (3, 200)])
def test_fused_add_rmsnorm(dtype, T, D):
    g = gen(T * 104729 + D)
    x = randn(T, D, dtype=dtype, g=g, scale=2.0)
    residual = randn(T, 2 * D, dtype=dtype, g=g, scale=5.0)[:, ::2]  # not even a contiguous last dim: copied
    w = randn(D, dtype=dtype, g=g).add_(1)
    with poisoned_outputs():
        normed, new_res = fused_ops.fused_add_rmsnorm(x, residual, w, 1e-5)
    ref_normed, ref_res = fused_ops.fused_add_rmsnorm_ref(x, residual, w, 1e-5)
    assert torch.equal(new_res, ref_res)  # rounded exactly as torch's add rounds
    assert rel_err(normed, ref_normed) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("T,H,H_kv,D", [(1, 4, 2, 64), (7, 4, 1, 128), (3, 2, 2, 32)])
def test_qk_norm_rope(dtype, qk_norm, T, H, H_kv, D):
    g = gen(T * 1000 + H * 100 + H_kv * 10 + D + qk_norm)
    qkv = randn(T, (H + 2 * H_kv) * D, dtype=dtype, g=g, scale=2.0)  # q/k/v: views of one GEMM output
    q, k, _ = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
    q, k = q.view(T, H, D), k.view(T, H_kv, D)
    cos, sin = cos_sin(T, D, dtype, g)
    wq, wk = (randn(D, dtype=dtype, g=g).add_(1), randn(D, dtype=dtype, g=g).add_(1)) if qk_norm else (None, None)
    with poisoned_outputs():
        got_q, got_k = fused_ops.qk_norm_rope(q, k, cos, sin, wq, wk, 1e-6)
    ref_q, ref_k = fused_ops.qk_norm_rope_ref(q, k, cos, sin, wq, wk, 1e-6)
    assert got_q.is_contiguous() and got_k.is_contiguous()
    assert rel_err(got_q, ref_q) <= TOL[dtype] and rel_err(got_k, ref_k) <= TOL[dtype]
    if not qk_norm and DEVICE == "cpu":  # no reduction: every product and sum rounded as torch's
        assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H,H_kv,D", [(1, 4, 2, 64), (5, 2, 1, 32)])
def test_qk_norm_rope_writes_k_and_v_into_the_pool(dtype, T, H, H_kv, D):
    """With a KVStore the kernel also writes the roped k (bit for bit what it returns) and v (copied) at
    the slots `loc`, and no other row of the pool."""
    g = gen(T * 7 + H + D)
    qkv = randn(T, (H + 2 * H_kv) * D, dtype=dtype, g=g)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, H_kv * D, H_kv * D], dim=-1))
    cos, sin = cos_sin(T, D, dtype, g)
    slots = 3 * T + 4
    k_cache = torch.full((slots, H_kv, D), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    loc = torch.randperm(slots, generator=g)[:T].to(DEVICE)
    store = fused_ops.KVStore(k_cache, v_cache, loc, v)
    got_q, got_k = fused_ops.qk_norm_rope(q, k, cos, sin, kv_store=store)
    ref_q, ref_k = fused_ops.qk_norm_rope_ref(q, k, cos, sin)
    assert rel_err(got_k, ref_k) <= TOL[dtype] and rel_err(got_q, ref_q) <= TOL[dtype]
    assert torch.equal(k_cache[loc], got_k) and torch.equal(v_cache[loc], v)
    others = torch.ones(slots, dtype=torch.bool)
    others[loc.cpu()] = False
    assert k_cache[others.to(DEVICE)].isnan().all() and v_cache[others.to(DEVICE)].isnan().all()
    with pytest.raises(ValueError, match="KVStore.loc"):
        fused_ops.qk_norm_rope(q, k, cos, sin, kv_store=fused_ops.KVStore(k_cache, v_cache, loc.int(), v))
    with pytest.raises(ValueError, match="KVStore.k_cache"):
        fused_ops.qk_norm_rope(q, k, cos, sin, kv_store=fused_ops.KVStore(k_cache[:, :, :D // 2], v_cache, loc, v))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N", [(1, 1500), (5, 576), (2, 64)])
def test_silu_and_mul(dtype, T, N):
    g = gen(T * 31 + N)
    gate_up = randn(T, 2 * N, dtype=dtype, g=g, scale=4.0)
    with poisoned_outputs():
        got = fused_ops.silu_and_mul(gate_up)  # gate and up: row-strided halves of one tensor
    assert rel_err(got, fused_ops.silu_and_mul_ref(gate_up)) <= TOL[dtype]
    gate, up = randn(T, N, dtype=dtype, g=g), randn(T, N, dtype=dtype, g=g)
    with poisoned_outputs():
        got2 = fused_ops.silu_mul(gate, up)
    assert rel_err(got2, fused_ops.silu_mul_ref(gate, up)) <= TOL[dtype]


def test_empty_batch_and_bad_shapes():
    w = torch.ones(64, device=DEVICE)
    assert fused_ops.rmsnorm(torch.empty(0, 64, device=DEVICE), w, 1e-6).shape == (0, 64)
    q, k = fused_ops.qk_norm_rope(torch.empty(0, 2, 8, device=DEVICE), torch.empty(0, 1, 8, device=DEVICE),
                                  torch.empty(0, 1, 8, device=DEVICE), torch.empty(0, 1, 8, device=DEVICE))
    assert q.shape == (0, 2, 8) and k.shape == (0, 1, 8)
    with pytest.raises(ValueError, match="norm weight"):
        fused_ops.rmsnorm(torch.ones(2, 32, device=DEVICE), w, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_ops.fused_add_rmsnorm(torch.ones(2, 64, device=DEVICE), torch.ones(2, 64, device=DEVICE,
                                    dtype=torch.bfloat16), w, 1e-6)
    with pytest.raises(ValueError, match="one dtype"):
        fused_ops.qk_norm_rope(torch.ones(1, 2, 8, device=DEVICE), torch.ones(1, 1, 8, device=DEVICE),
                               *(torch.ones(1, 1, 8, device=DEVICE, dtype=torch.bfloat16),) * 2)


@triton.jit
def _to_bf16_kernel(X, Out, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Out + offs, tl.load(X + offs, mask=offs < N).to(tl.bfloat16), mask=offs < N)


def test_float32_to_bfloat16_rounds_to_nearest_even():
    """The interpreter fix (kernels/triton_support.py): .to(bf16) rounds as torch and the GPU do."""
    one = 1.0
    vals = [one + 2 ** -8, one + 3 * 2 ** -8, one + 2 ** -8 + 2 ** -20, -(one + 2 ** -8 + 2 ** -20), 3.3895e38,
            3.4028235e38, float("inf"), -float("inf"), -0.0, 1e-40, -3e-39, 2 ** -133, 1.9921875 + 2 ** -9, 0.1]
    g = gen(5)
    x = torch.cat([torch.tensor(vals, device=DEVICE), torch.randn(200, generator=g, device=DEVICE) * 100])
    x = torch.cat([x, torch.tensor([float("nan")], device=DEVICE)])
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _to_bf16_kernel[(1,)](x, out, x.numel(), BLOCK=256)
    ref = x.to(torch.bfloat16)
    assert torch.equal(out[:-1], ref[:-1]) and out[-1].isnan()


# Compiles every kernel variant the model launches for an H100/H200 (sm_90) with Triton's own ptxas, in a
# process without the interpreter: what the interpreter does not check (types through the compiler, the
# launch options) fails here rather than on a GPU lease. And the bf16 RoPE has no fused multiply-add.
AOT_SCRIPT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sglang_duet.kernels import fused_ops, fused_ops_triton as K

def compile_(fn, dtype, **constexprs):
    ints = ("D", "N", "H", "H_KV", "half")
    sig = {p.name: "constexpr" if p.is_constexpr else "fp32" if p.name == "eps" else "*i64" if p.name == "Loc" else
           "i32" if p.name in ints or p.name.startswith("stride") else f"*{dtype}" for p in fn.params}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(fused_ops.TORCH_ROUNDING))

for dtype in ("bf16", "fp32"):
    for flag in (False, True):
        compile_(K.rmsnorm_kernel, dtype, HAS_RESIDUAL=flag, BLOCK=4096)
        for store in (False, True):
            ptx = compile_(K.qk_norm_rope_kernel, dtype, HAS_NORM=flag, STORE_KV=store, BLOCK_H=64).asm["ptx"]
            assert not re.search(r"\bfma\.", ptx), "RoPE contracted into an FMA"
    compile_(K.silu_mul_kernel, dtype, BLOCK=fused_ops.SILU_BLOCK)
print("compiled")
"""


def test_kernels_compile_for_sm90_without_fma():
    pytest.importorskip("triton.compiler", reason="this Triton cannot compile ahead of time")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        out = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the fused kernels took over 300 s")
    if "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("this Triton has no ptxas to compile with")
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


# ---- the model's choice -----------------------------------------------------------------------------------

def test_resolve(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fused_ops.resolve.cache_clear()
    try:
        monkeypatch.delenv(fused_ops.TORCH_OPS_ENV, raising=False)
        assert fused_ops.resolve(cpu) is None  # a CPU keeps the torch ops, interpreter or not
        assert fused_ops.resolve(cpu, False) is None
        assert fused_ops.resolve(cuda) is fused_ops.FUSED_OPS  # (the device is not touched)
        assert fused_ops.resolve(cuda, False) is None
        fused_ops.resolve.cache_clear()
        monkeypatch.setenv(fused_ops.TORCH_OPS_ENV, "1")
        assert fused_ops.resolve(cuda) is None
        assert fused_ops.resolve(cuda, True) is fused_ops.FUSED_OPS
        if DEVICE == "cpu":
            assert fused_ops.resolve(cpu, True) is fused_ops.FUSED_OPS  # under the interpreter
    finally:
        fused_ops.resolve.cache_clear()


def test_cpu_model_import_does_not_import_triton():
    code = ("import sys, torch; import sglang_duet.models.llama as m; "
            "from sglang_duet.kernels import fused_ops; "
            "assert fused_ops.resolve(torch.device('cpu')) is None; assert 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "1"})


class LaunchCounter:
    """Counts launches of a Triton kernel (kernel[grid](...)) and forwards them."""

    def __init__(self, kernel, counts: dict, name: str):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return self.kernel[grid]


def _tiny(tiny_model_factory, family: str):
    lm = load_model(tiny_model_factory(family), device=DEVICE)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # norm weights away from HF's ones (a weight bug must show)
        for name, p in lm.model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return lm


def _steps(model, prompts, decode_steps: int, fused: bool):
    """Logits of a batched prefill and of `decode_steps` greedy decode steps (page-size-1 slots)."""
    model.use_fused_ops = fused
    cfg = model.config
    pool = KVCachePool(cfg.num_hidden_layers, 256, cfg.num_key_value_heads, cfg.head_dim, torch.float32, DEVICE)
    slots = [list(range(1 + 100 * r, 1 + 100 * r + len(p) + decode_steps)) for r, p in enumerate(prompts)]
    fb = ForwardBatch.build([(p, 0, slots[r], True) for r, p in enumerate(prompts)], device=DEVICE)
    out = [model(fb, TorchAttentionBackend(), pool)]
    toks = [[t] for t in out[-1].argmax(-1).tolist()]
    for _ in range(decode_steps):
        reqs = [([toks[r][-1]], len(p) + len(toks[r]) - 1, slots[r], True) for r, p in enumerate(prompts)]
        out.append(model(ForwardBatch.build(reqs, device=DEVICE), TorchAttentionBackend(), pool))
        for r, t in enumerate(out[-1].argmax(-1).tolist()):
            toks[r].append(t)
    return out, toks


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_model_forward_fused_matches_torch_ops(tiny_model_factory, family, monkeypatch):
    lm = _tiny(tiny_model_factory, family)
    prompts = [lm.tokenizer(p).input_ids for p in ("The capital of France is", "def add(a, b):")]
    ref, ref_toks = _steps(lm.model, prompts, 3, fused=False)
    counts: dict = {}
    k = fused_ops._kernels()
    for name in ("rmsnorm_kernel", "qk_norm_rope_kernel", "silu_mul_kernel"):
        monkeypatch.setattr(k, name, LaunchCounter(getattr(k, name), counts, name))
    got, toks = _steps(lm.model, prompts, 3, fused=True)
    assert toks == ref_toks
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # per forward and layer: 2 norms, 1 QK-norm + RoPE, 1 SiLU * up; plus the final norm
    layers, forwards = lm.config.num_hidden_layers, len(got)
    assert counts == {"rmsnorm_kernel": forwards * (2 * layers + 1), "qk_norm_rope_kernel": forwards * layers,
                      "silu_mul_kernel": forwards * layers}
    assert fused_ops.resolve(torch.device(DEVICE)) is (fused_ops.FUSED_OPS if DEVICE == "cuda" else None)
