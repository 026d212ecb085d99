"""Server-sent events: `data: {json}\\n\\n` lines ending with `data: [DONE]`, and clean aborts.

The stream starts only once the first output (or error) is in: a request the scheduler refuses
(queue full, ...) still gets a proper HTTP status instead of a 200 with an error event. After
that, errors become an error event followed by [DONE].
"""
from __future__ import annotations

from typing import Callable, Iterable

import orjson
from starlette.responses import StreamingResponse

from sglang_duet.server.errors import APIError

DONE = b"data: [DONE]\n\n"


def sse(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _ClosingStreamingResponse(StreamingResponse):
    """Closes the body generator, and calls `on_close`, however the response ends.

    When the client hangs up while the generator is parked at a `yield` (its chunk being sent),
    starlette just stops iterating; the generator's `finally` (which aborts the request) would then
    run only when the garbage collector gets to it. Closing it here runs it now. When the client
    is gone before the first chunk (sending the headers fails), the generator never started and
    its `finally` never runs at all: `on_close` covers that case.
    """

    on_close: Callable[[], None] | None = None

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.on_close is not None:
                self.on_close()  # synchronous: runs even if this task is being cancelled
            await self.body_iterator.aclose()


def sse_response(body, on_close: Callable[[], None] | None = None) -> StreamingResponse:
    r = _ClosingStreamingResponse(body, media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    r.on_close = on_close
    return r


async def start_stream(group, render: Callable[[list], Iterable[bytes]], tail: Callable[[], Iterable[bytes]]):
    """Wait for the group's first outputs, then stream render(batch) chunks, tail() chunks, [DONE]."""
    try:
        first = await group.next()
    except BaseException:
        group.close()
        raise
    group.request = None  # from here on starlette notices a disconnect and cancels the body

    async def body():
        try:
            batch = first
            while batch is not None:
                # One write per batch of news, however many events it makes (choices, role chunks).
                chunk = b"".join(render(batch))
                if chunk:
                    yield chunk
                batch = await group.next()
            for c in tail():
                yield c
            yield DONE
        except APIError as e:
            yield sse(e.body())
            yield DONE
        finally:
            group.close()  # synchronous: works even while the task is being cancelled

    return sse_response(body(), on_close=group.close)
