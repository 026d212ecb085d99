"""Unit tests of issue 17's defects, without a server: each fails on the code before its fix.

- the scheduler sends the final word on a request aborted in the same drain it arrived in;
- tokenizing and chat templating run off the event loop (other coroutines run meanwhile);
- chat_template_kwargs that collide with the template call's own names are a 400;
- repetition_penalty near 0 keeps logprobs finite and the emitted token the top one.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
import zmq

from hardening_utils import SMOLLM_CONFIG


# ---- defect 2: an abort handled while the scheduler has no other work --------------------------


def test_abort_in_the_same_drain_gets_its_final_message(monkeypatch):
    from sglang_duet.server import io_struct as io
    from sglang_duet.server import scheduler_proc
    from sglang_duet.server.ipc import IPCPaths, pull_socket
    from sglang_duet.server_args import ServerArgs

    paths = IPCPaths.create()
    ctx = zmq.Context()
    out = pull_socket(ctx, paths.detokenizer_in)
    sched = scheduler_proc.SchedulerProcess(
        ServerArgs(executor="emulated", hardware="h100", model_config=SMOLLM_CONFIG, max_total_tokens=4096), paths)
    try:
        # One drain handles both (as when both arrive during the scheduler's last long step).
        sched._handle(io.GenerateReq("r1", [1, 2, 3], {"max_new_tokens": 4}, time.monotonic()))
        sched._handle(io.AbortReq("r1"))
        assert not sched.engine.has_work()
        calls = iter([True])  # the parent is alive for one idle iteration, then the loop returns
        monkeypatch.setattr(scheduler_proc, "parent_alive", lambda: next(calls, False))
        sched.loop()
        finals = []
        while out.poll(100):
            msg = io.decode(out.recv())
            if isinstance(msg, io.BatchTokenOut):
                finals += [o for o in msg.outs if o.rid == "r1" and o.finished]
        assert len(finals) == 1 and finals[0].finish_reason["type"] == "abort"
    finally:
        sched.close()
        out.close(0)
        ctx.term()
        paths.cleanup()
