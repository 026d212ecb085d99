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
"""
from __future__ import annotations

import asyncio
from typing import Callable, Iterable

import orjson
from starlette.responses import Response

from sglang_duet.server.errors import APIError

DONE = b"data: [DONE]\n\n"
_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
            (b"content-type", b"text/event-stream; charset=utf-8")]
_START = {"type": "http.response.start", "status": 200, "headers": _HEADERS}


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

    async def __call__(self, scope, receive, send) -> None:
        task = asyncio.current_task()
        watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(receive, task))
        try:
            await self._stream(send)
        except asyncio.CancelledError:
            if self.client_gone and task.uncancel() == 0:
                return  # our own cancellation: the client left, nobody to answer
            raise
        finally:
            watcher.cancel()
            self.group.close()  # synchronous: works even while the task is being cancelled

    async def _stream(self, send) -> None:
        group = self.group
        unfinished = len(group.states)  # next() returns each request's final output once
        await send(_START)
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
                if unfinished <= 0 or batch is None:
                    # nothing more can come: the final events, [DONE] and the end in one write
                    await self._end(send, chunk + b"".join(self.tail()) + DONE)
                    return
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                batch = await group.next()
        except APIError as e:
            await self._end(send, sse(e.body()) + DONE)

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
