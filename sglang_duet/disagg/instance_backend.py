"""The tokenizer manager's backend on a prefill or decode instance (server/scheduler_backend.py).

The ordinary ZMQ backend to the instance's own scheduler, except that a GenerateReq sent while a
disaggregated request is being served goes out as that request's own message (a `PrefillReq` or a
`DecodeReq`). Whoever serves the HTTP request says how, through a context variable
(`translating`): the bootstrap rooms of SGLang's protocol (pd_http.py) or our router's
/disagg/prefill and /disagg/decode routes (instance_api.py). The manager's validation, accounting
and aborts stay the same, and a later AbortReq takes the same socket, so it never overtakes the
request.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

from sglang_duet.server import io_struct as io
from sglang_duet.server.scheduler_backend import ZmqSchedulerBackend

# GenerateReq -> the message to send instead, or None: send it as it is (served whole here)
Translate = Callable[[io.GenerateReq], object | None]

_CURRENT: contextvars.ContextVar[Translate | None] = contextvars.ContextVar("sglang_duet_disagg_translate",
                                                                            default=None)


@contextlib.contextmanager
def translating(translate: Translate):
    """While inside, requests this task (and the tasks it starts) submits go through `translate`."""
    token = _CURRENT.set(translate)
    try:
        yield
    finally:
        _CURRENT.reset(token)


class InstanceBackend(ZmqSchedulerBackend):
    def message_for(self, req: io.GenerateReq):
        translate = _CURRENT.get()
        msg = translate(req) if translate is not None else None
        return req if msg is None else msg
