"""The Llama layer's elementwise work as fused Triton kernels: RMSNorm, residual add + RMSNorm, per-head
QK-norm + RoPE, SiLU * up.

Why: written as torch ops a layer launches ~50 small kernels (RMSNorm alone is float, pow, mean, rsqrt,
mul, cast, weight mul; RoPE is slices, neg, cat, muls and adds for q and k). A decode step of a 36-layer
model is then ~1800 launches of ~2.5-3 us each: more time than its GEMMs' HBM floor. Here each of those
groups is one kernel (one pass over the activations), so a decoder layer's elementwise work is 4 launches.

Numerics are today's op sequences (the `*_ref` functions, which models/llama.py runs on a CPU):
  * RMSNorm in float32, x * rsqrt(mean(x^2) + eps), cast to the input dtype, then times the weight
    (rounded to the result dtype of weight * x, as `weight * xf.to(dtype)` is);
  * the residual add rounded to the activation dtype as torch's add is, and the norm of that rounded value;
  * RoPE as q * cos + rotate_half(q) * sin with every product and the sum rounded to the activation dtype
    (in bf16, as torch rounds each op's result); SiLU(gate) rounded, then times up.
Only the float32 sums of the norms run in another order, and on a GPU 1/sqrt and exp are the fast
approximate instructions (last-bit differences in float32; rarely one bf16 ulp of an output).

All kernels are CUDA-graph capturable: grids and buffers depend on shapes only, no host syncs.
Inputs may be row-strided views (q/k/v split from one GEMM output, gate/up halves of one); the last dim
must be contiguous, else it is copied (`.contiguous()`). Outputs are new contiguous tensors.

Which path a model takes is `resolve(device, force)`: fused on a CUDA device when Triton imports, unless
SGLANG_DUET_TORCH_OPS=1 (the A/B switch: the same model on the torch ops); on a CPU never, unless forced
(tests force it under Triton's interpreter). The CPU path is the torch ops, bit for bit as before.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

#: set to 1 to run a CUDA model on the torch ops (the reference path) instead of the fused kernels
TORCH_OPS_ENV = "SGLANG_DUET_TORCH_OPS"


# ---- torch references: the op sequences of models/llama.py ----------------------------------------------

def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual
    return rmsnorm_ref(residual, weight, eps), residual


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def qk_norm_rope_ref(q, k, cos, sin, q_norm_w=None, k_norm_w=None, eps: float = 1e-6):
    if q_norm_w is not None:
        q, k = rmsnorm_ref(q, q_norm_w, eps), rmsnorm_ref(k, k_norm_w, eps)
    return rope_ref(q, cos, sin), rope_ref(k, cos, sin)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    return silu_mul_ref(*gate_up.chunk(2, dim=-1))


# ---- python API ---------------------------------------------------------------------------------------------

def _kernels():
    """The Triton kernels (imported on first use: a CPU model never imports Triton)."""
    from sglang_duet.kernels import fused_ops_triton

    return fused_ops_triton


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with a contiguous last dim (a view where the strides allow, else a copy)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 2:
        return x
    return x.reshape(-1, x.shape[-1])


# Every launch: no contraction of a multiply and an add into one FMA (Triton's default contracts them, e.g.
# RoPE's bf16 x * cos + rot * sin into fma.rn.bf16, one rounding where torch rounds twice). The kernels are
# memory-bound: the FMAs would save nothing, and without them each product and sum rounds as torch's does.
TORCH_ROUNDING = {"enable_fp_fusion": False}


def _norm_warps(block: int) -> int:
    return min(8, max(1, block // 512))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm_ref(x, weight, eps) over the last dim, in one kernel."""
    return _rmsnorm(x, None, weight, eps)[0]


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual) in one kernel; the sum rounded to x's dtype as torch's add."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x "
                         f"{tuple(x.shape)} {x.dtype}")
    return _rmsnorm(x, residual, weight, eps)


def _rmsnorm(x, residual, weight, eps):
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"norm weight {tuple(weight.shape)} does not match the last dim {D}")
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    x2 = _rows(x)
    n = x2.shape[0]
    if n:
        r2 = _rows(residual) if residual is not None else x2
        kernels = _kernels()
        block = kernels.next_pow2(D)
        kernels.rmsnorm_kernel[(n,)](x2, r2, weight.contiguous(), out, res_out if res_out is not None else out,
                                     x2.stride(0), r2.stride(0), D, float(eps),
                                     HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_norm_warps(block),
                                     **TORCH_ROUNDING)
    return out, res_out


