"""The main process's cheap paths (issue #14): direct Rust tokenization, SSEStream, the fast routes."""
from __future__ import annotations

import asyncio
import copy

import orjson
import pytest

from sglang_duet.server.errors import APIError
from sglang_duet.server.sse import DONE, SSEStream, sse


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sglang_duet.model_loader.embedded import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


TEXTS = ["Hello there, tell me a story about a cat.", "  leading and trailing  ", "tabs\tand\nnewlines\n\n",
         "digits 3.14159 and 2026-11-30", "ünïcödé ✓ 中文 😀", "<|im_start|>system\nYou are nice<|im_end|>\n",
         "a" * 3000, ""]


def test_fast_encoder_is_the_rust_call_and_gives_transformers_ids(tokenizer):
    from sglang_duet.server.input_processor import fast_encoder

    enc = fast_encoder(tokenizer)
    assert enc.__name__ == "fast"  # the embedded SmolLM2 tokenizer qualifies
    for text in TEXTS:
        for special in (True, False):
            assert enc(text, special) == tokenizer.encode(text, add_special_tokens=special), (text, special)


def test_fast_encoder_falls_back_when_the_rust_tokenizer_would_truncate(tokenizer):
    from sglang_duet.server.input_processor import fast_encoder

    tok = copy.deepcopy(tokenizer)
    tok._tokenizer.enable_truncation(max_length=4)  # transformers resets this per call; a direct call would not
    enc = fast_encoder(tok)
    assert enc.__name__ == "slow"
    assert enc(TEXTS[0]) == tokenizer.encode(TEXTS[0])  # all of it, not 4 tokens


def test_fast_encoder_uses_encode_of_other_tokenizers():
    from sglang_duet.server.input_processor import fast_encoder

    class Plain:
        def encode(self, text, add_special_tokens=True):
            return [len(text), int(add_special_tokens)]

    enc = fast_encoder(Plain())
    assert enc("abc", False) == [3, 0]


# ---- SSEStream ------------------------------------------------------------------------------------


class _Delta:
    def __init__(self, text, finished=False):
        self.text, self.finished = text, finished


class _Group:
    """A RequestGroup stand-in: next() returns the scripted batches (an exception is raised)."""

    def __init__(self, batches, n=1):
        self.states = [None] * n
        self.batches = list(batches)
        self.closed = 0
        self.request = object()
        self.gate = asyncio.Event()
        self.gate.set()

    async def next(self):
        await self.gate.wait()
        b = self.batches.pop(0)
        if isinstance(b, Exception):
            raise b
        return b

    def close(self):
        self.closed += 1


def _render(batch):
    for i, d in batch:
        yield sse({"i": i, "text": d.text})


async def _serve(stream, *, disconnect: asyncio.Event | None = None):
    sent = []

    async def send(msg):
        sent.append(msg)

    async def receive():
        await (disconnect.wait() if disconnect is not None else asyncio.Event().wait())
        return {"type": "http.disconnect"}

    await stream(scope={"type": "http"}, receive=receive, send=send)
    return sent


def test_sse_stream_writes_events_and_ends_with_done_in_the_last_write():
    async def main():
        from sglang_duet.server.sse import start_stream

        group = _Group([[(0, _Delta("a"))], [(1, _Delta("b", True))], [(0, _Delta("c", True))]], n=2)
        stream = await start_stream(group, _render, lambda: [b"tail\n"])
        assert group.request is None  # the response watches for the disconnect from here on
        return group, await _serve(stream)

    group, sent = asyncio.run(main())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    bodies = [(m["body"], m["more_body"]) for m in sent[1:]]
    assert bodies == [(sse({"i": 0, "text": "a"}), True), (sse({"i": 1, "text": "b"}), True),
                      (sse({"i": 0, "text": "c"}) + b"tail\n" + DONE, False)]
    assert group.closed == 1


def test_sse_stream_error_becomes_an_error_event_then_done():
    async def main():
        group = _Group([APIError(503, "scheduler died")])
        return group, await _serve(SSEStream(group, [(0, _Delta("x"))], _render, lambda: ()))

    group, sent = asyncio.run(main())
    assert sent[-1]["more_body"] is False
    assert sent[-1]["body"] == sse(APIError(503, "scheduler died").body()) + DONE
    assert sent[1]["body"] == sse({"i": 0, "text": "x"})
    assert group.closed == 1


def test_sse_stream_client_gone_closes_the_group_and_returns_quietly():
    async def main():
        group = _Group([[(0, _Delta("never"))]])
        group.gate.clear()  # the next output never comes
        gone = asyncio.Event()
        stream = SSEStream(group, [(0, _Delta("first"))], _render, lambda: ())
        task = asyncio.ensure_future(_serve(stream, disconnect=gone))
        await asyncio.sleep(0.01)
        assert not task.done() and group.closed == 0
        gone.set()
        sent = await asyncio.wait_for(task, 5)  # not cancelled: the response ends normally
        return group, stream, sent

    group, stream, sent = asyncio.run(main())
    assert stream.client_gone and group.closed == 1
    assert [m.get("more_body") for m in sent] == [None, True]  # start, the first event, no end


