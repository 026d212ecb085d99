"""CUDA IPC transport: a decode process reads the prefill process's GPU KV pool directly.

The prefill side shares its pool's CUDA allocation once (`_share_cuda_`, the handle torch's own
multiprocessing uses) and hands it out in every descriptor. The decode side opens the handle
once per prefill instance (cached) and, per transfer, gathers the slots on the pool's GPU and
copies them into its own pool: over NVLink when the GPUs are peers, within one GPU when both
instances share it. The handle is plain bytes (base64 in JSON), never pickle.

Costs and limits: opening the handle makes a CUDA context on the prefill's GPU inside the decode
process (a few hundred MB, once); the gather kernel runs on the prefill's GPU. Works between
processes of one machine only (CUDA IPC); across machines a transport over NCCL or RDMA would
implement the same KVTransport interface. The device is found by UUID, so the two processes may
see the GPUs under different CUDA_VISIBLE_DEVICES orderings.
"""
from __future__ import annotations

import base64
import logging

import torch

from sglang_duet.disagg.messages import KVDescriptor, KVLayout
from sglang_duet.disagg.kv_transport import KVTransport, gather_slots, torch_dtype

logger = logging.getLogger("sglang_duet.disagg.transfer")


def _b64(b: bytes) -> str:
    return base64.b64encode(bytes(b)).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def device_by_uuid(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    raise RuntimeError(f"the prefill instance's GPU {uuid} is not visible to this process "
                       "(CUDA IPC needs both instances on one machine)")


def share_tensor(t: torch.Tensor) -> dict:
    """A JSON-able handle that lets another process on this machine map `t`."""
    storage = t.untyped_storage()
    (dev, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync) = storage._share_cuda_()
    return {
        "device_uuid": device_uuid(t.device.index if t.device.index is not None else torch.cuda.current_device()),
        "handle": _b64(handle), "storage_size": int(size), "storage_offset_bytes": int(offset),
        "ref_handle": _b64(ref_handle), "ref_offset": int(ref_offset),
        "event_handle": _b64(event_handle) if event_handle else "", "event_sync": bool(event_sync),
        "shape": list(t.shape), "stride": list(t.stride()), "offset": int(t.storage_offset()),
        "dtype": str(t.dtype).removeprefix("torch."),
    }


def open_shared(h: dict) -> torch.Tensor:
    """The tensor another process shared with `share_tensor`, mapped into this process."""
    dev = device_by_uuid(h["device_uuid"])
    with torch.cuda.device(dev):
        storage = torch.UntypedStorage._new_shared_cuda(
            dev, _unb64(h["handle"]), h["storage_size"], h["storage_offset_bytes"], _unb64(h["ref_handle"]),
            h["ref_offset"], _unb64(h["event_handle"]) if h["event_handle"] else b"", h["event_sync"])
        t = torch.empty((0,), dtype=torch_dtype(h["dtype"]), device=f"cuda:{dev}")
        t.set_(storage, h["offset"], h["shape"], h["stride"])
    return t


class CudaIpcTransport(KVTransport):
    name = "cuda-ipc"

    def __init__(self, pool, layout: KVLayout, instance_id: str, role: str):
        super().__init__(pool, layout, instance_id)
        if pool is None or not pool.buffer.is_cuda:
            raise ValueError("--disaggregation-transfer-backend cuda-ipc needs the KV pool on a GPU")
        self.role = role
        self._handle: dict | None = None
        self._peers: dict[str, torch.Tensor] = {}  # decode side: mapped pools, by the sharing handle

    def _export(self, transfer_id, slots):
        if self._handle is None:
            self._handle = share_tensor(self.pool.buffer)
        return self._handle, list(slots)

    def _import(self, desc: KVDescriptor, dst_slots):
        key = desc.handle["handle"]
        src = self._peers.get(key)
        if src is None:
            src = self._peers[key] = open_shared(desc.handle)
            logger.info("mapped the KV pool of prefill instance %s (%s)", desc.instance_id, list(src.shape))
        gather_slots(src, desc.slots, self.pool, dst_slots)

    def close(self):
        self._peers.clear()
