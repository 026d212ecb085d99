"""Reference attention backend in plain PyTorch (CPU or GPU): the oracle for tests.

Strategy: requests that add one token (decodes) are padded into one batched SDPA call
with a key-length mask; each request that adds several tokens (prefill / extend chunk)
gets its own SDPA call, so a long prefill next to many decodes never pads every decode
to the prefill's length. K/V are gathered from the pool by slot index, which keeps the
backend agnostic to how the allocator scattered the slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang_duet.kernels.attention.base import AttentionBackend, ForwardBatch


@dataclass
class _Group:
    q_rows: torch.Tensor  # [b, n] rows of the T new tokens (n = new tokens per request)
    kv_slots: torch.Tensor  # [b, L] pool slots, padded with slot 0 (the reserved padding slot)
    mask: torch.Tensor | None  # [b, 1, n, L] bool (True = may attend) or None
    is_causal: bool  # SDPA's own causal mask is right (no cached prefix, square scores)
    decode: bool = False  # one query per request: the batched GQA matmul path


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self) -> None:
        self._groups: list[_Group] = []
        self._fb: ForwardBatch | None = None
        # K and V gathered into buffers kept across layers and steps (grown when a group needs more): a
        # fresh 12 MB tensor per gather (16 requests at 1000 cached tokens, SmolLM2) is a fresh mapping
        # whenever glibc's mmap threshold sits below it (as once torch's inductor is imported), faulted in
        # and zeroed page by page every layer: the eager step took 443 ms, 206-216 with the buffers
        # (2 threads, the 2-core AVX2 machine)
        self._gathered: dict[tuple, torch.Tensor] = {}

    def plan(self, fb: ForwardBatch) -> None:
        self._fb = fb
        self._groups = []
        dev = fb.device
        seq = fb.seq_lens_cpu or fb.seq_lens.tolist()
        pre = fb.prefix_lens_cpu or fb.prefix_lens.tolist()
        kv_indptr = [0]
        for s in seq:
            kv_indptr.append(kv_indptr[-1] + s)
        q_start = 0
        decodes: list[int] = []
        for i, (s, p) in enumerate(zip(seq, pre)):
            n = s - p
            if n == 1:
                decodes.append(i)
            else:
                rows = torch.arange(q_start, q_start + n, device=dev).unsqueeze(0)
                slots = fb.kv_indices[kv_indptr[i]:kv_indptr[i + 1]].unsqueeze(0)
                if p == 0:
                    self._groups.append(_Group(rows, slots, None, True))
                else:
                    # Query j sits at position p + j and sees keys at positions <= p + j
                    # (bottom-right aligned causal mask, which SDPA's is_causal is not).
                    qpos = torch.arange(p, s, device=dev).unsqueeze(1)
                    kpos = torch.arange(s, device=dev).unsqueeze(0)
                    self._groups.append(_Group(rows, slots, (kpos <= qpos)[None, None], False))
            q_start += n
        if decodes:
            # All rows/slots below are built on the host once per step, shared by every layer.
            q_off = [0]
            for s, p in zip(seq, pre):
                q_off.append(q_off[-1] + s - p)
            max_len = max(seq[i] for i in decodes)
            slots = torch.zeros(len(decodes), max_len, dtype=torch.long, device=dev)
            for b, i in enumerate(decodes):
                slots[b, : seq[i]] = fb.kv_indices[kv_indptr[i]:kv_indptr[i + 1]]
            lens = torch.tensor([seq[i] for i in decodes], device=dev)
            mask = (torch.arange(max_len, device=dev)[None, :] < lens[:, None])[:, None, None, :]
            rows = torch.tensor([q_off[i] for i in decodes], dtype=torch.long, device=dev).unsqueeze(1)
            self._groups.append(_Group(rows, slots, mask, False, decode=True))

    def run(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_pool,
            kv_stored: bool = False) -> torch.Tensor:
        fb = self._fb
        assert fb is not None, "plan() must be called before run()"
        if not kv_stored:
            kv_pool.set_kv(layer_id, fb.out_cache_loc, k, v)
        k_buf, v_buf = kv_pool.get_kv(layer_id)
        T, H, D = q.shape
        n_rep = H // k_buf.shape[1]
        out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
        for g in self._groups:
            kg = self._gather(0, k_buf, g.kv_slots).to(q.dtype)  # [b, L, H_kv, D]
            vg = self._gather(1, v_buf, g.kv_slots).to(q.dtype)
            if g.decode:
                # CPU, more than a few requests: per-KV-head bmm on the gathered K/V as they lie (no
                # transposed copies); the GPU keeps the two batched matmuls
                qd = q[g.q_rows[:, 0]]
                if q.device.type == "cpu":
                    # bf16/fp16 on a CPU: scores and the weighted sum in float32 (as SDPA's CPU kernel does
                    # for the prefill), so a decode step rounds no more than the prefill of the same tokens
                    out[g.q_rows[:, 0]] = _decode_attention_grouped_sdpa(
                        qd.float(), kg.float(), vg.float(), g.mask, n_rep).to(q.dtype)
                else:
                    out[g.q_rows[:, 0]] = _decode_attention(qd, kg, vg, g.mask, n_rep)
                continue
            qg = q[g.q_rows].transpose(1, 2)  # [b, H, n, D]
            # GQA: query head h reads kv head h // n_rep (HF's repeat_kv), without materialising the repeat
            og = F.scaled_dot_product_attention(qg, kg.transpose(1, 2), vg.transpose(1, 2), attn_mask=g.mask,
                                                is_causal=g.is_causal, enable_gqa=n_rep > 1)
            out[g.q_rows] = og.transpose(1, 2)
        return out.reshape(T, H * D)


    def _gather(self, which: int, buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """_gather into this backend's buffer `which` (0: K, 1: V), valid until the next gather into it."""
        n = slots.numel()
        key = (which, buf.dtype, buf.device, tuple(buf.shape[1:]))
        out = self._gathered.get(key)
        if out is None or out.shape[0] < n:
            out = self._gathered[key] = buf.new_empty((max(n, 2 * (0 if out is None else out.shape[0])),
                                                       *buf.shape[1:]))
        return _gather(buf, slots, out[:n])


