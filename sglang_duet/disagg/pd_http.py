"""The HTTP side of SGLang's PD protocol on a prefill or decode instance (see rooms.py).

sglang-router sends the ordinary request (`/generate`, `/v1/completions`, `/v1/chat/completions`)
with `bootstrap_host`, `bootstrap_port`, `bootstrap_room` added. The server's own handlers
validate, tokenize and answer it as usual; only the message that reaches the scheduler changes:

- `BootstrapCapture` (ASGI middleware) reads those three fields from the body and, for the
  duration of the request, has the instance's scheduler backend (instance_backend.py) translate
  through `RoomTranslator`: a GenerateReq becomes a `PrefillReq(room=...)` on a prefill instance
  (one token, KV held for the room) or a `DecodeReq(bootstrap=...)` on a decode instance (first
  token and KV from the room's offer). Requests without rooms pass through, so the same instance
  still serves ordinary requests (warm-up, /health_generate, clients without a router) and our own
  router's /disagg/* routes.

The i-th request a handler submits takes the i-th room (a batch /generate sends lists); requests
beyond the rooms given (n > 1 choices) are served whole where they arrived.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from sglang_duet.disagg import messages as dm
from sglang_duet.disagg.instance_backend import translating
from sglang_duet.server import io_struct as io

PD_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})


@dataclass
class RoomTranslator:
    """The i-th GenerateReq of the HTTP request takes the i-th room; beyond them, none."""

    mode: str  # "prefill" | "decode"
    items: list[dm.Bootstrap]
    used: int = field(default=0)

    def __call__(self, g: io.GenerateReq):
        if self.used >= len(self.items):
            return None
        b = self.items[self.used]
        self.used += 1
        if self.mode == "prefill":
            return dm.PrefillReq(g.rid, g.input_ids, g.params, g.arrival_time, room=b.room)
        return dm.DecodeReq(g.rid, g.input_ids, g.params, g.arrival_time, first_token=-1, first_logprob=None,
                            seed=0, kv=None, bootstrap=b)


class BootstrapError(ValueError):
    pass


def parse_bootstrap(body: dict, mode: str) -> list[dm.Bootstrap]:
    """The rooms a request names ([] for none); a BootstrapError says what is wrong with them."""
    room = body.get("bootstrap_room")
    if room is None:
        return []
    rooms = room if isinstance(room, list) else [room]
    n = len(rooms)

    def spread(name, kinds):
        v = body.get(name)
        vs = v if isinstance(v, list) else [v] * n
        if len(vs) != n or any(x is not None and (isinstance(x, bool) or not isinstance(x, kinds)) for x in vs):
            raise BootstrapError(f"{name} must be a {kinds.__name__} or a list of {n}, like bootstrap_room.")
        return vs

    hosts, ports = spread("bootstrap_host", str), spread("bootstrap_port", int)
    out = []
    for h, p, r in zip(hosts, ports, rooms):
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise BootstrapError(f"bootstrap_room must be a non-negative integer, got {r!r}.")
        if mode == "decode" and (not h or not p):
            raise BootstrapError("bootstrap_host and bootstrap_port are required with bootstrap_room on a decode "
                                 "instance: start the prefill instance with --disaggregation-bootstrap-port PORT and "
                                 "give the router `--prefill URL PORT`.")
        out.append(dm.Bootstrap(h or "", p or 0, r))
    return out


class BootstrapCapture:
    """Pure ASGI middleware (same task as the handler, so the context variable reaches it)."""

    def __init__(self, app, mode: str, limit: int):
        self.app = app
        self.mode = mode
        self.limit = limit  # the server's --max-request-bytes: a larger body is the inner limit's to refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in PD_PATHS:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self.app(scope, receive, send)  # not read here: the server answers 413/400
        messages, size, more = [], 0, True
        while more and size <= self.limit:
            m = await receive()
            messages.append(m)
            if m["type"] != "http.request":
                break
            size += len(m.get("body", b""))
            more = m.get("more_body", False)
        rooms: list[dm.Bootstrap] = []
        if not more and messages and messages[-1]["type"] == "http.request":
            try:
                body = orjson.loads(b"".join(m.get("body", b"") for m in messages))
                rooms = parse_bootstrap(body, self.mode) if isinstance(body, dict) else []
            except orjson.JSONDecodeError:
                pass  # the handler answers a body it cannot read
            except BootstrapError as e:
                return await _error(send, str(e))

        async def replay():
            return messages.pop(0) if messages else await receive()

        if not rooms:
            return await self.app(scope, replay, send)
        with translating(RoomTranslator(self.mode, rooms)):
            await self.app(scope, replay, send)


async def _error(send, message: str) -> None:
    body = orjson.dumps({"object": "error", "message": message, "type": "BadRequestError", "param": "bootstrap_room",
                         "code": 400})
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def install(app, mode: str, limit: int) -> None:
    # The server's generation routes skip the app's middleware stack (http_server.DuetApp.fast_routes):
    # wrap each of them; the middleware serves the FastAPI routes of an app without that fast path.
    fast = getattr(app, "fast_routes", {})
    for path in PD_PATHS & fast.keys():
        fast[path] = BootstrapCapture(fast[path], mode=mode, limit=limit)
    app.add_middleware(BootstrapCapture, mode=mode, limit=limit)
