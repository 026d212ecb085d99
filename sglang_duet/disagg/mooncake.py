"""KV between hosts through the Mooncake transfer engine (SGLang's default PD transport).

Each instance runs one Mooncake `TransferEngine` (`P2PHANDSHAKE`: peers find each other by
"host:rpc_port", no metadata server) and registers its whole KV pool with it once. The prefill
side's export is the pool's address and shape; the decode side reads the slots it needs straight
from the prefill's pool into its own (`batch_transfer_sync_read`, one entry per contiguous run of
slots per K/V layer plane), so there is no staging on either side: the same pull model as the
shared-memory transport, over the network.

Protocol `tcp` works anywhere (the non-CUDA wheel `mooncake-transfer-engine-non-cuda`, which needs
Debian's `libibverbs1` to load); `rdma` with the CUDA wheel reads GPU memory directly (GPUDirect)
and is what SGLang uses in production. Only host memory has been exercised here.
"""
from __future__ import annotations

import logging
import socket

from sglang_duet.disagg.kv_transport import KVTransport, slot_runs
from sglang_duet.disagg.messages import KVDescriptor, KVLayout

logger = logging.getLogger("sglang_duet.disagg.transfer")

INSTALL_HINT = ("install it with `apt-get install -y libibverbs1 && pip install "
                "mooncake-transfer-engine-non-cuda==0.3.13.post1` (the CUDA build: mooncake-transfer-engine)")


def mooncake_error() -> str | None:
    """Why the Mooncake engine cannot be used here, or None if it can."""
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError as e:  # the wheel is missing, or libibverbs.so.1 is
        return f"the Mooncake transfer engine is not usable ({e}); {INSTALL_HINT}"
    return None


def advertised_host(bind_host: str) -> str:
    """The address peers on other hosts reach this one at: the bind address unless it is a
    wildcard, else the address of the interface that routes outward (no packet is sent)."""
    if bind_host not in ("", "0.0.0.0", "::"):
        return bind_host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def plan_reads(src_shape: list[int], src_slots: list[int], dst_shape: list[int], dst_slots: list[int],
               elem_bytes: int) -> list[tuple[int, int, int]]:
    """(src offset, dst offset, length) in bytes of each read that moves `src_slots` -> `dst_slots`.

    Pools are contiguous [2, layers, slots, heads, head_dim]: within one K or V plane of a layer,
    consecutive slots are adjacent, so each contiguous run of slots is one read per plane."""
    planes = src_shape[0] * src_shape[1]
    row = elem_bytes
    for d in src_shape[3:]:
        row *= d  # bytes of one token in one plane
    src_plane, dst_plane = src_shape[2] * row, dst_shape[2] * row
    runs = slot_runs(src_slots, dst_slots)
    return [(p * src_plane + s0 * row, p * dst_plane + d0 * row, n * row)
            for p in range(planes) for s0, d0, n in runs]


class MooncakeTransport(KVTransport):
    name = "mooncake"

    def __init__(self, pool, layout: KVLayout, instance_id: str, host: str, protocol: str = "tcp",
                 device: str = ""):
        super().__init__(pool, layout, instance_id)
        if pool is None:
            raise ValueError("--disaggregation-transfer-backend mooncake: the emulated executor has no KV tensors")
        why = mooncake_error()
        if why:
            raise RuntimeError(f"--disaggregation-transfer-backend mooncake: {why}")
        from mooncake.engine import TransferEngine

        buf = pool.buffer
        if not buf.is_contiguous():
            raise ValueError("the Mooncake transport needs a contiguous KV pool")
        self.engine = TransferEngine()
        if self.engine.initialize(host, "P2PHANDSHAKE", protocol, device) != 0:
            raise RuntimeError(f"the Mooncake transfer engine did not start on {host} ({protocol})")
        self.session = f"{host}:{self.engine.get_rpc_port()}"
        self.base = buf.data_ptr()
        self.nbytes = buf.numel() * buf.element_size()
        if self.engine.register_memory(self.base, self.nbytes) != 0:
            raise RuntimeError(f"Mooncake could not register the KV pool ({self.nbytes / 1e6:.0f} MB)")
        self.elem_bytes = buf.element_size()
        logger.info("Mooncake transfer engine at %s (%s): KV pool registered, %.1f MB", self.session, protocol,
                    self.nbytes / 1e6)

    def _export(self, transfer_id, slots):
        return {"session": self.session, "base": self.base, "shape": list(self.pool.buffer.shape)}, list(slots)

    def _import(self, desc: KVDescriptor, dst_slots):
        h = desc.handle
        if self.pool.buffer.data_ptr() != self.base:
            raise RuntimeError("the KV pool moved after it was registered with Mooncake")
        reads = plan_reads(h["shape"], desc.slots, list(self.pool.buffer.shape), dst_slots, self.elem_bytes)
        src = [h["base"] + s for s, _, _ in reads]
        dst = [self.base + d for _, d, _ in reads]
        ret = self.engine.batch_transfer_sync_read(h["session"], dst, src, [n for _, _, n in reads])
        if ret < 0:
            raise RuntimeError(f"Mooncake read from {h['session']} failed ({ret})")
        return None

    def close(self):
        engine = getattr(self, "engine", None)
        if engine is not None and getattr(self, "base", None):
            try:
                engine.unregister_memory(self.base)
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
        self.engine = None
