"""Streams whose running events are written from the receive loop (RequestGroup.push_to, SSEStream._push,
sse.direct_writer): the client gets the same events as through the handler's task, in the same
order; outputs the writer cannot take now, and the final one, still go through the task; uvicorn's
httptools send is recognised and its connection written to directly. Counts and bytes only."""
from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from sglang_duet.server import io_struct as io
from sglang_duet.server import tokenizer_manager as tmm
from sglang_duet.server.native_api import NativeServing
from sglang_duet.server.openai_api import OpenAIServing
from sglang_duet.server.sse import UvicornWriter, direct_writer

from manager_utils import recording_manager
from server_utils import free_port



class _Writer:
    """A direct writer stand-in: records what it writes into the same log as the ASGI send."""

    def __init__(self, log):
        self.log, self.ready_now, self.aborted = log, True, asyncio.Event()

    def ready(self):
        return self.ready_now

    def write(self, body):
        self.log.append(("push", body))

    def abort(self):
        self.aborted.set()



class _Client:
    async def is_disconnected(self):
        return False


BODIES = {
    "generate": lambda: {"input_ids": [5, 6, 7], "stream": True, "sampling_params": {"max_new_tokens": 50}},
    "completions": lambda: {"prompt": [5, 6, 7], "stream": True, "max_tokens": 50,
                            "stream_options": {"include_usage": True}},
    "chat": lambda: {"messages": [{"role": "user", "content": "x"}], "input_ids": [5, 6, 7], "stream": True,
                     "max_tokens": 50, "stream_options": {"include_usage": True}},
}


async def _open(tm, kind, log, writer):
    """Start one streaming request through the real handler; returns (task, rid, stream)."""
    body = BODIES[kind]()
    if kind == "generate":
        coro = NativeServing(tm).generate(_Client(), body)
    else:
        serving = OpenAIServing(tm, None)
        coro = (serving.completions if kind == "completions" else serving.chat)(_Client(), body)
    task = asyncio.ensure_future(coro)
    await _settle()
    rid = tm.backend.reqs[-1].rid
    gone = asyncio.Event()

    async def send(msg):
        if msg.get("body"):
            log.append(("send", msg["body"]))

    async def receive():
        await gone.wait()
        return {"type": "http.disconnect"}

    if writer is not None:
        send.sse_writer = writer
        writer.gone = gone
    return task, rid, send, receive


async def _settle(rounds: int = 6):
    for _ in range(rounds):
        await asyncio.sleep(0)


def _out(rid, k, last=False):
    return io.StrOut(rid, f"t{k} ", [100 + k], None, last, {"type": "length", "length": k + 1} if last else None,
                     3, k + 1, 0)


def _events(log) -> list:
    """The SSE events of a log, ids, timestamps and latencies removed (they differ run to run)."""
    out = []
    for _, body in log:
        for line in body.split(b"\n\n"):
            if not line:
                continue
            assert line.startswith(b"data: ")
            data = line[6:]
            if data == b"[DONE]":
                out.append("[DONE]")
                continue
            ev = orjson.loads(data)
            for key in ("id", "created"):
                ev.pop(key, None)
            ev.get("meta_info", {}).pop("id", None)
            ev.get("meta_info", {}).pop("e2e_latency", None)
            out.append(ev)
    return out


def _run(kind, schedule, push: bool, not_ready=(), together=()):
    """schedule: one list of outputs (by step number) per message; the last message ends the request.
    not_ready: messages whose outputs the writer cannot take; together: messages that arrive in the
    same event-loop iteration as the next one. Returns (log, events pushed, manager)."""

    async def main():
        tm = recording_manager()
        log = []
        writer = _Writer(log) if push else None
        task, rid, send, receive = await _open(tm, kind, log, writer)
        tm._on_outputs(io.BatchStrOut([_out(rid, 0)]))  # the first output: the response starts with it
        response = await task
        serve = asyncio.ensure_future(response({"type": "http"}, receive, send))
        await _settle()
        last = max(k for msg in schedule for k in msg)
        for m, msg in enumerate(schedule):
            if writer is not None:
                writer.ready_now = m not in not_ready
            tm._on_outputs(io.BatchStrOut([_out(rid, k, k == last) for k in msg]))
            if m not in together:
                await _settle()
        await asyncio.wait_for(serve, 5)
        return log, tm.pushed, tm

    return asyncio.run(main())