def test_sse_stream_cancelled_from_outside_still_cancels():
    async def main():
        group = _Group([])
        group.gate.clear()
        task = asyncio.ensure_future(_serve(SSEStream(group, [(0, _Delta("a"))], _render, lambda: ())))
        await asyncio.sleep(0.01)
        task.cancel()  # e.g. the server's shutdown: not ours to swallow
        with pytest.raises(asyncio.CancelledError):
            await task
        return group

    assert asyncio.run(main()).closed == 1


# ---- /generate's cumulative events ------------------------------------------------------------------


@pytest.mark.parametrize("index", [None, 3])
def test_cumulative_event_bytes_equal_encoding_the_whole_output(index):
    from sglang_duet.server.native_api import _CumulativeEvent

    class D:
        def __init__(self, text, ids):
            self.text, self.ids = text, ids

    deltas = [D("", []), D("Hello", [1]), D(' "quoted"\\ ', [22, 333]), D("", [4]), D("\n\tctrl\x01 ü 日本 😀", [5]),
              D("</script>\u2028", [])]
    ev, text, ids = _CumulativeEvent("r"), "", []
    for k, d in enumerate(deltas):
        ev.add(d)
        text += d.text
        ids += d.ids
        meta = {"id": "r", "completion_tokens": len(ids), "finish_reason": {"type": "length"} if k == 5 else None}
        want = {"text": text, "output_ids": ids, "meta_info": meta}
        if index is not None:
            want["index"] = index
        assert ev.render(orjson.dumps(meta), index) == sse(want)


@pytest.mark.parametrize("rid", ["r", 'q"u\\ote ü 😀'])
def test_running_meta_bytes_equal_encoding_the_dict(rid):
    """/generate's running events build meta_info's bytes from a template: the same bytes as
    orjson.dumps of the dict the handler builds for a finished one, latencies of every magnitude."""
    from sglang_duet.server.native_api import _CumulativeEvent

    ev = _CumulativeEvent(rid)
    for pt, ct, cached, lat in [(16, 1, 0, 0.0123), (1, 4000, 15, 3.4e-06), (70000, 2**40, 0, 1234.5), (3, 2, 1, 0.0),
                                (5, 6, 7, 1e-300), (5, 6, 7, 12345678912.125)]:
        want = {"id": rid, "finish_reason": None, "prompt_tokens": pt, "completion_tokens": ct, "cached_tokens": cached,
                "e2e_latency": lat}
        assert ev.running_meta(pt, ct, cached, lat) == orjson.dumps(want)


