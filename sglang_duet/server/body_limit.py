"""Refuse HTTP request bodies over `--max-request-bytes` with 413, before buffering them.

A declared Content-Length over the limit is answered at once, without reading the body. A body
sent without one (chunked) is counted as it arrives and refused as soon as it passes the limit,
so a client cannot make the server hold more than the limit per request in memory.
Pure ASGI (not BaseHTTPMiddleware, which would buffer streams and hide disconnects).
"""
from __future__ import annotations

from sglang_duet.server.errors import APIError


def too_large(size: int | str, limit: int) -> APIError:
    return APIError(413, f"The request body ({size} bytes) is larger than the limit ({limit} bytes; "
                         f"the server's --max-request-bytes).", code="request_too_large")


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                return await APIError(400, "Invalid Content-Length header.").response()(scope, receive, send)
            if size > self.max_bytes:
                return await too_large(size, self.max_bytes).response()(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    # Raised inside the handler's `await request.body()`: the app's APIError handler
                    # turns it into the 413 response.
                    raise too_large(f"more than {self.max_bytes}", self.max_bytes)
            return msg

        return await self.app(scope, limited_receive, send)