@pytest.mark.parametrize("kind", ["generate", "completions", "chat"])
def test_pushed_events_equal_the_tasks(kind):
    schedule = [[1], [2], [3], [4], [5]]
    task_log, task_pushed, _ = _run(kind, schedule, push=False)
    push_log, pushed, tm = _run(kind, schedule, push=True)
    assert task_pushed == 0 and all(how == "send" for how, _ in task_log)
    assert _events(push_log) == _events(task_log)
    # steps 1-4 written by the receive loop; the first and the final (with [DONE]) by the task
    assert pushed == 4 and [how for how, _ in push_log][-5:] == ["push"] * 4 + ["send"]
    assert _events(push_log)[-1] == "[DONE]"
    assert tm.states == {} and tm.counts["finished"] == 1


def test_declined_outputs_wait_for_the_task_in_order():
    """While the writer cannot take a chunk, the outputs go to the task, and pushing resumes after."""
    log, pushed, _ = _run("generate", [[1], [2, 3], [4], [5], [6]], push=True, not_ready={1})
    ev = _events(log)
    assert [e["output_ids"] for e in ev[:-1]] == [list(range(100, 100 + k)) for k in (1, 2, 4, 5, 6, 7)]
    assert ev[-2]["text"] == "".join(f"t{k} " for k in range(7))
    # step 1 pushed, steps 2+3 by the task, steps 4 and 5 pushed, the final by the task
    assert pushed == 3 and [how for how, _ in log] == ["send", "push", "send", "push", "push", "send"]


def test_outputs_received_together_are_one_pushed_event():
    """A request twice in one message, or in two messages handled in one event-loop iteration (the
    main process behind): one event, one write."""
    log, pushed, _ = _run("generate", [[1, 2], [3], [4], [5]], push=True, together={1})
    ev = _events(log)
    assert [e["output_ids"] for e in ev[:-1]] == [list(range(100, 100 + k)) for k in (1, 3, 5, 6)]
    assert pushed == 2 and [how for how, _ in log] == ["send", "push", "push", "send"]
    # the same through the task: the same events
    task_log, task_pushed, _ = _run("generate", [[1, 2], [3], [4], [5]], push=False, together={1})
    assert task_pushed == 0 and _events(task_log) == ev


def test_multi_request_groups_are_not_pushed():
    async def main():
        tm = recording_manager()
        group = tm.submit([("a", [1, 2], tmm.SamplingParams(max_new_tokens=4)),
                           ("b", [1, 2], tmm.SamplingParams(max_new_tokens=4))])
        assert not group.push_to(lambda batch: True)
        tm._on_outputs(io.BatchStrOut([_out("a", 0), _out("b", 0)]))
        assert [i for i, _ in await group.next()] == [0, 1] and tm.pushed == 0
        group.close()

    asyncio.run(main())


def test_a_failing_render_closes_the_connection_and_aborts():
    async def main():
        tm = recording_manager()
        log = []
        writer = _Writer(log)
        task, rid, send, receive = await _open(tm, "generate", log, writer)
        tm._on_outputs(io.BatchStrOut([_out(rid, 0)]))
        response = await task

        good, calls = response.render, []

        def bad_render(batch):  # the first event renders; the next one (pushed) fails
            calls.append(batch)
            if len(calls) > 1:
                raise RuntimeError("bug")
            return good(batch)

        response.render = bad_render
        serve = asyncio.ensure_future(response({"type": "http"}, receive, send))
        await _settle()
        tm._on_outputs(io.BatchStrOut([io.StrOut(rid, "x", [1], None, False, None, 3, 2, 0)]))
        await _settle(1)  # the push
        assert writer.aborted.is_set() and tm.pushed == 1
        writer.gone.set()  # the closed connection's disconnect
        await asyncio.wait_for(serve, 5)
        return tm, rid

    tm, rid = asyncio.run(main())
    assert tm.backend.aborts == [rid] and tm.counts["aborted"] == 1 and tm.states == {}


