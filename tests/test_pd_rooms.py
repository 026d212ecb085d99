"""SGLang's PD protocol pieces without processes: the room rendezvous (rooms.py), the HTTP side
that turns room-tagged requests into our prefill/decode messages (pd_http.py), and the instance's
scheduler backend that sends them (instance_backend.py)."""
from __future__ import annotations

import pytest

from sglang_duet.disagg import messages as dm
from sglang_duet.disagg.instance_backend import _CURRENT, InstanceBackend, translating
from sglang_duet.disagg.pd_http import BootstrapError, RoomTranslator, parse_bootstrap
from sglang_duet.disagg.rooms import DecodeRooms, PrefillRooms
from sglang_duet.server import io_struct as io


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _offer(room, **kw):
    return dm.KVOffer(room=room, ok=True, first_token=7, seed=3, input_len=4, **kw)


def test_prefill_rooms_meet_in_either_order_and_expire():
    sent, clock = [], Clock()
    rooms = PrefillRooms(lambda ident, o: sent.append((ident, o)), timeout_s=5, clock=clock)
    rooms.offer(_offer(1))  # the prefill ended before the decode asked
    assert sent == []
    rooms.query(b"d1", 1)
    assert sent == [(b"d1", _offer(1))] and not rooms.offers
    rooms.query(b"d2", 2)  # the decode asked first
    assert len(sent) == 1
    rooms.offer(_offer(2))
    assert sent[-1] == (b"d2", _offer(2)) and not rooms.queries
    rooms.offer(_offer(3))
    rooms.query(b"d4", 4)
    clock.t = 5.0
    assert rooms.expire() == [4]  # the waiting decode is told nobody prefilled room 4
    assert sent[-1][0] == b"d4" and not sent[-1][1].ok and sent[-1][1].status == 503
    assert not rooms.offers and not rooms.queries


def _decode_req(rid="r1", room=9, n=4):
    return dm.DecodeReq(rid, list(range(1, n + 1)), {}, 0.0, first_token=-1, first_logprob=None, seed=0, kv=None,
                        bootstrap=dm.Bootstrap("127.0.0.1", 5000, room))


def test_decode_rooms_complete_refuse_and_expire():
    clock = Clock()
    rooms = DecodeRooms(timeout_s=5, clock=clock)
    rooms.wait(_decode_req())
    assert rooms.has_rid("r1")
    msg, why, status = rooms.resolve(_offer(9, cached_tokens=3))
    assert why == "" and msg.first_token == 7 and msg.seed == 3 and msg.bootstrap is None and not rooms.has_rid("r1")
    assert msg.cached_tokens == 3  # the prefill's prefix-cache hit reaches the decode's usage
    assert rooms.resolve(_offer(9)) == (None, "", 0)  # nobody waits any more
    rooms.wait(_decode_req("r2", 10, n=5))
    msg, why, status = rooms.resolve(_offer(10))  # the two instances tokenized differently
    assert status == 400 and "same model" in why and msg.rid == "r2"
    rooms.wait(_decode_req("r3", 11))
    msg, why, status = rooms.resolve(dm.KVOffer(room=11, ok=False, status=400, message="too long"))
    assert (why, status) == ("too long", 400)
    rooms.wait(_decode_req("r4", 12))
    assert rooms.pop_rid("r4").rid == "r4" and rooms.pop_rid("r4") is None
    rooms.wait(_decode_req("r5", 13))
    clock.t = 6
    assert [m.rid for m in rooms.expire()] == ["r5"] and not rooms.waiting