@dataclass(frozen=True)
class KVStore:
    """Where `qk_norm_rope` also writes each new token's roped k and its v: one layer's pool rows
    (`k_cache`, `v_cache`: contiguous [slots, H_kv, D] in the activations' dtype) at slots `loc` ([T] int64,
    the batch's out_cache_loc). Then the attention backend runs with kv_stored=True: two scatter launches
    per layer fewer (72 in a Qwen3-8B decode step)."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    loc: torch.Tensor
    v: torch.Tensor  # [T, H_kv, D], any token/head strides (a view of the q/k/v GEMM's output)

    def check(self, k: torch.Tensor) -> None:
        T, H_kv, D = k.shape
        for name, c in (("k_cache", self.k_cache), ("v_cache", self.v_cache)):
            if c.dim() != 3 or tuple(c.shape[1:]) != (H_kv, D) or not c.is_contiguous() or c.dtype != k.dtype:
                raise ValueError(f"KVStore.{name} {tuple(c.shape)} {c.dtype}: want contiguous [slots, {H_kv}, {D}] "
                                 f"{k.dtype}")
        if tuple(self.v.shape) != (T, H_kv, D) or self.v.dtype != k.dtype:
            raise ValueError(f"KVStore.v {tuple(self.v.shape)} {self.v.dtype}: want [{T}, {H_kv}, {D}] {k.dtype}")
        if tuple(self.loc.shape) != (T,) or self.loc.dtype != torch.int64:
            raise ValueError(f"KVStore.loc {tuple(self.loc.shape)} {self.loc.dtype}: want [{T}] int64")


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 q_norm_w: torch.Tensor | None = None, k_norm_w: torch.Tensor | None = None,
                 eps: float = 1e-6, kv_store: KVStore | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """qk_norm_rope_ref in one kernel: q [T, H, D], k [T, H_kv, D] (any token/head strides), cos/sin
    [T, 1, D] or [T, D]; per-head RMSNorm first when the weights are given (Qwen3). New contiguous
    outputs. Weights, cos and sin must have q's dtype (the model's; mixed dtypes would promote).
    With `kv_store`, the roped k and the v of every token are also written into the KV pool there."""
    T, H, D = q.shape
    H_kv = k.shape[1]
    if k.shape != (T, H_kv, D) or D % 2:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)}: want [T, H, D] and [T, H_kv, D], D even")
    if (q_norm_w is None) != (k_norm_w is None):
        raise ValueError("qk_norm_rope: give both norm weights or neither")
    if q_norm_w is not None and (q_norm_w.shape != (D,) or k_norm_w.shape != (D,)):
        raise ValueError(f"q/k norm weights {tuple(q_norm_w.shape)} / {tuple(k_norm_w.shape)}: want [{D}]")
    tensors = [k, cos, sin] + ([q_norm_w, k_norm_w] if q_norm_w is not None else [])
    if any(t.dtype != q.dtype for t in tensors):
        raise ValueError(f"qk_norm_rope needs one dtype, got {[t.dtype for t in [q] + tensors]}")
    if cos.dim() == 3 and cos.shape[1] == 1 and sin.dim() == 3 and sin.shape[1] == 1:
        cos, sin = cos[:, 0], sin[:, 0]
    if cos.shape != (T, D) or sin.shape != (T, D):
        raise ValueError(f"cos/sin {tuple(cos.shape)}: want [T, 1, D] = [{T}, 1, {D}]")
    if kv_store is not None:
        kv_store.check(k)
    q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    q_out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    k_out = torch.empty((T, H_kv, D), dtype=k.dtype, device=k.device)
    if T:
        has_norm = q_norm_w is not None
        qw, kw = (q_norm_w.contiguous(), k_norm_w.contiguous()) if has_norm else (q, k)  # (q, k: unread)
        kernels = _kernels()
        if kv_store is not None:
            v = kv_store.v if kv_store.v.stride(-1) == 1 else kv_store.v.contiguous()
            v_args = (v, kv_store.k_cache, kv_store.v_cache, kv_store.loc)
        else:
            v, v_args = k, (k, k_out, k_out, k)  # (unread)
        kernels.qk_norm_rope_kernel[(T, H + H_kv)](
            q, k, q_out, k_out, qw, kw, cos, sin, *v_args,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0), v.stride(0), v.stride(1),
            H, H_kv, D // 2, float(eps), HAS_NORM=has_norm, STORE_KV=kv_store is not None,
            BLOCK_H=kernels.next_pow2(D // 2), num_warps=1, **TORCH_ROUNDING)
    return q_out, k_out


SILU_BLOCK = 1024


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu_mul_ref(gate, up) for [T, N] inputs (row-strided views allowed), in one kernel."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dim() != 2:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} {gate.dtype}, up {tuple(up.shape)} {up.dtype}")
    gate, up = (t if t.stride(-1) == 1 else t.contiguous() for t in (gate, up))
    T, N = gate.shape
    out = torch.empty((T, N), dtype=gate.dtype, device=gate.device)
    if T and N:
        _kernels().silu_mul_kernel[(T, -(-N // SILU_BLOCK))](gate, up, out, gate.stride(0), up.stride(0), N,
                                                              BLOCK=SILU_BLOCK, num_warps=4, **TORCH_ROUNDING)
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2N] (gate first, as the fused gate/up GEMM writes it)."""
    return silu_mul(*gate_up.chunk(2, dim=-1))


