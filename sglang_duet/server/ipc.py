"""IPC plumbing shared by the three processes: socket paths, ZMQ sockets, child-process setup."""
from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass

import msgspec
import zmq

from sglang_duet.server.io_struct import ReadyInfo

logger = logging.getLogger(__name__)


@dataclass
class IPCPaths:
    root: str  # private directory (mode 0700) holding the sockets and the tokenizer copy
    scheduler_in: str  # main -> scheduler
    detokenizer_in: str  # scheduler -> detokenizer
    main_in: str  # detokenizer -> main

    @classmethod
    def create(cls) -> "IPCPaths":
        # mkdtemp creates the directory with mode 0700: other users cannot connect to our sockets.
        root = tempfile.mkdtemp(prefix="sglang-duet-")
        os.chmod(root, 0o700)
        return cls(root, f"ipc://{root}/scheduler", f"ipc://{root}/detokenizer", f"ipc://{root}/main")

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def pull_socket(ctx: zmq.Context, addr: str) -> zmq.Socket:
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVHWM, 0)  # never drop or block: back-pressure is the scheduler's job
    s.setsockopt(zmq.LINGER, 0)
    s.bind(addr)
    return s


def push_socket(ctx: zmq.Context, addr: str) -> zmq.Socket:
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 0)  # send() never blocks the event loop / the scheduler loop
    s.setsockopt(zmq.LINGER, 0)
    s.connect(addr)
    return s


def spawn_context():
    # 'spawn', not fork: the main process runs an event loop, threads and maybe CUDA; a forked child
    # would inherit their half-held locks.
    return mp.get_context("spawn")


def setup_child(name: str, log_level: str, socket_dir: str | None = None) -> None:
    """First thing a child does: logging, signals, and dying together with the parent.

    socket_dir: removed by this child when the main process died without removing it (SIGKILL):
    no socket files or tokenizer copy are left in /tmp after a crash.
    """
    logging.basicConfig(level=log_level.upper(), format=f"[%(asctime)s {name}] %(levelname)s %(message)s",
                        stream=sys.stderr)
    # Ctrl-C reaches the whole process group; the main process decides how to stop the children.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def on_sigterm(*_):
        # From the main process stopping us (it removes the dir itself), or PR_SET_PDEATHSIG because
        # it died. Nothing to save: leave at once (a SystemExit raised at a random point, e.g. inside
        # atexit hooks, only prints noise).
        if socket_dir and _gone(parent):
            shutil.rmtree(socket_dir, ignore_errors=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:  # Linux: get SIGTERM if the main process dies without cleaning up (e.g. SIGKILL)
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _gone(pid: int) -> bool:
    """pid has exited. At PR_SET_PDEATHSIG time the dead parent may still be our parent, as a zombie."""
    if os.getppid() != pid:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def parent_alive() -> bool:
    parent = mp.parent_process()
    return parent is None or parent.is_alive()


def send_ready(conn, info: ReadyInfo) -> None:
    import msgspec

    # The readiness pipe carries msgpack bytes too (send_bytes), not pickled objects.
    conn.send_bytes(msgspec.msgpack.encode(info))


def recv_ready(conn) -> ReadyInfo:
    import msgspec

    return msgspec.msgpack.decode(conn.recv_bytes(), type=ReadyInfo)


def error_text(exc: BaseException) -> str:
    """What the main process prints when a child fails to start: the cause, then the traceback."""
    import traceback

    tb = "".join(traceback.format_exception(exc))
    return f"{type(exc).__name__}: {exc}\n{tb}"


GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """Call once a process has started up: the objects it holds now (modules, the model config, the
    tokenizer) are moved out of the collector's sight (gc.freeze), and young-generation collections
    run every 20000 allocations instead of 700. A step at 1000 streams allocates tens of thousands
    of objects; with the defaults, collections that walk every live request ran several times per
    step on the scheduler's critical path (about half its host time at 1024 streams, measured)."""
    import gc

    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, g1, g2)


def decode_or_drop(decode, data: bytes, what: str = "message"):
    """Decode bytes from a socket as one of our typed structs, or drop them with a log line (None).

    Typed decoding only: bytes that are not one of our msgpack structs (a pickle, junk from
    another program on the socket) are refused here, never executed or half-applied.
    """
    try:
        return decode(data)
    except msgspec.DecodeError as e:
        logger.error("dropping an undecodable %s (%d bytes): %s", what, len(data), e)
        return None