def test_sse_stream_is_returned_as_is_by_a_fastapi_route():
    """FastAPI JSON-encodes what a route returns unless it is a Response (a PD instance's route
    returned the stream and answered HTTP 500 until it was wrapped)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.post("/s")
    async def s():
        return SSEStream(_Group([]), [(0, _Delta("hi", True))], _render, lambda: ())

    r = TestClient(app).post("/s")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.content == sse({"i": 0, "text": "hi"}) + DONE


# ---- token id checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [0, 1000])
def test_check_ids_fast_path_accepts_and_refuses_exactly_what_the_loop_does(vocab):
    import types
    from typing import Annotated

    import msgspec

    from sglang_duet.server.tokenizer_manager import TokenizerManager

    ids_type = list[Annotated[int, msgspec.Meta(ge=0, lt=vocab)]] if vocab else None
    fast = types.SimpleNamespace(vocab_size=vocab, _ids_type=ids_type)
    loop = types.SimpleNamespace(vocab_size=vocab, _ids_type=None)
    cases = [[], [0], [1, 2, 999], [1, True], [1, 2.0], [1, -1], [1, 1000], [1, 10 ** 30], [1, "2"], [None]]
    for ids in cases:
        outcomes = []
        for tm in (fast, loop):
            try:
                TokenizerManager.check_ids(tm, ids)
                outcomes.append(None)
            except APIError as e:
                outcomes.append((e.status, e.message, e.param))
        assert outcomes[0] == outcomes[1], ids
    with pytest.raises(APIError, match="outside the vocabulary"):
        TokenizerManager.check_ids(fast, [1, 10 ** 30])


def test_sampling_params_to_dict_is_asdict_without_sharing_lists():
    from dataclasses import asdict

    from sglang_duet.sampling_params import SamplingParams

    for d in ({}, {"stop": ["a", "bc"], "stop_token_ids": [3, 4], "temperature": 0.5, "seed": 7},
              {"json_schema": '{"type": "object"}', "logprobs": True, "top_logprobs": 2, "max_new_tokens": None}):
        p = SamplingParams.from_dict(d)
        got = p.to_dict()
        assert got == asdict(p) and list(got) == list(asdict(p))
        got["stop"].append("changed")
        assert "changed" not in p.stop


# ---- the scheduler backend's sends --------------------------------------------------------------


def test_zmq_backend_sends_once_per_loop_iteration_in_order():
    """Messages queued in one event-loop iteration go out together at its end, generate and abort
    in the order they were made; before start() they go out at once."""
    import zmq

    from sglang_duet.server import io_struct as io
    from sglang_duet.server.ipc import IPCPaths, pull_socket
    from sglang_duet.server.scheduler_backend import ZmqSchedulerBackend

    paths = IPCPaths.create()
    ctx = zmq.Context(1)
    sched = pull_socket(ctx, paths.scheduler_in)
    backend = ZmqSchedulerBackend(paths)

    def received(timeout_ms=2000):
        out = []
        while sched.poll(timeout_ms if not out else 50):
            out.append(io.decode(sched.recv()))
        return out

    class TM:
        def _handle_message(self, data):
            pass

    try:
        backend.send_abort("early")  # not started: at once
        assert [m.rid for m in received()] == ["early"]

        async def main():
            backend.start(TM())
            backend.send_generate([io.GenerateReq("a", [1], {}, 0.0), io.GenerateReq("b", [2], {}, 0.0)])
            backend.send_abort("a")
            backend.send_flush_cache()
            assert not sched.poll(50)  # still queued: this iteration has not ended
            await asyncio.sleep(0)
            got = received()
            backend.send_abort("b")  # a later iteration: its own flush
            await asyncio.sleep(0)
            return got + received()

        got = asyncio.run(main())
        assert [(type(m).__name__, getattr(m, "rid", None)) for m in got] == [
            ("GenerateReq", "a"), ("GenerateReq", "b"), ("AbortReq", "a"), ("FlushCacheReq", None), ("AbortReq", "b")]
    finally:
        backend._loop = None
        backend.close()
        sched.close(linger=0)
        ctx.term()
        paths.cleanup()


def test_scheduler_sends_what_a_drain_admits_after_the_drain_in_order():
    """The scheduler process queues the DetokRegister / ReqError of each request it admits from
    one drain and sends them, in order, when the drain ends (one ZMQ wake-up, not one each)."""
    import os
    import time

    import zmq

    from sglang_duet.server import io_struct as io
    from sglang_duet.server.args import parse_args
    from sglang_duet.server.ipc import IPCPaths, push_socket
    from sglang_duet.server.scheduler_proc import SchedulerProcess

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "models", "smollm2-135m.json")
    args = parse_args(["--executor", "emulated", "--emulated-step-ms", "10", "--model-config", config,
                       "--max-total-tokens", "8192", "--log-level", "warning"])
    paths = IPCPaths.create()
    ctx = zmq.Context(1)
    sched = SchedulerProcess(args, paths)
    events = []
    sched.send = type("Sink", (), {"send": staticmethod(lambda data: events.append(("send", io.decode(data))))})()
    handle = sched._handle
    sched._handle = lambda msg: (events.append(("handle", msg.rid)), handle(msg))
    main = push_socket(ctx, paths.scheduler_in)
    try:
        for rid, ids in (("a", [5, 6, 7]), ("bad", []), ("c", [8, 9])):
            main.send(io.encode(io.GenerateReq(rid, ids, {"max_new_tokens": 2}, time.monotonic())))
        time.sleep(0.2)  # usually all three arrive before the first drain; the check holds per drain anyway
        deadline = time.monotonic() + 10
        n = 0
        while n < 3 and time.monotonic() < deadline:
            if sched.poller.poll(100):
                n += sched._drain_input()
                events.append(("end", None))
        assert n == 3
        drains, cur = [], []
        for k, m in events:
            if k == "end":
                drains.append(cur)
                cur = []
            else:
                cur.append(k)
        for kinds in drains:  # within a drain: every request handled before anything is sent
            assert kinds == sorted(kinds, key=lambda k: k != "handle") and kinds.count("handle") == kinds.count("send")
        sent = [m for k, m in events if k == "send"]
        assert [(type(m).__name__, m.rid) for m in sent] == [("DetokRegister", "a"), ("ReqError", "bad"),
                                                             ("DetokRegister", "c")]
        sched._push(io.ReqError("later", "x"))  # outside a drain: at once
        assert events[-1][1].rid == "later"
    finally:
        main.close(linger=0)
        sched.close()
        ctx.term()
        paths.cleanup()


@pytest.mark.parametrize("with_usage", [False, True])
def test_chunk_encoder_bytes_equal_encoding_the_dict(with_usage):
    """OpenAI stream chunks keep their head's JSON: the same bytes as encoding the whole chunk."""
    from sglang_duet.server.openai_api import ChunkEncoder

    head = {"id": 'chatcmpl-"x"ü', "object": "chat.completion.chunk", "created": 1764500000, "model": "m/ü 😀"}
    enc = ChunkEncoder(head, with_usage)
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    for choices in ([], [{"index": 0, "delta": {"content": 'a "b"\n'}, "logprobs": None, "finish_reason": None}],
                    [{"index": 1, "delta": {}, "finish_reason": "stop", "matched_stop": 2}]):
        want = {**head, "choices": choices}
        if with_usage:
            want["usage"] = None
        assert enc(choices) == sse(want)
        if with_usage:
            assert enc(choices, usage) == sse({**head, "choices": choices, "usage": usage})