def test_uvicorn_httptools_send_is_written_to_directly():
    """The real uvicorn (httptools): direct_writer recognises its send, and chunks written through it
    reach the client as the body, between the ones its send wrote."""
    found = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        w = direct_writer(send)
        found.append((type(w), w.ready() if w else None, direct_writer(lambda m: send(m))))
        await send({"type": "http.response.body", "body": b"one,", "more_body": True})
        w.write(b"two,")
        w.write(b"three,")
        await send({"type": "http.response.body", "body": b"four", "more_body": False})

    r, = _on_real_uvicorn(app, [("/", {})])
    assert r.status_code == 200 and r.content == b"one,two,three,four"
    assert r.headers["transfer-encoding"] == "chunked"
    assert found == [(UvicornWriter, True, None)]  # a wrapped send is not written to directly


def _on_real_uvicorn(app, posts: list[tuple[str, dict]]) -> list[httpx.Response]:
    """Serve `app` on uvicorn with httptools (the server's own stack) on a free port, POST each
    (path, headers) in order, stop it and return the responses."""
    import uvicorn

    port = free_port()

    async def main():
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http="httptools", loop="asyncio",
                                               lifespan="off", log_level="warning"))
        serving = asyncio.ensure_future(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient() as c:
            out = [await c.post(f"http://127.0.0.1:{port}{path}", headers=headers) for path, headers in posts]
        server.should_exit = True
        await serving
        return out

    return asyncio.run(main())


class _Group:
    """A RequestGroup stand-in of one request whose batches are given up front."""

    def __init__(self, batches):
        self.states, self.batches, self.closed = [None], list(batches), 0

    def push_to(self, sink):
        return True

    async def next(self):
        return self.batches.pop(0) if self.batches else None

    def close(self):
        self.closed += 1


class _CountingTransport:
    """uvicorn's transport, each write counted."""

    def __init__(self, transport):
        self.transport, self.writes = transport, []

    def write(self, data):
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name):
        return getattr(self.transport, name)


def _delta(text, finished):
    return tmm.Delta(text, [1], [], finished, {"type": "stop"} if finished else None, 3, 1, 0)


@pytest.mark.parametrize("close", [False, True])
def test_uvicorn_response_head_and_first_chunk_are_one_write(close):
    """The real uvicorn (httptools): an SSEStream's head leaves with its first chunk in one write (a
    one-event stream: head, event, [DONE] and the chunked end); later chunks are a write each; the
    client gets the same headers and body; `Connection: close` still closes after the body."""
    from sglang_duet.server.sse import SSEStream

    first_final = [[(0, _delta("a", True))]]
    three = [[(0, _delta("a", False))], [(0, _delta("b", False))], [(0, _delta("c", True))]]
    runs = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        batches = first_final if scope["path"] == "/one" else three
        group = _Group(batches[1:])
        counting = _CountingTransport(send.__self__.transport)
        send.__self__.transport = counting
        response = SSEStream(group, batches[0], lambda b: [b"data: %s\n\n" % d.text.encode() for _, d in b],
                             lambda: [b"data: tail\n\n"])
        await response(scope, receive, send)
        runs.append((counting.writes, group.closed))

    headers = {"connection": "close"} if close else {}
    one, many = _on_real_uvicorn(app, [("/one", headers), ("/many", headers)])
    for r in (one, many):
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert r.headers["transfer-encoding"] == "chunked" and r.headers["cache-control"] == "no-cache"
        assert (r.headers.get("connection") == "close") == close
    assert one.content == b"data: a\n\ndata: tail\n\ndata: [DONE]\n\n"
    assert many.content == b"data: a\n\ndata: b\n\ndata: c\n\ndata: tail\n\ndata: [DONE]\n\n"
    (w_one, closed_one), (w_many, closed_many) = runs
    assert len(w_one) == 1 and w_one[0].startswith(b"HTTP/1.1 200 OK\r\n") and w_one[0].endswith(b"\r\n0\r\n\r\n")
    assert len(w_many) == 3 and w_many[0].startswith(b"HTTP/1.1 200") and w_many[0].endswith(b"data: a\n\n\r\n")
    assert closed_one == closed_many == 1
