"""Where the tokenizer manager's requests go and where their outputs come from.

`TokenizerManager` validates, tokenizes and keeps each request's state; a `SchedulerBackend`
carries the requests to whatever runs them and brings the outputs back. The manager hands it
message structs (never bytes), and it delivers into the manager through three calls:

- `tm._handle_message(data)`: one encoded io message (BatchStrOut, SchedulerStats, ReqError);
- `tm._on_outputs(batch)`: a BatchStrOut already decoded;
- `tm.fail_request(rid, error)`: the request ends with an error (an `APIError`).

`ZmqSchedulerBackend` (the default) talks to this server's own scheduler process and reads the
detokenizer's socket. The entrypoint may pass another one through `ServerHooks.scheduler_backend`
(server/hooks.py): a prefill or decode instance sends its own message kinds over the same socket,
and the PD router runs each request over HTTP (both in disagg/, which this layer never imports).
"""
from __future__ import annotations

import asyncio
import threading
from typing import TYPE_CHECKING

import zmq

from sglang_duet.server import io_struct as io
from sglang_duet.server.ipc import IPCPaths, pull_socket, push_socket

if TYPE_CHECKING:
    from sglang_duet.server.tokenizer_manager import TokenizerManager

RECV_BATCH = 16  # messages handled per reader callback before the woken handlers get a turn


class SchedulerBackend:
    """The interface; every method is called on the event loop's thread."""

    def start(self, tm: "TokenizerManager") -> None:
        """The event loop runs: begin delivering outputs to `tm`."""

    def send_generate(self, reqs: list[io.GenerateReq]) -> None:
        """Send requests answered together: all or none (raise before sending any; an OverflowError
        says an integer parameter does not fit in 64 bits)."""
        raise NotImplementedError

    def send_abort(self, rid: str) -> None:
        """Stop a request and free what it holds; its final word may still arrive (or not)."""
        raise NotImplementedError

    def send_flush_cache(self) -> None:
        """Empty the prefix cache, where there is one behind this backend."""

    def unavailable(self) -> str | None:
        """Why no request can be served right now (the server answers 503), or None."""
        return None

    def internal_state(self) -> dict:
        """Extra fields for /get_server_info's internal state."""
        return {}

    def close(self) -> None:
        pass


class ZmqSchedulerBackend(SchedulerBackend):
    """This server's scheduler process: msgpack structs over a ZMQ PUSH socket, outputs from the
    detokenizer over a PULL socket read through the event loop's reader callback."""

    def __init__(self, paths: IPCPaths):
        self.paths = paths
        self._zctx = zmq.Context(1)
        # A plain (sync) PUSH socket: send() never blocks (no HWM) and works from `finally` blocks of
        # cancelled handlers, which is where aborts come from.
        self._send = push_socket(self._zctx, paths.scheduler_in)
        self._recv = pull_socket(self._zctx, paths.main_in)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._outbox: list[bytes] = []  # see _post
        self._deliver = None

    def message_for(self, req: io.GenerateReq):
        """The message the scheduler gets for `req` (a subclass may send a kind of its own)."""
        return req

    def send_generate(self, reqs: list[io.GenerateReq]) -> None:
        msgs = [io.encode(self.message_for(r)) for r in reqs]  # all encoded before any is sent
        for m in msgs:
            self._post(m)

    def send_abort(self, rid: str) -> None:
        self._post(io.encode(io.AbortReq(rid)))

    def send_flush_cache(self) -> None:
        self._post(io.encode(io.FlushCacheReq()))

    def _post(self, data: bytes) -> None:
        """Send `data` at the end of this event-loop iteration, with whatever else it sends.

        A send that finds ZMQ's I/O thread asleep wakes it (a syscall and a thread wake-up): the
        largest single item of a request's admission in the main process (py-spy: ~15% of its CPU
        per chat request under a burst). The requests one loop iteration admits (a burst's arrivals
        are handled together) share one wake-up this way. One queue for every kind keeps the order
        (an abort never overtakes its request); sync, so aborts from `finally` blocks of cancelled
        handlers still go out. Before start(), after close() began, or from another thread: at once.
        """
        loop = self._loop
        if loop is None or loop.is_closed() or threading.get_ident() != self._loop_thread:
            self._send.send(data)
            return
        self._outbox.append(data)
        if len(self._outbox) == 1:
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        out, self._outbox = self._outbox, []
        for m in out:
            self._send.send(m)

    def start(self, tm: "TokenizerManager") -> None:
        self._deliver = tm._handle_message
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._loop.add_reader(self._recv.getsockopt(zmq.FD), self._on_readable)
        self._loop.call_soon(self._on_readable)  # whatever arrived before the reader was registered

    def _on_readable(self) -> None:
        """The reader callback: handle what has arrived, then let the handlers run.

        At most RECV_BATCH messages per call, then the rest in a later callback: the handlers woken
        meanwhile (each has its request's news merged into one event) run in between, so a backlog
        (the main process behind the scheduler) can never starve them; the per-message work is
        O(outputs in the message). The socket's fd is edge-triggered: every call reads until the
        socket is empty or reschedules itself.
        """
        for _ in range(RECV_BATCH):
            try:
                data = self._recv.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # closed while shutting down
                return
            self._deliver(data)
        self._loop.call_soon(self._on_readable)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_reader(self._recv.getsockopt(zmq.FD))
            except Exception:  # noqa: BLE001 - closing anyway
                pass
        self._flush()  # what this iteration queued
        self._loop = None  # later sends (none expected) go out at once
        self._send.close(linger=0)
        self._recv.close(linger=0)
        self._zctx.term()