def test_parse_bootstrap():
    assert parse_bootstrap({"text": "x"}, "decode") == []
    body = {"bootstrap_host": "10.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 2**63 + 5}
    assert parse_bootstrap(body, "decode") == [dm.Bootstrap("10.0.0.1", 8998, 2**63 + 5)]
    batch = {"bootstrap_host": ["a", "b"], "bootstrap_port": [1, 2], "bootstrap_room": [3, 4]}
    assert [b.room for b in parse_bootstrap(batch, "prefill")] == [3, 4]
    assert parse_bootstrap({"bootstrap_room": 1}, "prefill") == [dm.Bootstrap("", 0, 1)]  # the prefill needs no address
    with pytest.raises(BootstrapError, match="--disaggregation-bootstrap-port"):
        parse_bootstrap({"bootstrap_host": "h", "bootstrap_port": None, "bootstrap_room": 1}, "decode")
    with pytest.raises(BootstrapError, match="non-negative"):
        parse_bootstrap({"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": "1"}, "decode")
    with pytest.raises(BootstrapError, match="list of 2"):
        parse_bootstrap({"bootstrap_host": ["h"], "bootstrap_port": 1, "bootstrap_room": [1, 2]}, "decode")


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_instance_backend_sends_room_tagged_requests_as_ours(mode):
    """Through the real socket: while a RoomTranslator is in context, the i-th GenerateReq goes out
    as the i-th room's PrefillReq / DecodeReq; without one, or beyond the rooms, as it is; aborts
    follow on the same socket."""
    import zmq

    from sglang_duet.server.ipc import IPCPaths, pull_socket

    paths = IPCPaths.create()
    ctx = zmq.Context()
    sched_in = pull_socket(ctx, paths.scheduler_in)
    backend = InstanceBackend(paths)
    try:
        g = io.GenerateReq(rid="a", input_ids=[1, 2], params={"max_new_tokens": 5}, arrival_time=1.0)
        g2 = io.GenerateReq(rid="b", input_ids=[1, 2], params={}, arrival_time=1.0)
        backend.send_generate([g])  # no rooms in context: untouched
        with translating(RoomTranslator(mode, [dm.Bootstrap("h", 1, 42)])):
            backend.send_generate([g, g2])  # g2 is beyond the rooms given: served whole here
            backend.send_abort("a")
        got = []
        while sched_in.poll(2000):
            got.append(dm.decode_input(sched_in.recv()))
            if len(got) == 4:
                break
    finally:
        backend.close()
        sched_in.close(0)
        ctx.destroy(linger=0)
        paths.cleanup()
    assert _CURRENT.get() is None  # the context ends with the block
    assert got[0] == g and got[2] == g2 and got[3] == io.AbortReq("a")
    m = got[1]
    if mode == "prefill":
        assert isinstance(m, dm.PrefillReq) and m.room == 42 and m.input_ids == [1, 2]
    else:
        assert isinstance(m, dm.DecodeReq) and m.bootstrap == dm.Bootstrap("h", 1, 42) and m.kv is None
        assert m.first_token == -1 and m.params == {"max_new_tokens": 5}


def test_instance_backend_sends_none_when_one_cannot_be_encoded():
    """A batch is all or nothing: an integer beyond 64 bits in the second request sends neither."""
    import zmq

    from sglang_duet.server.ipc import IPCPaths, pull_socket

    paths = IPCPaths.create()
    ctx = zmq.Context()
    sched_in = pull_socket(ctx, paths.scheduler_in)
    backend = InstanceBackend(paths)
    try:
        ok = io.GenerateReq(rid="a", input_ids=[1], params={}, arrival_time=1.0)
        bad = io.GenerateReq(rid="b", input_ids=[1], params={"top_k": 10**30}, arrival_time=1.0)
        with pytest.raises(OverflowError):
            backend.send_generate([ok, bad])
        backend.send_abort("a")
        assert sched_in.poll(2000) and dm.decode_input(sched_in.recv()) == io.AbortReq("a")  # the first message
    finally:
        backend.close()
        sched_in.close(0)
        ctx.destroy(linger=0)
        paths.cleanup()


def test_bootstrap_capture_reads_rooms_and_leaves_big_bodies_alone():
    import asyncio
    import json as _json

    from sglang_duet.disagg.pd_http import BootstrapCapture

    seen = []

    async def app(scope, receive, send):
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        r = _CURRENT.get()
        seen.append((body, [b.room for b in r.items] if r else None))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def call(mw, body: bytes, headers=()):
        chunks = [body[:5], body[5:]]
        sent = []

        async def receive():
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

        async def send(m):
            sent.append(m)

        scope = {"type": "http", "method": "POST", "path": "/generate", "headers": list(headers)}
        await mw(scope, receive, send)
        return sent[0]["status"]

    mw = BootstrapCapture(app, "decode", limit=1000)
    good = _json.dumps({"text": "x", "bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": 7}).encode()
    assert asyncio.run(call(mw, good)) == 200 and seen[-1] == (good, [7])  # the handler reads the same body
    plain = b'{"text": "x"}'
    assert asyncio.run(call(mw, plain)) == 200 and seen[-1] == (plain, None)
    bad = _json.dumps({"text": "x", "bootstrap_room": 7}).encode()  # a decode needs the prefill's address
    assert asyncio.run(call(mw, bad)) == 400 and seen[-1][0] == plain
    big = _json.dumps({"text": "x" * 2000, "bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": 8}).encode()
    assert asyncio.run(call(mw, big, [(b"content-length", str(len(big)).encode())])) == 200
    assert seen[-1] == (big, None)  # over the limit: not inspected, the server's own limit answers


def test_bootstrap_port_is_sglangs_default_and_pd_local_takes_a_free_one():
    from sglang_duet.disagg.local import args_to_argv, bootstrap_port
    from sglang_duet.server.args import parse_args
    from sglang_duet.server_args import ServerArgs

    assert ServerArgs().disaggregation_bootstrap_port == 8998
    assert parse_args(["--disaggregation-mode", "prefill"]).disaggregation_bootstrap_port == 8998
    assert parse_args(["--disaggregation-bootstrap-port", "9100"]).disaggregation_bootstrap_port == 9100
    # pd-local starts its own router: a free port unless another was asked for, passed to the prefill alone
    ports = {bootstrap_port(ServerArgs()), bootstrap_port(ServerArgs(disaggregation_bootstrap_port=0))}
    assert 8998 not in ports and 0 not in ports
    assert bootstrap_port(ServerArgs(disaggregation_bootstrap_port=9100)) == 9100
    assert "--disaggregation-bootstrap-port" not in args_to_argv(ServerArgs(disaggregation_bootstrap_port=9100))


# ---- the instance's real app, with a recording backend instead of the scheduler's socket ------------


class _RecordingInstance:
    """InstanceBackend's translation without its sockets: records what the scheduler would get."""

    message_for = InstanceBackend.message_for

    def __init__(self):
        self.sent = []

    def start(self, tm):
        pass

    def send_generate(self, reqs):
        self.sent += [self.message_for(r) for r in reqs]

    def send_abort(self, rid):
        self.sent.append(io.AbortReq(rid))

    def unavailable(self):
        return None

    def internal_state(self):
        return {}

    def close(self):
        pass


def _instance_app(mode: str):
    from sglang_duet.disagg.instance_api import add_instance_routes
    from sglang_duet.server.http_server import create_app
    from sglang_duet.server.tokenizer_manager import TokenizerManager
    from sglang_duet.server_args import ServerArgs

    args = ServerArgs(disaggregation_mode=mode)
    backend = _RecordingInstance()
    tm = TokenizerManager(args, io.ReadyInfo(status="ready", context_length=4096, vocab_size=1000, kv_slots=10000),
                          backend)
    app = create_app(tm, args)
    add_instance_routes(app, tm, args)
    return app, tm, backend


async def _post_and_answer(app, tm, backend, path: str, body: dict):
    """POST `body`, wait until the scheduler got its message, finish that request with one token."""
    import asyncio

    import httpx

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://instance") as c:
        task = asyncio.create_task(c.post(path, json=body))
        for _ in range(500):
            if backend.sent or task.done():
                break
            await asyncio.sleep(0.01)
        assert backend.sent, (await task).text
        m = backend.sent[0]
        tm._on_outputs(io.BatchStrOut([io.StrOut(m.rid, "x", [7], None, True, {"type": "length"}, 2, 1, 0)]))
        r = await task
    tm.close()
    return m, r


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_a_room_tagged_request_reaches_the_prefill_scheduler_as_a_prefill(path):
    """Through the server's own (fast-path) routes: the bootstrap middleware must see them."""
    import asyncio

    app, tm, backend = _instance_app("prefill")
    body = ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4}} if path == "/generate"
            else {"model": tm.served_model_name, "prompt": [1, 2], "max_tokens": 4})
    m, r = asyncio.run(_post_and_answer(app, tm, backend, path, {**body, "bootstrap_room": 5}))
    assert r.status_code == 200, r.text
    assert isinstance(m, dm.PrefillReq) and m.room == 5 and m.input_ids == [1, 2]


def test_disagg_decode_streams_what_the_decode_scheduler_sends():
    import asyncio

    app, tm, backend = _instance_app("decode")
    body = {"rid": "d1", "input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3}, "first_token": 5, "seed": 9,
            "kv": None, "cached_tokens": 1}
    m, r = asyncio.run(_post_and_answer(app, tm, backend, "/disagg/decode", body))
    assert r.status_code == 200, r.text
    assert isinstance(m, dm.DecodeReq) and (m.rid, m.first_token, m.seed, m.kv) == ("d1", 5, 9, None)
    assert m.cached_tokens == 1  # our router passes the prefill's prefix-cache hit on
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and '"ids":[7]' in events[0] and '"finished":true' in events[0]
