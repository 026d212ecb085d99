"""The transport `auto` picks when the Mooncake engine is installed: a same-host fast path (shm for
a CPU pool, CUDA IPC for a GPU pool) when the peer runs on this machine, Mooncake otherwise.

The prefill side exports through both (neither copies anything at export time: both hand out the
pool in place) and tags the descriptor with its machine's id; the decode side compares that with
its own and reads through the fast path on the same machine, through Mooncake from another.
"""
from __future__ import annotations

import socket

import msgspec

from sglang_duet.disagg.kv_transport import KVTransport
from sglang_duet.disagg.messages import KVDescriptor


def machine_id() -> str:
    """Same value in every process of this machine (and boot), different on another one."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class HostAwareTransport(KVTransport):
    def __init__(self, local: KVTransport, remote: KVTransport, host_id: str | None = None):
        super().__init__(local.pool, local.layout, local.instance_id)
        self.local, self.remote = local, remote
        self.name = f"{local.name}+{remote.name}"
        self.host_id = host_id or machine_id()

    def _export(self, transfer_id, slots):
        lh, lslots = self.local._export(transfer_id, slots)
        rh, rslots = self.remote._export(transfer_id, slots)
        if lslots != rslots:  # a staging fast path (shm of a GPU pool) does not combine
            raise RuntimeError(f"{self.local.name} staged the KV; it cannot share a descriptor with {self.remote.name}")
        return {"host": self.host_id, self.local.name: lh, self.remote.name: rh}, lslots

    def release(self, transfer_id):
        self.local.release(transfer_id)
        self.remote.release(transfer_id)

    def path_for(self, desc: KVDescriptor) -> KVTransport:
        same_host = desc.handle.get("host") == self.host_id and self.local.name in desc.handle
        return self.local if same_host else self.remote

    def _import(self, desc, dst_slots):
        t = self.path_for(desc)
        if t.name not in desc.handle:
            raise ValueError(f"the descriptor offers no {t.name!r} handle")
        t._import(msgspec.structs.replace(desc, backend=t.name, handle=desc.handle[t.name]), dst_slots)
        return t.name

    def close(self):
        try:
            self.local.close()
        finally:
            self.remote.close()
