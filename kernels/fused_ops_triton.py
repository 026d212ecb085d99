"""The Triton kernels behind kernels/fused_ops.py (its docstring says what they compute and why).

A module of its own so that importing the model (and fused_ops' torch references) on a CPU does not
import Triton: fused_ops imports this module only when the fused ops are chosen or called.
"""
from __future__ import annotations

from sglang_duet.kernels.triton_support import HAS_TRITON, next_pow2, tl, triton  # noqa: F401  (next_pow2: fused_ops)

if not HAS_TRITON:  # pragma: no cover - depends on the environment
    raise ImportError("the fused layer ops need the 'triton' package (pip install triton)")


@triton.jit
def rmsnorm_kernel(X, R, W, Out, ROut, stride_x, stride_r, D, eps,
                   HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One row per program. With a residual: ROut = round(X + R), Out = norm(ROut)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(ROut.dtype.element_ty)
        tl.store(ROut + row * D + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    y = (xf * rstd).to(x.dtype)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(Out + row * D + cols, (w.to(tl.float32) * y.to(tl.float32)).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_head(X, W, Cos, Sin, offs, mask, half, eps, HAS_NORM: tl.constexpr):
    """One head of head_dim 2 * half (X, Cos, Sin point at its first element, contiguous): its two halves
    after the optional per-head RMSNorm and RoPE, in X's dtype."""
    x1 = tl.load(X + offs, mask=mask, other=0.0)
    x2 = tl.load(X + half + offs, mask=mask, other=0.0)
    dt = x1.dtype
    if HAS_NORM:
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / (2 * half) + eps)
        w1 = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(W + half + offs, mask=mask, other=0.0).to(tl.float32)
        x1 = (w1 * (a * rstd).to(dt).to(tl.float32)).to(dt)
        x2 = (w2 * (b * rstd).to(dt).to(tl.float32)).to(dt)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    c1 = tl.load(Cos + offs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + half + offs, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + offs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + half + offs, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product rounded as torch's is
    o1 = (a * c1).to(dt).to(tl.float32) - (b * s1).to(dt).to(tl.float32)
    o2 = (b * c2).to(dt).to(tl.float32) + (a * s2).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt)


@triton.jit
def qk_norm_rope_kernel(Q, K, QOut, KOut, QW, KW, Cos, Sin, V, KCache, VCache, Loc,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st, stride_vt, stride_vh,
                        H, H_KV, half, eps, HAS_NORM: tl.constexpr, STORE_KV: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """Program (token t, head h): h < H is query head h, else key head h - H. With STORE_KV a key head also
    writes its roped k and the token's v for that head into the layer's KV pool rows at slot Loc[t]
    (what the attention backend's store would do, without its two scatter launches)."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cos = Cos + t * stride_ct
    sin = Sin + t * stride_st
    offs = tl.arange(0, BLOCK_H)
    mask = offs < half
    if h < H:
        o1, o2 = _norm_rope_head(Q + t * stride_qt + h * stride_qh, QW, cos, sin, offs, mask, half, eps, HAS_NORM)
        out = QOut + (t * H + h) * (2 * half)
        tl.store(out + offs, o1, mask=mask)
        tl.store(out + half + offs, o2, mask=mask)
    else:
        hk = h - H
        o1, o2 = _norm_rope_head(K + t * stride_kt + hk * stride_kh, KW, cos, sin, offs, mask, half, eps, HAS_NORM)
        out = KOut + (t * H_KV + hk) * (2 * half)
        tl.store(out + offs, o1, mask=mask)
        tl.store(out + half + offs, o2, mask=mask)
        if STORE_KV:
            row = tl.load(Loc + t).to(tl.int64) * (H_KV * 2 * half) + hk * (2 * half)
            tl.store(KCache + row + offs, o1.to(KCache.dtype.element_ty), mask=mask)
            tl.store(KCache + row + half + offs, o2.to(KCache.dtype.element_ty), mask=mask)
            v = V + t * stride_vt + hk * stride_vh
            tl.store(VCache + row + offs, tl.load(v + offs, mask=mask, other=0.0), mask=mask)
            tl.store(VCache + row + half + offs, tl.load(v + half + offs, mask=mask, other=0.0), mask=mask)


@triton.jit
def silu_mul_kernel(G, U, Out, stride_g, stride_u, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(Out + row * N + cols, (s.to(tl.float32) * u.to(tl.float32)).to(Out.dtype.element_ty), mask=mask)
