"""Server-sent events: `data: {json}\\n\\n` lines ending with `data: [DONE]`, and clean aborts.

The stream starts only once the first output (or error) is in: a request the scheduler refuses
(queue full, ...) still gets a proper HTTP status instead of a 200 with an error event. After
that, errors become an error event followed by [DONE].

`SSEStream` is the response, an ASGI app of its own rather than starlette's StreamingResponse:
per stream that one ran its body in an extra anyio task group (two tasks and a cancel scope, to
watch for the client leaving), and per event an async generator step; at hundreds of streams
that was a large share of the main process's CPU. Here one small task waits for the
disconnect and the events are written from the handler's own task; the last write carries the
final events, [DONE] and the end of the chunked body together.

Served by uvicorn's httptools protocol, a single request's running events do not go through the
task at all: the tokenizer manager's receive loop hands them to `SSEStream._push`, which renders
them and writes the chunk to the connection's transport (`direct_writer`), as uvicorn's send
would, while the task stays parked in `group.next()`. Per event that saves the task's wake-up and
its trip through next() and the ASGI send (about half of the main process's Python time per
event at 1000 streams). Whenever writing at once is not the same as the task's write (the
transport's buffer is full, the client is gone, the task is itself writing), the push is declined
and the output waits for the task as before.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Iterable

import orjson
from starlette.responses import Response

from sglang_duet.server.errors import APIError

DONE = b"data: [DONE]\n\n"
_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
            (b"content-type", b"text/event-stream; charset=utf-8")]
_START = {"type": "http.response.start", "status": 200, "headers": _HEADERS}

logger = logging.getLogger("sglang_duet.server")

try:  # uvicorn's C-parser protocol (httptools, a dependency); without it every event takes the task
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle as _UvicornCycle
except ImportError:  # pragma: no cover
    _UvicornCycle = None


class UvicornWriter:
    """Writes body chunks of a started chunked response straight to uvicorn's transport, framed as
    its send() frames a `more_body` chunk (`%x\\r\\n` body `\\r\\n`). Such a send changes no state of
    uvicorn's: it waits while the transport's buffer is over its limit (`flow.write_paused`),
    returns silently if the client is gone, then writes. `ready()` is false in exactly those
    cases, so a direct write is what that send would have done without waiting."""

    __slots__ = ("cycle", "transport", "flow")

    def __init__(self, cycle):
        self.cycle = cycle
        self.transport = cycle.transport
        self.flow = cycle.flow

    def ready(self) -> bool:
        c = self.cycle
        return (c.chunked_encoding is True and c.response_started and not c.response_complete
                and not c.disconnected and not self.flow.write_paused)

    def write(self, body: bytes) -> None:
        self.transport.write(b"%x\r\n%b\r\n" % (len(body), body))

    def abort(self) -> None:
        """What uvicorn does when the app fails after the response started: close the connection."""
        self.transport.close()

    def cork(self) -> bool:
        """Until `uncork()`, collect what uvicorn's send writes instead of writing it, so that a
        response's head and its first body chunk (for a short request: its whole body) leave in one
        write (one syscall and one wake-up of the client per request fewer; each write is ~16 us of
        the main process on loopback). Only before the response starts and while its send would
        not wait (the buffer under its limit, the client there): uvicorn's send then runs through
        without suspending, so nothing else writes to the connection meanwhile. False: not corked."""
        c = self.cycle
        if c.response_started or c.disconnected or self.flow.write_paused or c.transport is not self.transport:
            return False
        c.transport = _Cork(self.transport)
        return True

    def uncork(self) -> None:
        c = self.cycle
        cork, c.transport = c.transport, self.transport
        if cork.parts and not self.transport.is_closing():
            self.transport.write(b"".join(cork.parts))
        if cork.closed:
            self.transport.close()


class _Cork:
    """The connection's transport as uvicorn's send sees it while corked: writes are kept, a close
    (the client asked for `connection: close`) waits for them."""

    __slots__ = ("transport", "parts", "closed")

    def __init__(self, transport):
        self.transport = transport
        self.parts: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed or self.transport.is_closing()


def direct_writer(send):
    """A writer for `send`'s connection when `send` is uvicorn's httptools send (nothing wraps it),
    or the `sse_writer` a test or an in-process benchmark attached to its send function; else None."""
    cycle = getattr(send, "__self__", None)
    if _UvicornCycle is not None and isinstance(cycle, _UvicornCycle):
        if getattr(send, "__func__", None) is _UvicornCycle.send and all(
                hasattr(cycle, a) for a in ("transport", "flow", "disconnected")):
            return UvicornWriter(cycle)
        return None
    return getattr(send, "sse_writer", None)


def sse(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class SSEStream(Response):
    """A streaming response over a RequestGroup: render(batch) chunks as news arrives, then
    tail() chunks and [DONE]. The group is closed (its unfinished requests aborted) however the
    response ends: finished, failed, client gone (even before the first byte), or cancelled.
    A starlette Response only so that FastAPI routes return it as it is (it writes itself)."""

    media_type = "text/event-stream"

    def __init__(self, group, first: list, render: Callable[[list], Iterable[bytes]],
                 tail: Callable[[], Iterable[bytes]]):
        self.status_code = 200
        self.background = None
        self.raw_headers = _HEADERS
        self.group = group
        self.first = first
        self.render = render
        self.tail = tail
        self.client_gone = False
        self._ending = False  # the last write is under way: a disconnect now changes nothing
        self._conn = None  # direct_writer(send): the connection, if it can be written to directly
        self._writer = None  # the same, while pushes are on
        self._parked = False  # the task waits in group.next(): a direct write cannot interleave with its own
        self.pushed = 0  # events written by _push (for tests and benchmarks)

    async def __call__(self, scope, receive, send) -> None:
        task = asyncio.current_task()
        watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(receive, task))
        try:
            writer = direct_writer(send)
            self._conn = writer
            if writer is not None and self.group.push_to(self._push):
                self._writer = writer
            await self._stream(send)
        except asyncio.CancelledError:
            if self.client_gone and task.uncancel() == 0:
                return  # our own cancellation: the client left, nobody to answer
            raise
        finally:
            watcher.cancel()
            if self._writer is not None:
                self._writer = None
                self.group.push_to(None)
            self.group.close()  # synchronous: works even while the task is being cancelled

    async def _stream(self, send) -> None:
        group = self.group
        unfinished = len(group.states)  # next() returns each request's final output once
        started = False
        try:
            batch = self.first
            while True:
                # One write per batch of news, however many events it makes (choices, role chunks).
                chunk = b""
                if batch:
                    chunk = b"".join(self.render(batch))
                    for _, d in batch:
                        if d.finished:
                            unfinished -= 1
                last = unfinished <= 0 or batch is None
                if last:  # nothing more can come: the final events, [DONE] and the end in one write
                    chunk += b"".join(self.tail()) + DONE
                if not started:
                    started = True
                    await self._start(send, chunk, last)  # the head and the first chunk in one write
                    if last:
                        return
                elif last:
                    await self._end(send, chunk)
                    return
                elif chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self._parked = True
                try:
                    batch = await group.next()
                finally:
                    self._parked = False
        except APIError as e:
            if not started:
                await send(_START)
            await self._end(send, sse(e.body()) + DONE)

    async def _start(self, send, chunk: bytes, last: bool) -> None:
        """The response's start and its first chunk (the last one too if `last`), corked into one
        write where the connection is uvicorn's (UvicornWriter.cork)."""
        conn = self._conn
        corked = conn is not None and getattr(conn, "cork", None) is not None and conn.cork()
        try:
            await send(_START)
            if last:
                await self._end(send, chunk)
            elif chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            if corked:
                conn.uncork()

    def _push(self, batch: list) -> bool:
        """The receive loop's sink (RequestGroup.push_to): render a running output's events and write
        them now, if the task is parked and the writer can take them as its send would."""
        w = self._writer
        if w is None or not self._parked or self._ending or not w.ready():
            return False
        try:
            chunk = b"".join(self.render(batch))
        except Exception:  # noqa: BLE001 - a rendering bug: end this response as the task's failure would
            logger.exception("rendering a streamed event failed")
            self._writer = None
            w.abort()  # the watcher sees the disconnect and ends the task, which aborts the request
            return True
        if chunk:
            w.write(chunk)
            self.pushed += 1
        return True

    async def _end(self, send, body: bytes) -> None:
        self._ending = True
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _watch_disconnect(self, receive, task: asyncio.Task) -> None:
        # The request body has been read, so the next ASGI message is the disconnect (uvicorn
        # answers it at once after the response is complete).
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self._ending:
                    self.client_gone = True
                    task.cancel()
                return


async def start_stream(group, render: Callable[[list], Iterable[bytes]],
                       tail: Callable[[], Iterable[bytes]]) -> SSEStream:
    """Wait for the group's first outputs, then return the response that streams the rest."""
    try:
        first = await group.next()
    except BaseException:
        group.close()
        raise
    group.request = None  # from here on the response's watcher notices a disconnect and cancels it
    return SSEStream(group, first, render, tail)
