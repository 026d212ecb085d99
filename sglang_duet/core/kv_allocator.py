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
        self._free: list[int] = list(range(size - 1, 0, -1))  # pop() hands out low slots first

    @property
    def capacity(self) -> int:
        return self.size - 1

    @property
    def available(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        if n == 0:
            return []
        out = self._free[-n:]
        del self._free[-n:]
        out.reverse()
        return out

    def free(self, slots: list[int]) -> None:
        if slots:
            self._free.extend(reversed(slots))
