"""Triton attention over the token-slot KV pool (page size 1): decode and extend kernels.

Runs on a CUDA GPU, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported), which is how CI checks it against the torch reference.

Both kernels read K/V straight from the pool through `kv_indices` (the slots of every token of a
request, position order), after `run` has stored the new tokens' k/v at `out_cache_loc`; so a
cached prefix, a chunk of a prefill and a decode token are all just "keys at these slots".

* Decode (every request adds one token): flash-decoding in two stages. Stage 1 gives each
  (request, KV head, split) program one slice of the context and all query heads of that KV
  head's GQA group (the K/V tile is loaded once per group, the point of GQA); it writes a partial
  output and its log-sum-exp. Stage 2 merges the splits. Splits keep the GPU busy at small
  batch x long context; the split count is a compile-time constant, each program derives its
  slice from the runtime length, so any count is correct (which CUDA graphs rely on).
* Extend (prefill chunks, mixed batches): one program per (request, query head, block of
  BLOCK_M new tokens), looping over the request's keys with a bottom-right causal mask (query j
  at position prefix + j sees keys 0..prefix + j). A mixed batch runs entirely through it: a
  decode row is an extend of length 1.

Numerics: q.k and p.v on tensor cores in the input dtype (IEEE fp32 for float32 inputs, never
TF32), softmax statistics in float32, output in q's dtype. Scale 1/sqrt(D) as SDPA's default.
"""
from __future__ import annotations

import math

import torch

from sglang_duet.kernels.attention.base import AttentionBackend, ForwardBatch
# Triton itself (optional) and the interpreter's NumPy fix live in one place for every kernel module;
# HAS_TRITON and interpreter_enabled are also read from here by callers.
from sglang_duet.kernels.triton_support import HAS_TRITON, interpreter_enabled, next_pow2, tl, triton


def check_available(device: torch.device) -> None:
    """Raise a clear error when Triton cannot run on `device` here."""
    if not HAS_TRITON:
        raise ValueError("--attention-backend triton: the 'triton' package is not installed "
                         "(pip install triton), use 'torch'")
    if torch.device(device).type != "cuda" and not interpreter_enabled():
        raise ValueError("--attention-backend triton needs a CUDA device (or TRITON_INTERPRET=1 "
                         "set before triton is imported, for slow CPU correctness runs)")