# ---- the model's choice -------------------------------------------------------------------------------------

class FusedOps:
    """The fused kernels as models/llama.py calls them: norms given as its RMSNorm modules (weight, eps)."""

    @staticmethod
    def add_norm(x: torch.Tensor, residual: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); residual None (the first layer): (norm(x), x)."""
        if residual is None:
            return rmsnorm(x, norm.weight, norm.eps), x
        return fused_add_rmsnorm(x, residual, norm.weight, norm.eps)

    @staticmethod
    def qk_norm_rope(q, k, cos, sin, q_norm=None, k_norm=None,
                     kv_store: KVStore | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head q_norm/k_norm (Qwen3; None: none) then RoPE, q and k in one kernel (and k, v into the
        pool with `kv_store`)."""
        if q_norm is None:
            return qk_norm_rope(q, k, cos, sin, kv_store=kv_store)
        return qk_norm_rope(q, k, cos, sin, q_norm.weight, k_norm.weight, q_norm.eps, kv_store)

    @staticmethod
    def kv_store(attn, kv_pool, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> KVStore | None:
        """Where the RoPE kernel can write this layer's new k/v itself: the pool's rows at the slots the
        attention backend's batch assigns, when the pool holds the activations' dtype in contiguous
        [slots, H_kv, D] rows; else None (the backend stores them)."""
        loc = attn.new_token_slots()
        if loc is None or kv_pool.dtype != k.dtype or loc.dtype != torch.int64:
            return None
        k_cache, v_cache = kv_pool.get_kv(layer_id)
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or tuple(k_cache.shape[1:]) != tuple(k.shape[1:]):
            return None
        return KVStore(k_cache, v_cache, loc, v)

    silu_mul = staticmethod(silu_mul)


FUSED_OPS = FusedOps()


@functools.lru_cache(maxsize=None)
def resolve(device: torch.device | str, force: bool | None = None) -> FusedOps | None:
    """The fused ops for activations on `device`, or None for the torch ops. Resolved once per (device,
    force) in a process: the environment is read then (tests that change it call resolve.cache_clear()).

    force=None: fused on a CUDA device when Triton imports, unless SGLANG_DUET_TORCH_OPS=1; never on a CPU.
    force=True: fused wherever Triton can run (CUDA, or a CPU under TRITON_INTERPRET=1), else a ValueError.
    force=False: the torch ops."""
    if force is False:
        return None
    device = torch.device(device)  # lru_cache keys on what the caller passed: pass a torch.device
    if not force and (device.type != "cuda" or os.environ.get(TORCH_OPS_ENV, "0") not in ("", "0")):
        return None
    if importlib.util.find_spec("triton") is None:
        if force:
            raise ValueError("fused ops forced, but the 'triton' package is not installed")
        return None
    from sglang_duet.kernels.triton_support import interpreter_enabled

    if device.type != "cuda" and not interpreter_enabled():  # only when forced
        raise ValueError(f"fused ops forced, but Triton cannot run on {device} (needs CUDA or TRITON_INTERPRET=1)")
    _kernels()  # import (not compile) the kernels now, rather than fail in the middle of a forward
    return FUSED_OPS
