"""Token-slot KV cache pool (page size 1), SGLang's MHATokenToKVPool in miniature.

One contiguous allocation [2, layers, slots, H_kv, D] so that sizing from a byte budget
is exact and the per-layer k/v buffers are views. Slot 0 is reserved as the padding slot:
padded entries of index tensors (CUDA-graph decode, batched gathers) point at it, so it
must never hold a live token. Usable slots are 1..num_slots-1; which slot belongs to
which request is the allocator's business (SchedulerCore), not this class's.
"""
from __future__ import annotations

import math
import mmap

import torch

PADDING_SLOT = 0
LAZY_ZEROS_MIN_BYTES = 64 << 20  # CPU pools at least this large come from the kernel's zero pages


def cpu_zeros_lazy(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, mmap.mmap]:
    """A zero tensor on anonymous mapped memory: the kernel hands out zero-filled pages when they are
    first written, so a 1 GiB pool costs nothing until tokens use it (torch.zeros writes every page:
    0.6-1.6 s of a CPU server's start-up). Returns the tensor and the mapping, which must outlive it."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    mapping = mmap.mmap(-1, nbytes)
    return torch.frombuffer(mapping, dtype=dtype).view(shape), mapping


class KVCachePool:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if num_slots < 2:
            raise ValueError(f"KV pool needs at least 2 slots (slot 0 is padding), got {num_slots}")
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # zeros, not empty: the padding slot is read by masked-out lanes; garbage there
        # could be NaN/Inf, and 0 * NaN in a matmul is still NaN.
        shape = (2, num_layers, num_slots, num_kv_heads, head_dim)
        self._mapping = None
        if self.device.type == "cpu" and self.bytes_per_slot(num_layers, num_kv_heads, head_dim,
                                                             dtype) * num_slots >= LAZY_ZEROS_MIN_BYTES:
            self.buffer, self._mapping = cpu_zeros_lazy(shape, dtype)
        else:
            self.buffer = torch.zeros(shape, dtype=dtype, device=self.device)
        self.k_buffers = [self.buffer[0, i] for i in range(num_layers)]
        self.v_buffers = [self.buffer[1, i] for i in range(num_layers)]

    @property
    def usable_slots(self) -> int:
        return self.num_slots - 1

    def set_kv(self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v ([T, H_kv, D]) of new tokens at slots `loc` ([T] long)."""
        # index_copy_ is a plain scatter; `buf[loc] = x` goes through index_put's generic path,
        # ~70x slower on CPU for the few rows of a decode step.
        self.k_buffers[layer].index_copy_(0, loc, k.to(self.dtype))
        self.v_buffers[layer].index_copy_(0, loc, v.to(self.dtype))

    def get_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffers[layer], self.v_buffers[layer]

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of one token over all layers."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_kv_heads * head_dim * elem

    @classmethod
    def from_budget(cls, model_config, byte_budget: int, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> "KVCachePool":
        """As many slots as fit in `byte_budget` bytes (slot 0 included in the count)."""
        per = cls.bytes_per_slot(model_config.num_hidden_layers, model_config.num_key_value_heads,
                                 model_config.head_dim, dtype)
        num_slots = int(byte_budget) // per
        if num_slots < 2:
            raise ValueError(f"KV budget of {byte_budget} bytes holds {num_slots} slots of {per} bytes; need >= 2")
        return cls(model_config.num_hidden_layers, num_slots, model_config.num_key_value_heads,
                   model_config.head_dim, dtype, device)
