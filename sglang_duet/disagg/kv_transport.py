"""The KV transport interface every backend implements, and the slot copy they share.

`KVTransport` (both sides of a transfer): `export(transfer_id, slots) -> KVDescriptor` and
`release(transfer_id)` on the prefill side, `import_kv(descriptor, dst_slots) -> TransferStats`
on the decode side, `describe()` for the router's compatibility check. Pool layout
`[2, layers, slots, kv_heads, head_dim]`.

Backends live in modules of their own and import only this one (transfer.py: shared memory and
the factory; cuda_ipc.py: CUDA IPC; mooncake.py: the Mooncake transfer engine between hosts), so
no backend imports another.
"""
from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass

import torch

from sglang_duet.disagg.messages import KVDescriptor, KVLayout

logger = logging.getLogger("sglang_duet.disagg.transfer")

@dataclass
class TransferStats:
    transfer_id: str
    backend: str
    num_tokens: int
    nbytes: int
    seconds: float

    @property
    def ms(self) -> float:
        return self.seconds * 1e3

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def describe(self) -> str:
        rate = f"{self.gbps:.2f} GB/s" if self.seconds > 0 and self.backend != "none" else "no data moved"
        return (f"KV transfer {self.transfer_id} via {self.backend}: {self.num_tokens} tokens, "
                f"{self.nbytes / 1e6:.2f} MB in {self.ms:.2f} ms ({rate})")


def pool_layout(pool) -> KVLayout:
    return KVLayout(pool.num_layers, pool.num_kv_heads, pool.head_dim, str(pool.dtype).removeprefix("torch."))


def torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown KV dtype {name!r}")
    return dt


class KVTransport(abc.ABC):
    """Moves prompt KV from a prefill pool to a decode pool. See the module docstring."""

    name = "base"

    def __init__(self, pool, layout: KVLayout, instance_id: str):
        self.pool = pool  # KVCachePool, or None (emulated executor)
        self.layout = layout
        self.instance_id = instance_id
        self.control = ""  # set by the prefill scheduler: where KVRelease goes
        # running totals, for logs and /disagg/info
        self.transfers = 0
        self.bytes = 0
        self.seconds = 0.0

    def describe(self) -> dict:
        return {"backend": self.name, "instance_id": self.instance_id, "layout": {
            "num_layers": self.layout.num_layers, "num_kv_heads": self.layout.num_kv_heads,
            "head_dim": self.layout.head_dim, "dtype": self.layout.dtype}}

    # ---- prefill side ----
    def export(self, transfer_id: str, slots: list[int]) -> KVDescriptor:
        handle, src_slots = self._export(transfer_id, slots)
        return KVDescriptor(transfer_id=transfer_id, backend=self.name, instance_id=self.instance_id,
                            control=self.control, layout=self.layout, slots=src_slots,
                            nbytes=len(slots) * self.layout.bytes_per_token, handle=handle)

    @abc.abstractmethod
    def _export(self, transfer_id: str, slots: list[int]) -> tuple[dict, list[int]]:
        """(handle, slots in the exported buffer) for the KV of pool `slots`."""

    def release(self, transfer_id: str) -> None:
        """The decode side is done with this transfer (or it expired): drop its staging, if any."""

    # ---- decode side ----
    def import_kv(self, desc: KVDescriptor, dst_slots: list[int]) -> TransferStats:
        """Copy the KV that `desc` describes into this pool's `dst_slots`; synchronous."""
        if desc.backend != self.name:
            raise ValueError(f"KV exported with {desc.backend!r} cannot be imported with {self.name!r}")
        if not desc.layout.same_shape(self.layout):
            raise ValueError(f"KV layout mismatch: prefill {desc.layout}, decode {self.layout}")
        if len(dst_slots) != len(desc.slots):
            raise ValueError(f"{len(dst_slots)} destination slots for {len(desc.slots)} tokens")
        t0 = time.perf_counter()
        used = self._import(desc, dst_slots) or self.name  # a composite transport names the path it took
        dt = time.perf_counter() - t0
        stats = TransferStats(desc.transfer_id, used, len(dst_slots), desc.nbytes, dt)
        self.transfers += 1
        self.bytes += desc.nbytes
        self.seconds += dt
        logger.info("%s", stats.describe())
        return stats

    @abc.abstractmethod
    def _import(self, desc: KVDescriptor, dst_slots: list[int]) -> str | None:
        """Copy the KV in; may return the name of the backend that moved it (None: this one)."""

    def totals(self) -> dict:
        return {"transfers": self.transfers, "bytes": self.bytes, "seconds": round(self.seconds, 6),
                "gbps": round(self.bytes / self.seconds / 1e9, 3) if self.seconds > 0 else None}

    def close(self) -> None:
        pass


class NullTransport(KVTransport):
    """No tensors (emulated executor): the protocol runs, nothing is copied."""

    name = "none"

    def _export(self, transfer_id, slots):
        return {}, list(slots)

    def _import(self, desc, dst_slots):
        pass


MAX_RUNS = 32  # up to this many contiguous runs: slice copies; beyond: an indexed gather


def slot_runs(src_slots: list[int], dst_slots: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the stretches where both slot lists count up by one.

    The allocator hands out low slots first, so a prompt's slots are mostly one or a few runs."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_slots, dst_slots):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def gather_slots(src: torch.Tensor, src_slots: list[int], pool, dst_slots: list[int]) -> None:
    """pool.buffer[:, :, dst_slots] = src[:, :, src_slots] (dim 2 is the slot dimension).

    Contiguous runs copy as slices (memcpy speed: ~4 GB/s on this project's 2-core CPU against
    ~0.6 for an index_select/index_copy_ over dim 2); a fragmented list gathers plane by plane."""
    dst = pool.buffer
    runs = slot_runs(src_slots, dst_slots)
    if len(runs) <= MAX_RUNS:
        for s0, d0, n in runs:
            dst[:, :, d0:d0 + n].copy_(src[:, :, s0:s0 + n])
    else:
        idx = torch.tensor(src_slots, dtype=torch.long, device=src.device)
        dst_idx = torch.tensor(dst_slots, dtype=torch.long, device=dst.device)
        planes = dst.shape[0] * dst.shape[1]
        sv = src.reshape(planes, src.shape[2], -1)  # [2*L, slots, H*D]: rows are whole tokens
        dv = dst.view(planes, dst.shape[2], -1)
        for p in range(planes):
            dv[p].index_copy_(0, dst_idx, sv[p].index_select(0, idx).to(device=dst.device, dtype=dst.dtype))
    if dst.is_cuda:
        torch.cuda.synchronize(dst.device)  # the release that follows frees the source

