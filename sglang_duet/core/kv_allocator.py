"""Token-slot allocator of the KV pool (page size 1). Pure Python.

Slot 0 is reserved as the padding slot (SGLang's convention: padded rows of a CUDA-graph
batch write their KV there), so a pool of `size` slots hands out 1..size-1.
"""
from __future__ import annotations


class TokenSlotAllocator:
    def __init__(self, size: int):
        if size < 2:
            raise ValueError(f"KV pool too small: {size} slots")
        self.size = size
        # Slots never handed out are the range [_fresh, size): an emulated GPU's pool can hold
        # hundreds of millions of slots, which a list of all of them would take gigabytes to hold.
        self._fresh = 1
        self._free: list[int] = []  # returned slots, reused first

    @property
    def capacity(self) -> int:
        return self.size - 1

    @property
    def available(self) -> int:
        return len(self._free) + self.size - self._fresh

    def alloc(self, n: int) -> list[int] | None:
        if n > self.available:
            return None
        if n == 0:
            return []
        take = min(n, len(self._free))
        out = self._free[len(self._free) - take:]
        del self._free[len(self._free) - take:]
        out.reverse()
        if take < n:
            start = self._fresh
            self._fresh += n - take
            out.extend(range(start, self._fresh))
        return out

    def free(self, slots: list[int]) -> None:
        if slots:
            self._free.extend(reversed(slots))
