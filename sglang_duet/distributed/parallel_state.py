"""The tensor-parallel group: this process's rank, the group size, and the two collectives the
model needs (all-reduce of row-parallel outputs, all-gather of vocab-parallel logits).

Backend: NCCL when the ranks run on CUDA devices, gloo on CPUs, chosen from the device. Step
plans always travel over a gloo group (`control`), as SGLang's `broadcast_pyobj` does on its CPU
group, so a pickled plan never has to be staged on a GPU.

Lanes. In split mode the prefill lane and the decode lane run their forwards at the same time, on
two threads of every rank. Collectives of one process group must be issued in the same order on
every rank, and two threads issuing on one group would interleave differently on each rank (a
deadlock, or a prefill's all-reduce summed with a decode's). So each lane has its own pair of
groups (`LaneGroups`: the model's collectives and the step broadcasts), and a thread says once
which lane it runs (`bind_lane`); the model's collectives then go to that lane's groups.
"""
from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
RENDEZVOUS_TIMEOUT_S = 600.0  # joining: the other ranks may still be importing torch on a busy machine


@dataclass(frozen=True)
class LaneGroups:
    """One lane's process groups: its forwards' collectives and the broadcasts of its steps."""

    model: object  # nccl | gloo
    control: object  # gloo: pickled step inputs


@dataclass
class TPGroup:
    """rank/size of this process in the tensor-parallel group; size 1 means no collectives at all."""

    rank: int = 0
    size: int = 1
    backend: str = "none"
    timeout_s: float = DEFAULT_TIMEOUT_S
    lanes: tuple = field(default=(), repr=False)  # LaneGroups per lane: lane 0, then the prefill lane
    startup: object = field(default=None, repr=False)  # gloo group with the rendezvous timeout: loading
    _thread: threading.local = field(default_factory=threading.local, repr=False, compare=False)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def num_lanes(self) -> int:
        return len(self.lanes)

    def bind_lane(self, lane: int) -> None:
        """The calling thread runs `lane`'s forwards from now on (threads that never bind run lane 0)."""
        if self.size > 1 and not 0 <= lane < len(self.lanes):
            raise ValueError(f"lane {lane}: this tensor-parallel group has {len(self.lanes)} lane(s)")
        self._thread.lane = lane

    @property
    def lane(self) -> int:
        return getattr(self._thread, "lane", 0)

    def groups(self, lane: int | None = None) -> LaneGroups:
        return self.lanes[self.lane if lane is None else lane]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.groups().model)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[.., n] on every rank -> [.., size * n] in rank order, on every rank."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.groups().model)
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj=None, startup: bool = False, lane: int | None = None):
        """Rank 0's `obj` on every rank (pickled, over a lane's gloo control group: the calling
        thread's unless `lane` is given). startup=True: over the group with the rendezvous timeout,
        for the exchange that waits on every rank's load."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.startup if startup else self.groups(lane).control)
        return box[0]


SINGLE = TPGroup()


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _rendezvous(init_method: str, rank: int, size: int, timeout_s: float, peers_alive) -> dist.TCPStore:
    """The TCP store the ranks meet at. Every rank checks in; rank 0 waits for all of them while
    `peers_alive()` (which raises when a local follower died, e.g. before it could import) holds,
    so a follower lost at startup fails the start at once instead of after the timeout."""
    host, _, port = init_method.removeprefix("tcp://").rpartition(":")
    store = dist.TCPStore(host, int(port), size, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    store.set(f"sglang_duet/joined/{rank}", "1")
    if rank == 0:
        keys = [f"sglang_duet/joined/{r}" for r in range(1, size)]
        deadline = time.monotonic() + timeout_s
        while not store.check(keys):
            if peers_alive is not None:
                peers_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensor-parallel ranks did not join {init_method} within {timeout_s:g} s")
            time.sleep(0.05)
    return store


def init_tp_group(rank: int, size: int, init_method: str, device: torch.device | str,
                  timeout_s: float | None = None, peers_alive=None, lanes: int = 1) -> TPGroup:
    """Join the default process group (blocks until all `size` ranks have joined).

    init_method: 'tcp://host:port' (rank 0 listens there). timeout_s bounds every collective of
    the lanes' groups made here (the default group, with a longer timeout, only serves the
    rendezvous): a rank that stops answering raises in the others instead of hanging them; a rank
    that dies closes its sockets, which its peers see at once. lanes: how many lanes run forwards
    concurrently (2 in split mode); every rank must pass the same number.
    """
    if size == 1:
        return SINGLE
    backend = backend_for(device)
    timeout_s = timeout_s or DEFAULT_TIMEOUT_S
    timeout = datetime.timedelta(seconds=timeout_s)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    rendezvous_s = max(timeout_s, RENDEZVOUS_TIMEOUT_S)
    store = _rendezvous(init_method, rank, size, rendezvous_s, peers_alive)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=rendezvous_s))
    # new_group is itself collective: every rank creates the same groups in the same order
    groups = tuple(LaneGroups(model=dist.new_group(backend=backend, timeout=timeout),
                              control=dist.new_group(backend="gloo", timeout=timeout)) for _ in range(lanes))
    startup = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=rendezvous_s))
    return TPGroup(rank=rank, size=size, backend=backend, timeout_s=timeout_s, lanes=groups, startup=startup)


def destroy_tp_group(group: TPGroup) -> None:
    if group.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
