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


# ---- defect 7: repetition_penalty near 0 --------------------------------------------------------


def test_tiny_repetition_penalty_keeps_logprobs_finite():
    import math

    import torch

    from sglang_duet.sampling.sampler import Sampler, SamplingRow
    from sglang_duet.sampling_params import SamplingParams

    torch.manual_seed(0)
    logits = torch.randn(1, 64) * 5
    logits[0, 9], logits[0, 17] = 2.0, 3.0  # seen, positive: the penalty makes them ~1e30
    params = SamplingParams(temperature=0.0, repetition_penalty=1e-300, logprobs=True, top_logprobs=3)
    seen = [3, 9, 17]
    out = Sampler()(logits, [SamplingRow(params, 0, seen, [])])
    lp = out.logprobs[0]
    assert all(math.isfinite(v) for v in [lp["logprob"], *(v for _, v in lp["top"])]), lp
    assert lp["top"][0][0] == out.token_ids[0] == lp["token_id"]
    # a seen token with a positive logit wins: the largest one of them
    positive = [t for t in seen if logits[0, t] > 0]
    assert out.token_ids[0] == max(positive, key=lambda t: logits[0, t].item())


# ---- defect 1: tokenizing and templating off the event loop ------------------------------------


class _BlockingTokenizer:
    """encode() blocks until released; counts calls (the thread it ran on is recorded)."""

    chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.threads = []

    def get_vocab(self):
        return {"a": 0, "bb": 1}

    def encode(self, text, add_special_tokens=True):
        self.threads.append(threading.current_thread().name)
        self.started.set()
        assert self.release.wait(30)
        return [0] * 3

    def apply_chat_template(self, messages, chat_template=None, tokenize=False, add_generation_prompt=True,
                            continue_final_message=False, **kw):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


@pytest.mark.parametrize("what", ["text", "batch", "chat"])
def test_big_input_is_tokenized_off_the_event_loop(what):
    """While a big-but-legal input is being tokenized, other coroutines (e.g. /health) run."""
    from sglang_duet.server.input_processor import INLINE_CHARS, InputProcessor

    tok = _BlockingTokenizer()
    proc = InputProcessor(tok, tok.chat_template, context_length=1_000_000)
    big = "a" * (INLINE_CHARS + 1)
    order = []

    async def work():
        if what == "text":
            await proc.tokenize_async(big)
        elif what == "batch":
            await proc.tokenize_many_async([big[:1000]] * 3)
        else:
            await proc.apply_chat_template_async([{"role": "user", "content": big}])
        order.append("tokenized")

    async def health():
        await asyncio.get_running_loop().run_in_executor(None, tok.started.wait, 30)
        order.append("health")  # ran while encode() was blocked
        tok.release.set()

    async def main():
        await asyncio.gather(work(), health())

    try:
        asyncio.run(main())
    finally:
        tok.release.set()
        proc.close()
    assert order == ["health", "tokenized"]
    assert tok.threads and all(t.startswith("tokenize") for t in tok.threads)


def test_small_input_stays_inline_and_limits_are_checked_before_work():
    from sglang_duet.server.errors import APIError
    from sglang_duet.server.input_processor import MAX_REQUEST_CHARS, InputProcessor

    tok = _BlockingTokenizer()
    tok.release.set()
    proc = InputProcessor(tok, tok.chat_template, context_length=100)
    try:
        assert asyncio.run(proc.tokenize_async("hi")) == [0, 0, 0]
        assert tok.threads == [threading.current_thread().name]
        tok.threads.clear()
        with pytest.raises(APIError) as e:  # the last prompt is too long: nothing is tokenized
            asyncio.run(proc.tokenize_many_async(["hi", "a" * 10_000], "prompt"))
        assert e.value.status == 400 and e.value.param == "prompt" and tok.threads == []
        proc.context_length = 10 ** 9
        with pytest.raises(APIError) as e:
            asyncio.run(proc.tokenize_many_async(["a" * (MAX_REQUEST_CHARS // 4 + 1)] * 4, "prompt"))
        assert e.value.status == 413 and e.value.param == "prompt" and tok.threads == []
    finally:
        proc.close()


# ---- defect 4: chat_template_kwargs that collide with the call's own names -----------------------


@pytest.mark.parametrize("key", ["messages", "self", "conversation", "add_generation_prompt", "tokenize"])
def test_reserved_chat_template_kwargs_are_a_400(key):
    from sglang_duet.server.errors import APIError
    from sglang_duet.server.input_processor import InputProcessor

    tok = _BlockingTokenizer()
    tok.release.set()
    proc = InputProcessor(tok, tok.chat_template, context_length=1000)
    try:
        with pytest.raises(APIError) as e:
            asyncio.run(proc.apply_chat_template_async([{"role": "user", "content": "hi"}], {key: 1}))
        assert e.value.status == 400 and e.value.param == "chat_template_kwargs" and key in e.value.message
        # an ordinary template variable goes through
        assert asyncio.run(proc.apply_chat_template_async([{"role": "user", "content": "hi"}],
                                                          {"enable_thinking": False})) == [0, 0, 0]
    finally:
        proc.close()
