"""Tensor-parallel ranks: rank 0 (the driver) runs the scheduler, the executor and the sampler;
ranks 1..N-1 (followers, one process each) only run the model forward on their shard.

Why this split: the driver broadcasts each forward's complete inputs (the ForwardBatch: token ids,
positions, KV slots), so a follower needs no scheduler, no request state and no sampler, and no
scheduling decision can ever differ between ranks. The LM head's logits are all-gathered on every
rank (the vocab-parallel layer's collective); only the driver samples from them, and the sampled
tokens reach the followers as the next batch's input ids. This is vLLM's driver-worker layout at
the granularity of one forward; SGLang instead broadcasts the received requests and runs a
scheduler on every rank, which needs every rank's scheduling to be deterministic.

Every message goes over a lane's gloo control group, under that lane's lock on the driver that
also covers the forward's collectives, so the ranks issue each lane's collectives in the same
order. Split mode (`--lanes 2`) runs two lanes: the driver's two executor threads each bind a
lane (parallel_state.TPGroup.bind_lane) and every follower runs one thread per lane, so a prefill
and a decode forward run at the same time on every rank, each on its own groups. While idle the
driver sends a keepalive on each lane every few seconds, so an idle follower's wait never reaches
the group's timeout; a rank that dies closes its sockets and its peers' collectives raise at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import wait as mp_wait

import torch

from sglang_duet.distributed.parallel_state import TPGroup, destroy_tp_group, init_tp_group

logger = logging.getLogger(__name__)

KEEPALIVE_S = 5.0  # at most; never more than a third of the group's timeout
_FORWARD, _SETUP, _KEEPALIVE, _STOP = "forward", "setup", "keepalive", "stop"


def tp_lanes(args) -> int:
    """Lanes under tensor parallelism: 2 only for an explicit `--lanes 2` (split mode), else 1. The
    driver and every follower read it from the same flags, so they create the same groups."""
    return 2 if str(getattr(args, "lanes", "1")) == "2" else 1


@dataclasses.dataclass(frozen=True)
class TPTopology:
    """Where the ranks run: `size` ranks over `nnodes` machines, `size // nnodes` per machine, each
    running `lanes` forwards at a time."""

    size: int
    init_method: str  # tcp://host:port of rank 0
    nnodes: int = 1
    node_rank: int = 0
    lanes: int = 1

    @classmethod
    def from_args(cls, args) -> "TPTopology":
        size, nnodes, node_rank = args.tp_size, getattr(args, "nnodes", 1) or 1, getattr(args, "node_rank", 0) or 0
        if size < 1:
            raise ValueError(f"--tp-size must be >= 1, got {size}")
        if nnodes < 1 or not 0 <= node_rank < nnodes:
            raise ValueError(f"--node-rank {node_rank} must be in [0, --nnodes {nnodes})")
        if size % nnodes:
            raise ValueError(f"--tp-size {size} must be a multiple of --nnodes {nnodes}")
        addr = getattr(args, "dist_init_addr", None)
        if addr is None:
            if nnodes > 1:
                raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (rank 0's machine)")
            addr = f"127.0.0.1:{_free_port()}"
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--dist-init-addr must be HOST:PORT, got {addr!r}")
        return cls(size, f"tcp://{host}:{port}", nnodes, node_rank, tp_lanes(args))

    @property
    def local_ranks(self) -> range:
        per = self.size // self.nnodes
        return range(self.node_rank * per, (self.node_rank + 1) * per)


def rank_device(device: torch.device, rank: int, per_node: int) -> torch.device:
    """A CUDA rank uses the GPU of its local index; CPU ranks share the CPU."""
    return torch.device("cuda", rank % per_node) if device.type == "cuda" else device


def local_model_config(cfg, tp: TPGroup):
    """The config as one rank sees it (its heads only): what the attention backend is built for."""
    from sglang_duet.distributed.sharding import TPLayout

    if tp.size == 1:
        return cfg
    layout = TPLayout.of(cfg, tp.rank, tp.size)
    return dataclasses.replace(cfg, num_attention_heads=layout.num_heads, num_key_value_heads=layout.num_kv_heads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _portable(fb):
    """The batch with compact CPU tensors (a device tensor or a view of a large table would pickle
    its device or its whole storage)."""
    return dataclasses.replace(fb, **{f.name: getattr(fb, f.name).detach().to("cpu").clone()
                                      for f in dataclasses.fields(fb) if isinstance(getattr(fb, f.name), torch.Tensor)})


def _to_device(fb, device: torch.device):
    return dataclasses.replace(fb, **{f.name: getattr(fb, f.name).to(device)
                                      for f in dataclasses.fields(fb) if isinstance(getattr(fb, f.name), torch.Tensor)})


class TPDriver:
    """Rank 0's side: starts this machine's followers, joins the group, broadcasts every forward."""

    def __init__(self, args, device: torch.device):
        self.topology = TPTopology.from_args(args)
        if self.topology.node_rank != 0:
            raise ValueError("the driver runs on --node-rank 0; other nodes run followers only")
        per_node = self.topology.size // self.topology.nnodes
        self.device = rank_device(device, 0, per_node)
        ctx = mp.get_context("spawn")  # not fork: the driver may hold threads, locks and CUDA
        self.procs = {r: ctx.Process(target=follower_main, args=(r, self.topology, args, str(device)),
                                     name=f"sglang-duet-tp{r}", daemon=True)
                      for r in self.topology.local_ranks if r != 0}
        for p in self.procs.values():
            p.start()
        lanes = range(self.topology.lanes)
        self._locks = [threading.Lock() for _ in lanes]  # per lane: its broadcast and its forward
        self._last_send = [time.monotonic() for _ in lanes]
        self._closing = threading.Event()
        self._ready = False  # the followers have loaded and wait on the control group
        self.on_follower_death = None  # callable(rank, exitcode); set by the server's scheduler
        threading.Thread(target=self._watch, name="tp-watch", daemon=True).start()
        try:
            self.group = init_tp_group(0, self.topology.size, self.topology.init_method, self.device,
                                       getattr(args, "dist_timeout", None), peers_alive=self._check_alive,
                                       lanes=self.topology.lanes)
        except BaseException:
            self.group = None
            self.shutdown()
            raise

    def setup(self, kv_slots: int) -> None:
        """Tell the followers the KV pool's size (rank 0 decides: every pool must have the same slots).
        This waits until every rank has loaded its shard, under the rendezvous timeout (loading may
        take longer than a step may); the idle keepalive starts after it."""
        with contextlib.ExitStack() as held:
            for lock in self._locks:
                held.enter_context(lock)
            self.group.broadcast_object((_SETUP, kv_slots), startup=True)
            self._last_send = [time.monotonic()] * len(self._locks)
            self._ready = True
        threading.Thread(target=self._keepalive, name="tp-keepalive", daemon=True).start()

    @contextlib.contextmanager
    def step(self, fb):
        """Broadcast the batch on the calling thread's lane, then run the driver's own forward, all
        under that lane's lock."""
        lane = self.group.lane
        with self._locks[lane]:
            self._send_locked(lane, (_FORWARD, _portable(fb)))
            yield

    def shutdown(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        if self._ready:  # else they wait for the setup message: nothing to finish, stop them
            for lane in range(len(self._locks)):  # each follower thread stops on its own lane
                with contextlib.suppress(Exception):
                    self._send(lane, (_STOP,))
        for p in self.procs.values():
            p.join(5 if self._ready else 0)
            if p.is_alive():
                p.kill()
                p.join(1)
        if self.group is not None:
            with contextlib.suppress(Exception):
                destroy_tp_group(self.group)

    def dead_followers(self) -> dict[int, int | None]:
        return {r: p.exitcode for r, p in self.procs.items() if not p.is_alive()}

    def _check_alive(self) -> None:
        dead = self.dead_followers()
        if dead:
            raise RuntimeError(f"tensor-parallel rank(s) {sorted(dead)} exited while starting (exit codes "
                               f"{sorted(dead.values(), key=str)}); see their log lines above")

    def _send(self, lane: int, msg) -> None:
        with self._locks[lane]:
            self._send_locked(lane, msg)

    def _send_locked(self, lane: int, msg) -> None:
        self.group.broadcast_object(msg, lane=lane)
        self._last_send[lane] = time.monotonic()

    def _keepalive(self) -> None:
        every = min(KEEPALIVE_S, self.group.timeout_s / 3)
        while not self._closing.wait(min(1.0, every / 2)):
            for lane, lock in enumerate(self._locks):
                if time.monotonic() - self._last_send[lane] < every or not lock.acquire(blocking=False):
                    continue
                try:
                    if not self._closing.is_set():
                        self._send_locked(lane, (_KEEPALIVE,))
                except Exception as e:  # noqa: BLE001 - a dead peer: the watcher and the next step report it
                    logger.error("tensor-parallel keepalive failed: %s", e)
                    return
                finally:
                    lock.release()

    def _watch(self) -> None:
        sentinels = {p.sentinel: r for r, p in self.procs.items()}
        while sentinels and not self._closing.is_set():
            for s in mp_wait(list(sentinels), timeout=1.0):
                rank = sentinels.pop(s)
                if self._closing.is_set():
                    return
                code = self.procs[rank].exitcode
                logger.error("tensor-parallel rank %d died (exit code %s)", rank, code)
                if self.on_follower_death is not None:
                    self.on_follower_death(rank, code)


def follower_main(rank: int, topology: TPTopology, args, device: str) -> None:
    """A follower rank's process: load this rank's shard, then run every forward rank 0 sends."""
    from sglang_duet.memory.kv_pool import KVCachePool
    from sglang_duet.model_loader.loader import load_model

    logging.basicConfig(level=getattr(logging, str(getattr(args, "log_level", "info")).upper(), logging.INFO),
                        format=f"[tp{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the process that started us
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, topology.size // topology.nnodes)))
    per_node = topology.size // topology.nnodes
    dev = rank_device(torch.device(device), rank, per_node)
    group = None
    try:
        group = init_tp_group(rank, topology.size, topology.init_method, dev, getattr(args, "dist_timeout", None),
                              lanes=topology.lanes)
        loaded = load_model(args.model_path, load_format=args.load_format, dtype=args.dtype, device=str(dev),
                            model_config_path=args.model_config, seed=args.random_seed, tp=group,
                            tokenizer=False)
        model, cfg = loaded.model, loaded.config
        msg = group.broadcast_object(startup=True)
        if msg[0] != _SETUP:
            raise RuntimeError(f"tensor-parallel rank {rank}: expected the setup message, got {msg[0]!r}")
        dtype = next(model.parameters()).dtype
        pool = KVCachePool(cfg.num_hidden_layers, msg[1], model.layout.num_kv_heads, cfg.head_dim, dtype, dev)
        lanes = [threading.Thread(target=_follow_lane, args=(group, lane, model, pool, args, cfg, dev),
                                  name=f"tp{rank}-lane{lane}", daemon=True) for lane in range(1, group.num_lanes)]
        for t in lanes:
            t.start()
        _follow_lane(group, 0, model, pool, args, cfg, dev)
        for t in lanes:
            t.join()
    except Exception as e:  # noqa: BLE001 - the driver and the launcher see the exit code
        logger.error("tensor-parallel rank %d stops: %s", rank, e)
        os._exit(1)  # never wait on a collective again (atexit handlers of torch.distributed could)
    if group is not None:
        destroy_tp_group(group)


def _follow_lane(group: TPGroup, lane: int, model, pool, args, cfg, dev) -> None:
    """Run every forward the driver sends on `lane` until it says stop. Each lane has its own
    attention backend (backends keep per-step plan state); the KV pool is shared, as on the driver
    (the lanes' requests hold disjoint slots). A failure on any lane ends the whole rank."""
    from sglang_duet.kernels.attention import get_attention_backend

    try:
        group.bind_lane(lane)
        attn = get_attention_backend(args.attention_backend, local_model_config(cfg, group), dev)
        with torch.inference_mode():
            while True:
                msg = group.broadcast_object()
                if msg[0] == _FORWARD:
                    model(_to_device(msg[1], dev), attn, pool)
                elif msg[0] == _STOP:
                    return
    except Exception as e:  # noqa: BLE001 - the driver and the launcher see the exit code
        logger.error("tensor-parallel rank %d, lane %d stops: %s", group.rank, lane, e)
        os._exit(1)


def run_node_followers(args) -> int:
    """A machine with --node-rank > 0: start its ranks (all followers) and wait for them."""
    topology = TPTopology.from_args(args)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=follower_main, args=(r, topology, args, device), name=f"sglang-duet-tp{r}")
             for r in topology.local_ranks]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return max((p.exitcode or 0) != 0 for p in procs)