def _gather(buf: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """buf[slots] for a 2-D slot table (into `out`, [slots.numel(), ...], when given); index_select is
    ~2x faster than advanced indexing on CPU."""
    flat = slots.reshape(-1)
    got = buf.index_select(0, flat) if out is None else torch.index_select(buf, 0, flat, out=out)
    return got.view(*slots.shape, *buf.shape[1:])


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, n_rep: int) -> torch.Tensor:
    """One query per request: q [b, H, D], k/v [b, L, H_kv, D], mask [b, 1, 1, L] -> [b, H, D].

    The H query heads are viewed as [H_kv, n_rep] so each group multiplies its own kv head:
    two batched matmuls, no repeated K/V (SDPA's GQA path on CPU was several times slower).
    """
    b, H, D = q.shape
    hkv = k.shape[2]
    qg = q.view(b, hkv, n_rep, D)
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * (D ** -0.5)  # [b, H_kv, n_rep, L]
    scores = scores.masked_fill(~mask.view(b, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v.transpose(1, 2)).view(b, H, D)



def _decode_attention_grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                                   n_rep: int) -> torch.Tensor:
    """`_decode_attention` through SDPA's CPU kernel: the n_rep query heads of each KV head are its query rows
    (q [b, H, D] viewed [b, H_kv, n_rep, D]) against that head's K/V as they lie ([b, L, H_kv, D] viewed
    [b, H_kv, L, D]: no transposed or repeated copy), the key mask broadcast over the rows. The CPU decode
    path: SmolLM2's heads (9 / 3, D 64) at 192 cached tokens on one AVX2 core, 0.13 -> 0.09 ms per layer
    for one request, 1.05 -> 0.77 ms for 16 (against the better of the two variants here)."""
    b, H, D = q.shape
    hkv = k.shape[2]
    return F.scaled_dot_product_attention(q.view(b, hkv, n_rep, D), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).reshape(b, H, D)


def _decode_attention_per_kv_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                                  n_rep: int) -> torch.Tensor:
    """`_decode_attention`, one KV head at a time: k[:, :, h] is a strided [b, L, D] view that bmm reads in
    place, where the batched [b, H_kv, D, L] operand of `_decode_attention` costs a transposed copy of K
    (and one of V) per layer. On a CPU this is ~25% faster from 4 requests up (one query each), and
    slower for one or two (more small calls). Same math: scores scaled, masked, softmax in float32."""
    b, H, D = q.shape
    hkv = k.shape[2]
    qg = q.view(b, hkv, n_rep, D)
    out = torch.empty(b, hkv, n_rep, D, dtype=q.dtype, device=q.device)
    masked = ~mask.view(b, 1, -1)
    for h in range(hkv):
        scores = torch.bmm(qg[:, h], k[:, :, h].transpose(1, 2)) * (D ** -0.5)  # [b, n_rep, L]
        probs = torch.softmax(scores.masked_fill_(masked, float("-inf")).float(), dim=-1).to(q.dtype)
        out[:, h] = torch.bmm(probs, v[:, :, h])
    return out.view(b, H, D)