if HAS_TRITON:

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, MidO, MidLse, kv_indptr, kv_indices, sm_scale,
        stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
        stride_mt, stride_mh, stride_ms, stride_lt, stride_lh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        hkv = tl.program_id(1)
        split = tl.program_id(2)
        kv_start = tl.load(kv_indptr + b).to(tl.int64)
        kv_len = tl.load(kv_indptr + b + 1).to(tl.int64) - kv_start
        split_len = tl.cdiv(kv_len, NUM_SPLITS)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, kv_len)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        mask_g = offs_g < GROUP
        mask_d = offs_d < HEAD_DIM
        heads = hkv * GROUP + offs_g
        q = tl.load(Q + b * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0)

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask_n = offs_n < hi
            slots = tl.load(kv_indices + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(K + slots[:, None] * stride_ks + hkv * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * sm_scale
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(V + slots[:, None] * stride_vs + hkv * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new

        # An empty split (context shorter than NUM_SPLITS slices) contributes weight 0.
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        mid = MidO + b * stride_mt + heads[:, None] * stride_mh + split * stride_ms + offs_d[None, :]
        tl.store(mid, out, mask=mask_g[:, None] & mask_d[None, :])
        tl.store(MidLse + b * stride_lt + heads * stride_lh + split, lse, mask=mask_g)

    @triton.jit
    def _decode_merge_kernel(
        MidO, MidLse, O, stride_mt, stride_mh, stride_ms, stride_lt, stride_lh, stride_ot, stride_oh,
        HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        mask_s = offs_s < NUM_SPLITS
        mask_d = offs_d < HEAD_DIM
        lse = tl.load(MidLse + b * stride_lt + h * stride_lh + offs_s, mask=mask_s,
                      other=float("-inf"))
        m = tl.max(lse, 0)  # finite: split 0 always holds at least one key
        w = tl.exp(lse - m)
        parts = tl.load(MidO + b * stride_mt + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
                        mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
        tl.store(O + b * stride_ot + h * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _extend_kernel(
        Q, K, V, O, qo_indptr, kv_indptr, kv_indices, sm_scale,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_ks, stride_kh, stride_vs, stride_vh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        mb = tl.program_id(2)
        hkv = h // GROUP
        q_start = tl.load(qo_indptr + b).to(tl.int64)
        q_len = tl.load(qo_indptr + b + 1).to(tl.int64) - q_start
        kv_start = tl.load(kv_indptr + b).to(tl.int64)
        kv_len = tl.load(kv_indptr + b + 1).to(tl.int64) - kv_start
        prefix = kv_len - q_len

        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < q_len
        mask_d = offs_d < HEAD_DIM
        q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)

        # Keys visible to the last query row of this block; a block past the request's new
        # tokens (the grid is sized by the longest request) loops zero times.
        end = tl.minimum(kv_len, prefix + (mb + 1) * BLOCK_M)
        end = end * (mb * BLOCK_M < q_len).to(tl.int64)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start in range(0, end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            slots = tl.load(kv_indices + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(K + slots[:, None] * stride_ks + hkv * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * sm_scale
            visible = (offs_n[None, :] <= prefix + offs_m[:, None]) & mask_n[None, :]
            s = tl.where(visible, s, float("-inf"))
            # Key 0 is visible to every row, so after the first block m_new is finite.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(V + slots[:, None] * stride_vs + hkv * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs must not silently drop to TF32 (10-bit mantissa) on the GPU.
    return "ieee" if dtype == torch.float32 else "tf32"


def num_kv_splits(batch: int, num_kv_heads: int, max_seq_len: int, max_splits: int = 16,
                  min_tokens_per_split: int = 256, target_programs: int = 264) -> int:
    """Power-of-two split count: enough programs to fill the GPU (about 2 per SM on 132 SMs),
    no split shorter than `min_tokens_per_split` tokens. Powers of two bound recompilations."""
    want = max(1, -(-target_programs // max(1, batch * num_kv_heads)))
    by_len = max(1, max_seq_len // min_tokens_per_split)
    return min(max_splits, next_pow2(min(want, by_len)))


def decode_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, out: torch.Tensor,
                     kv_indptr: torch.Tensor, kv_indices: torch.Tensor, num_splits: int,
                     sm_scale: float | None = None, block_n: int = 32) -> torch.Tensor:
    """q [B, H, D] (one query per request), k/v_buf [slots, H_kv, D], out [B, H, D]."""
    B, H, D = q.shape
    H_kv = k_buf.shape[1]
    group = H // H_kv
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    mid_o = torch.empty(B, H, num_splits, D, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q.device)
    block_d = max(16, next_pow2(D))
    _decode_split_kernel[(B, H_kv, num_splits)](
        q, k_buf, v_buf, mid_o, mid_lse, kv_indptr, kv_indices, sm_scale,
        q.stride(0), q.stride(1), k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_DIM=D, NUM_SPLITS=num_splits, BLOCK_G=max(16, next_pow2(group)),
        BLOCK_D=block_d, BLOCK_N=block_n, PRECISION=_precision(q.dtype),
    )
    _decode_merge_kernel[(B, H)](
        mid_o, mid_lse, out, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0),
        mid_lse.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=D, NUM_SPLITS=num_splits, BLOCK_S=max(2, next_pow2(num_splits)), BLOCK_D=block_d,
    )
    return out


def extend_attention(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, out: torch.Tensor,
                     qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                     max_extend_len: int, sm_scale: float | None = None,
                     block_m: int = 32, block_n: int = 32) -> torch.Tensor:
    """q [T, H, D] new tokens of B requests (qo_indptr), keys of each request via kv_indptr/indices."""
    T, H, D = q.shape
    B = qo_indptr.numel() - 1
    H_kv = k_buf.shape[1]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    grid = (B, H, triton.cdiv(max_extend_len, block_m))
    _extend_kernel[grid](
        q, k_buf, v_buf, out, qo_indptr, kv_indptr, kv_indices, sm_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_buf.stride(0), k_buf.stride(1), v_buf.stride(0), v_buf.stride(1),
        GROUP=H // H_kv, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(D)),
        PRECISION=_precision(q.dtype),
    )
    return out


class TritonAttentionBackend(AttentionBackend):
    """plan() reads only host mirrors (no device sync); run() stores k/v, then one kernel pair.

    `fixed_kv_splits`: when set, decode always uses that many splits (a CUDA graph captures
    the grid, so the graph runner pins it); otherwise `num_kv_splits` picks per step.
    """

    name = "triton"

    def __init__(self, num_kv_heads: int, max_kv_splits: int = 16, fixed_kv_splits: int | None = None,
                 block_m: int = 32, block_n: int = 32) -> None:
        self.num_kv_heads = num_kv_heads
        self.max_kv_splits = max_kv_splits
        self.fixed_kv_splits = fixed_kv_splits
        self.block_m, self.block_n = block_m, block_n
        self._fb: ForwardBatch | None = None
        self._decode = False
        self._splits = 1
        self._max_extend = 1

    def plan(self, fb: ForwardBatch) -> None:
        self._fb = fb
        seq = fb.seq_lens_cpu or fb.seq_lens.tolist()
        self._decode = fb.is_decode_only
        if self._decode:
            self._splits = self.fixed_kv_splits or num_kv_splits(len(seq), self.num_kv_heads, max(seq),
                                                                 self.max_kv_splits)
        else:
            ext = fb.extend_lens_cpu or (fb.seq_lens - fb.prefix_lens).tolist()
            self._max_extend = max(ext)

    def run(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pool,
            kv_stored: bool = False) -> torch.Tensor:
        fb = self._fb
        assert fb is not None, "plan() must be called before run()"
        if not kv_stored:
            kv_pool.set_kv(layer_id, fb.out_cache_loc, k, v)
        k_buf, v_buf = kv_pool.get_kv(layer_id)
        q = q.contiguous()
        T, H, D = q.shape
        out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
        if self._decode:
            decode_attention(q, k_buf, v_buf, out, fb.kv_indptr, fb.kv_indices, self._splits,
                             block_n=self.block_n)
        else:
            extend_attention(q, k_buf, v_buf, out, fb.qo_indptr, fb.kv_indptr, fb.kv_indices, self._max_extend,
                             block_m=self.block_m, block_n=self.block_n)
        return out.reshape(T, H * D)

    # ---- CUDA graphs (see kernels/cuda_graph.py) -------------------------------------------

    def graph_state(self, batch_size: int, max_kv_tokens: int) -> int:
        """The split count this bucket's graph is captured with: sized for a long context, since
        a graph replays one grid for every later length (shorter contexts leave splits empty)."""
        return self.fixed_kv_splits or num_kv_splits(batch_size, self.num_kv_heads, 1 << 20, self.max_kv_splits)

    def plan_graph(self, state: int, fb: ForwardBatch, q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
        # Kernels read indptr/indices through fb's tensors, which are the runner's static buffers.
        self._fb = fb
        self._decode = True
        self._splits = state
