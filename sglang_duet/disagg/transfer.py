"""KV transfer between a prefill instance and a decode instance: the shared-memory backend and
`make_transport`, which picks a backend. The interface (kv_transport.py), `KVTransport`, used by both sides:

- prefill side: `export(transfer_id, slots)` makes the KV of those pool slots readable by a peer and
  returns a `KVDescriptor`; `release(transfer_id)` drops whatever the export allocated. The pool
  slots themselves stay held by the prefill scheduler until the decode side releases them
  (DistServe's pull model: the prefill instance's memory is the buffer).
- decode side: `import_kv(descriptor, dst_slots)` copies the KV into its own pool's slots and
  returns `TransferStats` (bytes, ms, GB/s), which are logged.
- `describe()`: backend and layout, for the router's compatibility check.

Backends:
- `ShmTransport` ("shm", processes of one machine). A CPU pool is moved into a file in /dev/shm
  at startup, so a decode process maps the prefill's pool itself and gathers the slots: one copy,
  no staging. A GPU pool is staged per transfer: the slots are gathered into a file of their own.
- `CudaIpcTransport` ("cuda-ipc", GPUs of one machine, in cuda_ipc.py): the decode process maps
  the prefill's GPU pool through a CUDA IPC handle and copies over NVLink/PCIe.
- `NullTransport` ("none"): the emulated executor has no tensors; the protocol (hold, pull,
  release) still runs, and the bytes a real transfer would move are reported.
"""
from __future__ import annotations

import glob
import logging
import mmap
import os
import uuid
import warnings

import torch

from sglang_duet.disagg.kv_transport import (  # noqa: F401 - the interface, re-exported for callers
    MAX_RUNS, KVTransport, NullTransport, TransferStats, gather_slots, pool_layout, slot_runs, torch_dtype,
)
from sglang_duet.disagg.messages import KVLayout

logger = logging.getLogger("sglang_duet.disagg.transfer")

SHM_DIR_DEFAULT = "/dev/shm"
_FILE_PREFIX = "sglang-duet-kv-"


