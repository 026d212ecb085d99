"""The main process's admission path, cut for CPU per request: sampling params built once per
distinct dict (and still refused exactly as before), request ids in uuid4's format, the fast
routes' own body reading (split bodies, a client gone mid-upload), and the one disconnect timer
shared by every waiting group. Counts, identities and bytes only."""
from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from sglang_duet.server import io_struct as io
from sglang_duet.server import tokenizer_manager as tmm
from sglang_duet.server.errors import APIError
from sglang_duet.server.http_server import create_app
from sglang_duet.server_args import ServerArgs

from manager_utils import recording_manager




def test_make_params_builds_each_distinct_dict_once_and_refuses_as_before():
    tm = recording_manager()
    a = tm.make_params({"max_new_tokens": 1, "ignore_eos": True})
    assert tm.make_params({"max_new_tokens": 1, "ignore_eos": True}) is a
    assert tm.make_params({"ignore_eos": True, "max_new_tokens": 1}).to_dict() == a.to_dict()
    # equal and equally hashed values of another type are not the cached entry: True is not 1
    with pytest.raises(APIError) as e:
        tm.make_params({"max_new_tokens": True, "ignore_eos": True})
    assert e.value.status == 400 and e.value.message == "max_new_tokens must be an integer, got True."
    assert e.value.param == "max_tokens"
    with pytest.raises(APIError) as e:
        tm.make_params({"max_new_tokens": 1.0, "ignore_eos": True})
    assert e.value.message == "max_new_tokens must be an integer, got 1.0."
    # refused every time (nothing invalid is kept), with the same error
    for _ in range(2):
        with pytest.raises(APIError) as e:
            tm.make_params({"top_p": 2.0})
        assert e.value.message == "top_p must be in (0, 1], got 2.0."
    with pytest.raises(APIError) as e:
        tm.make_params({"bogus": 1})
    assert e.value.param == "sampling_params"
    # lists are not hashable: built each time, equal
    s1, s2 = tm.make_params({"stop": ["x"]}), tm.make_params({"stop": ["x"]})
    assert s1 is not s2 and s1 == s2 and s1.stop == ["x"]
    # the scheduler's copy is a request's own: changing one does not reach the next
    d = a.to_dict()
    d["stop"].append("zzz")
    assert tm.make_params({"max_new_tokens": 1, "ignore_eos": True}).to_dict()["stop"] == []
    # bounded
    for i in range(tmm.PARAMS_CACHE_SIZE + 5):
        tm.make_params({"seed": i})
    assert len(tm._params_cache) <= tmm.PARAMS_CACHE_SIZE


def test_random_id_is_uuid4_hex():
    ids = {tmm.random_id() for _ in range(2000)}
    assert len(ids) == 2000
    for rid in ids:
        u = uuid.UUID(rid)
        assert len(rid) == 32 and u.hex == rid and u.version == 4 and u.variant == uuid.RFC_4122


async def _call(app, messages):
    """Run one HTTP request through the ASGI app: `messages` are what receive() returns in turn."""
    sent, pending = [], list(messages)

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": [], "query_string": b"",
             "root_path": "", "scheme": "http", "server": ("test", 80), "client": ("c", 1)}
    await app(scope, receive, send)
    status = sent[0]["status"]
    return status, orjson.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_fast_route_reads_a_body_sent_in_pieces_and_a_client_gone_mid_upload():
    tm = recording_manager()
    app = create_app(tm, ServerArgs())
    body = orjson.dumps({"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 0}})
    pieces = [body[:5], body[5:20], b"", body[20:]]
    msgs = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]
    status, out = asyncio.run(_call(app, msgs))
    assert status == 200 and out["output_ids"] == [] and out["meta_info"]["prompt_tokens"] == 3
    status, out = asyncio.run(_call(app, msgs[:2] + [{"type": "http.disconnect"}]))
    assert status == 499 and out["error"]["message"] == "Client disconnected."
    status, out = asyncio.run(_call(app, [{"type": "http.request", "body": b"{nope", "more_body": False}]))
    assert status == 400 and out["error"]["message"].startswith("Malformed JSON body")
    assert tm.counts["submitted"] == 1 and tm.states == {}


class _Client:
    def __init__(self):
        self.gone, self.asked = False, 0

    async def is_disconnected(self):
        self.asked += 1
        return self.gone


def test_waiting_groups_share_one_disconnect_timer(monkeypatch):
    """Groups waiting for news are woken by the manager's tick and check their clients; a client
    that left ends its wait with 499; the tick stops once nobody waits."""
    monkeypatch.setattr(tmm, "DISCONNECT_CHECK_S", 0.01)

    async def main():
        tm = recording_manager()
        clients = [_Client() for _ in range(3)]
        p = tm.make_params({"max_new_tokens": 4})
        groups = [tm.submit([(f"r{i}", [1, 2], p)], clients[i]) for i in range(3)]
        tasks = [asyncio.ensure_future(g.next()) for g in groups]
        while not all(c.asked for c in clients):
            await asyncio.sleep(0.005)
        assert len(tm._watched) == 3 and tm._ticking
        clients[1].gone = True
        with pytest.raises(APIError) as e:
            await tasks[1]
        assert e.value.status == 499
        groups[1].close()
        tm._on_outputs(io.BatchStrOut([io.StrOut("r0", "a", [7], None, True, {"type": "length"}, 2, 1, 0)]))
        assert (await tasks[0])[0][1].ids == [7]
        assert not tasks[2].done() and tm._watched == {groups[2]}
        tasks[2].cancel()
        await asyncio.gather(tasks[2], return_exceptions=True)
        groups[0].close()
        groups[2].close()
        assert tm._watched == set()
        await asyncio.sleep(0.05)
        return tm

    tm = asyncio.run(main())
    assert not tm._ticking and tm.backend.aborts == ["r1", "r2"] and tm.counts["aborted"] == 2


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_check_fields_names_the_first_bad_sglang_field_in_its_table_order(route):
    """check_fields looks only at the SGLang fields a body holds, in _SGLANG_FIELDS' order: the
    error names the same field whatever order the body lists them in."""
    from sglang_duet.server import openai_protocol as proto

    base = {"prompt": "x"} if route == "completions" else {"messages": [{"role": "user", "content": "x"}]}
    order = list(proto._SGLANG_FIELDS[route])
    assert order.index("return_hidden_states") < order.index("lora_path")
    assert order.index("rid") < order.index("lora_path")
    for bad in ({"lora_path": "a", "return_hidden_states": True}, {"return_hidden_states": True, "lora_path": "a"}):
        with pytest.raises(APIError) as e:
            proto.check_fields({**base, **bad}, route)
        assert e.value.param == "return_hidden_states" and e.value.message.endswith("not supported by this server.")
    with pytest.raises(APIError) as e:
        proto.check_fields({**base, "lora_path": "a", "rid": 5}, route)
    assert e.value.param == "rid"
    proto.check_fields({**base, "lora_path": None, "return_hidden_states": False, "rid": "r"}, route)  # accepted
    with pytest.raises(APIError) as e:
        proto.check_fields({**base, "zzz": 1, "functions": []}, route)
    names = "zzz" if route == "chat" else "zzz, functions"
    assert e.value.message == f"Unrecognized request argument{'s' if route != 'chat' else ''} supplied: {names}"
