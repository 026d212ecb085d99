"""Shared attention test cases: a KV pool with scattered slots and batches of given shapes.

Used by the Triton interpreter tests (CPU) and the GPU backend tests alike, so both check the
same situations against the torch reference backend."""
from __future__ import annotations

import torch

from sglang_duet.kernels.attention.base import ForwardBatch
from sglang_duet.memory.kv_pool import KVCachePool

# (prefix_len, new_tokens) per request
CASES = {
    "prefill": [(0, 7), (0, 19), (0, 1)],
    "extend": [(5, 6), (17, 3), (0, 9)],
    "decode": [(0, 1), (4, 1), (33, 1), (70, 1)],
    "mixed": [(12, 1), (0, 11), (30, 1), (8, 5)],
}


def make_case(shape: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype, device: str, seed: int = 0, layers: int = 2):
    """(pool, fb, [(q, k, v) per layer]) with the prefixes' k/v already in the pool.

    Slots are a random permutation (not contiguous) so kernels must really gather by index.
    """
    g = torch.Generator().manual_seed(seed)
    total = sum(p + n for p, n in shape)
    pool = KVCachePool(layers, total + 8, num_kv_heads, head_dim, dtype, device)
    perm = (torch.randperm(total + 7, generator=g) + 1).tolist()  # never slot 0 (padding)
    reqs, off = [], 0
    for p, n in shape:
        slots = perm[off:off + p + n]
        off += p + n
        reqs.append((list(torch.randint(0, 100, (n,), generator=g).tolist()), p, slots, True))
        for layer in range(layers):  # the cached prefix, as earlier steps would have written it
            kp = torch.randn(p, num_kv_heads, head_dim, generator=g)
            vp = torch.randn(p, num_kv_heads, head_dim, generator=g)
            pool.set_kv(layer, torch.tensor(slots[:p], dtype=torch.long, device=device),
                        kp.to(device, dtype), vp.to(device, dtype))
    fb = ForwardBatch.build(reqs, device)
    T = fb.num_tokens
    qkv = []
    for _ in range(layers):
        qkv.append(tuple(torch.randn(T, h, head_dim, generator=g).to(device, dtype)
                         for h in (num_heads, num_kv_heads, num_kv_heads)))
    return pool, fb, qkv


def run_backend(backend, pool, fb, qkv) -> list[torch.Tensor]:
    backend.plan(fb)
    return [backend.run(i, q, k, v, pool) for i, (q, k, v) in enumerate(qkv)]


def clone_pool(pool: KVCachePool) -> KVCachePool:
    new = KVCachePool(pool.num_layers, pool.num_slots, pool.num_kv_heads, pool.head_dim, pool.dtype, pool.device)
    new.buffer.copy_(pool.buffer)
    return new


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