class _MappedFile:
    """A file in shared memory mapped into this process as a tensor."""

    def __init__(self, path: str, shape: list[int], dtype: torch.dtype, create: bool = False):
        self.path = path
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if create:
            # O_EXCL + 0600: our own fresh file, readable only by this user
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, nbytes)  # tmpfs pages appear zero-filled on first touch
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            self.mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)  # the mapping keeps the memory; the descriptor is not needed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.tensor = torch.frombuffer(self.mm, dtype=dtype).view(shape)

    def close(self) -> None:
        self.tensor = None
        try:
            self.mm.close()
        except BufferError:  # a tensor view is still alive somewhere; the GC will unmap it
            pass


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class ShmTransport(KVTransport):
    """Shared memory between processes of one machine (see the module docstring)."""

    name = "shm"

    def __init__(self, pool, layout: KVLayout, instance_id: str, role: str, shm_dir: str = SHM_DIR_DEFAULT,
                 share_pool: bool | None = None):
        super().__init__(pool, layout, instance_id)
        self.shm_dir = shm_dir
        self.role = role
        self._pool_file: _MappedFile | None = None
        self._staged: dict[str, str] = {}  # transfer id -> file (GPU pools)
        self._maps: dict[str, _MappedFile] = {}  # decode side: mapped pool files of prefill instances
        if share_pool is None:  # default: share a CPU pool in place, stage a GPU pool per transfer
            share_pool = pool is not None and not pool.buffer.is_cuda
        if role == "prefill" and pool is not None and share_pool:
            _remove_stale_files(shm_dir)
            self._share_cpu_pool()

    def _share_cpu_pool(self) -> None:
        """Move the pool into a shared-memory file; the model writes there from now on.

        Must run before the first forward pass: the attention backends read the pool's buffers
        at every call, so rebinding them here is all it takes."""
        pool = self.pool
        path = os.path.join(self.shm_dir, f"{_FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.pool")
        f = _MappedFile(path, list(pool.buffer.shape), pool.buffer.dtype, create=True)
        f.tensor.copy_(pool.buffer)
        pool.buffer = f.tensor
        pool.k_buffers = [f.tensor[0, i] for i in range(pool.num_layers)]
        pool.v_buffers = [f.tensor[1, i] for i in range(pool.num_layers)]
        self._pool_file = f
        logger.info("KV pool shared for disaggregation: %s (%.1f MB)", path, f.mm.size() / 1e6)

    # ---- prefill side ----
    def _export(self, transfer_id, slots):
        if self._pool_file is not None:  # the pool itself is shared: hand out its slots
            return {"path": self._pool_file.path, "shape": list(self.pool.buffer.shape), "staged": False}, list(slots)
        # GPU pool: stage the slots into a file of their own, [2, L, n, H, D]
        block = self.pool.buffer[:, :, torch.tensor(slots, device=self.pool.buffer.device)].cpu()
        path = os.path.join(self.shm_dir, f"{_FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.xfer")
        f = _MappedFile(path, list(block.shape), block.dtype, create=True)
        f.tensor.copy_(block)
        f.close()
        self._staged[transfer_id] = path
        return {"path": path, "shape": list(block.shape), "staged": True}, list(range(len(slots)))

    def release(self, transfer_id):
        path = self._staged.pop(transfer_id, None)
        if path is not None:
            _unlink(path)

    # ---- decode side ----
    def _import(self, desc, dst_slots):
        h = desc.handle
        dtype = torch_dtype(desc.layout.dtype)
        if h.get("staged"):
            f = _MappedFile(h["path"], h["shape"], dtype)
            try:
                gather_slots(f.tensor, desc.slots, self.pool, dst_slots)
            finally:
                f.close()
            return
        f = self._maps.get(h["path"])
        if f is None:  # first transfer from this prefill instance: map its pool once
            f = self._maps[h["path"]] = _MappedFile(h["path"], h["shape"], dtype)
        gather_slots(f.tensor, desc.slots, self.pool, dst_slots)

    def close(self):
        for f in self._maps.values():
            f.close()
        self._maps.clear()
        for tid in list(self._staged):
            self.release(tid)
        if self._pool_file is not None:
            _unlink(self._pool_file.path)  # the mapping stays valid until the process ends
            self._pool_file = None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_stale_files(shm_dir: str) -> None:
    """Files of prefill processes that died without cleaning up (SIGKILL): their pid is gone."""
    for path in glob.glob(os.path.join(shm_dir, _FILE_PREFIX + "*")):
        try:
            pid = int(os.path.basename(path)[len(_FILE_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            _unlink(path)
            logger.info("removed stale KV file %s", path)
        except (ValueError, PermissionError):
            pass


BACKENDS = ("auto", "shm", "cuda-ipc", "mooncake", "none")


def make_transport(backend: str, pool, layout: KVLayout, instance_id: str, role: str,
                   shm_dir: str = SHM_DIR_DEFAULT, host: str = "127.0.0.1") -> KVTransport:
    """backend 'auto': none without tensors (emulated); else the same-host fast path (cuda-ipc for a
    GPU pool, shm for a CPU pool), combined with Mooncake for peers on other hosts when the Mooncake
    engine is installed. `host`: the address peers on other hosts reach this instance at."""
    if backend not in BACKENDS:
        raise ValueError(f"--disaggregation-transfer-backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend != "none" and backend != "auto" and pool is None:
        raise ValueError(f"--disaggregation-transfer-backend {backend}: the emulated executor has no KV tensors; "
                         "use 'none' (or 'auto')")
    if backend == "none" or pool is None:
        return NullTransport(pool, layout, instance_id)
    from sglang_duet.disagg.mooncake import MooncakeTransport, mooncake_error

    if backend == "mooncake":
        return MooncakeTransport(pool, layout, instance_id, host)
    if backend == "auto":
        local = _same_host_transport("cuda-ipc" if pool.buffer.is_cuda else "shm", pool, layout, instance_id, role,
                                     shm_dir)
        why = mooncake_error()
        if why:
            logger.info("KV transfer: %s only (peers on other hosts need Mooncake: %s)", local.name, why)
            return local
        try:  # after the local one: shm may have moved the pool into shared memory, Mooncake registers it there
            remote = MooncakeTransport(pool, layout, instance_id, host)
        except Exception as e:  # noqa: BLE001 - e.g. a GPU pool with the non-CUDA wheel: stay on this host
            logger.warning("KV transfer: %s only; Mooncake is unavailable: %s", local.name, e)
            return local
        from sglang_duet.disagg.host_aware import HostAwareTransport

        return HostAwareTransport(local, remote)
    return _same_host_transport(backend, pool, layout, instance_id, role, shm_dir)


def _same_host_transport(backend: str, pool, layout: KVLayout, instance_id: str, role: str, shm_dir: str):
    if backend == "shm":
        return ShmTransport(pool, layout, instance_id, role, shm_dir)
    from sglang_duet.disagg.cuda_ipc import CudaIpcTransport

    return CudaIpcTransport(pool, layout, instance_id, role)
