"""The scheduler process of a prefill or a decode instance: what both sides share.

Both are the ordinary scheduler process (same EngineCore, policy and executor, same loop) plus a
KV transport, the disaggregation messages on the input socket (`PrefillReq`, `DecodeReq`), control
sockets polled beside it and timers. `DisaggScheduler` holds that; each side is its own module:

- `prefill_scheduler.py`: runs a prompt for its first token, holds its KV and hands it out (to our
  router in the finish reason, to a decode instance through a bootstrap room) until it is pulled,
  released or expires.
- `decode_scheduler.py`: waits for KV room, pulls the KV, has the prefill confirm the hold, then
  admits the request ready to decode.

Ordinary GenerateReqs are served as usual on both kinds (the warm-up request, /health_generate).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import uuid

from sglang_duet.disagg import messages as dm
from sglang_duet.disagg.mooncake import advertised_host
from sglang_duet.disagg.transfer import make_transport, pool_layout
from sglang_duet.server import io_struct as io
from sglang_duet.server.scheduler_proc import PROMPT_CONTEXT, SchedulerProcess

logger = logging.getLogger("sglang_duet.disagg")

INFO_FILE = "disagg.json"  # in the private IPC dir: what the main process serves at /disagg/info


class DisaggScheduler(SchedulerProcess):
    role = "?"

    def __init__(self, args, paths):
        super().__init__(args, paths)
        self.instance_id = f"{self.role}-{uuid.uuid4().hex[:10]}"
        self.kv_timeout_s = float(args.disaggregation_kv_timeout_s)
        pool = getattr(self.engine, "kv_pool", None)
        layout = pool_layout(pool) if pool is not None else _emulated_layout(self.engine)
        # peers on other hosts (Mooncake, the release socket) reach this instance at `self.host`
        self.host = advertised_host(args.host)
        self.transport = make_transport(args.disaggregation_transfer_backend, pool, layout, self.instance_id,
                                        self.role, host=self.host)
        # SIGTERM (from the main process, or its death) must still clean up shared memory; then the
        # process's own handler (setup_child's: its cleanup, then exit) runs as before.
        self._prev_sigterm = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        try:
            self.transport.close()
        finally:
            if callable(self._prev_sigterm):
                self._prev_sigterm(signum, frame)
            os._exit(0)

    def write_info(self, extra: dict) -> None:
        info = {"mode": self.role, "instance_id": self.instance_id, "transfer": self.transport.describe(),
                "kv_timeout_s": self.kv_timeout_s, **extra}
        with open(os.path.join(self.paths.root, INFO_FILE), "w") as f:
            json.dump(info, f)

    # ---- input -------------------------------------------------------------------------------

    def _drain(self, timeout_ms: int) -> int:
        """Like the base loop's: every pending input message, plus control messages and timers."""
        n = 0
        ready = dict(self.poller.poll(timeout_ms))
        if self.recv in ready:
            n += self._drain_input()
        n += self._drain_control(ready)
        n += self._housekeeping()
        return n

    decode_input = staticmethod(dm.decode_input)  # the base messages plus the disaggregation ones

    def _handle(self, msg) -> None:
        if isinstance(msg, dm.PrefillReq):
            self._add_prefill(msg)
        elif isinstance(msg, dm.DecodeReq):
            self._add_decode(msg)
        else:
            super()._handle(msg)

    def _add_prefill(self, msg) -> None:
        self._refuse(msg.rid, "This is a decode instance; send prefills to a prefill instance.", 400)

    def _add_decode(self, msg) -> None:
        self._refuse(msg.rid, "This is a prefill instance; send decodes to a decode instance.", 400)

    def _drain_control(self, ready: dict) -> int:
        return 0

    def _housekeeping(self) -> int:
        return 0

    def _refuse(self, rid: str, message: str, status: int) -> None:
        """The request's final word when it never entered the core (the main process settles on it)."""
        self._count("rejected")
        self._push(io.ReqError(rid, message, status))

    def _count(self, name: str) -> None:
        """The base process's accounting (submitted / rejected), where it keeps one."""
        setattr(self, name, getattr(self, name, 0) + 1)

    def _register(self, rid: str, prompt_ids: list[int], params) -> None:
        self._push(io.DetokRegister(
            rid=rid, prompt_tail=prompt_ids[-PROMPT_CONTEXT:], stop=list(params.stop),
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens, no_stop_trim=params.no_stop_trim,
        ))

    def close(self) -> None:
        try:
            self.transport.close()
        finally:
            super().close()


def _emulated_layout(engine) -> dm.KVLayout:
    c = engine.model_config
    return dm.KVLayout(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, "bfloat16")
