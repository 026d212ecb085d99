"""The tokenizer manager's SchedulerBackend boundary (server/scheduler_backend.py): the manager hands
its backend message structs, never bytes; a batch is all or nothing; aborts, flushes, outages and
outputs go through the backend alone. No processes: a recording backend stands in."""
from __future__ import annotations

import asyncio

import pytest

from sglang_duet.sampling_params import SamplingParams
from sglang_duet.server import io_struct as io
from sglang_duet.server.errors import APIError
from sglang_duet.server.scheduler_backend import SchedulerBackend
from sglang_duet.server.tokenizer_manager import TokenizerManager
from sglang_duet.server_args import ServerArgs

INFO = io.ReadyInfo(status="ready", context_length=4096, vocab_size=1000, kv_slots=100000)


class Recording(SchedulerBackend):
    def __init__(self):
        self.sent: list = []
        self.down: str | None = None
        self.tm = None

    def start(self, tm) -> None:
        self.tm = tm

    def send_generate(self, reqs) -> None:
        if any((r.params.get("top_k") or 0) > 2**63 for r in reqs):
            raise OverflowError  # as msgpack would, before anything is sent
        self.sent += reqs

    def send_abort(self, rid: str) -> None:
        self.sent.append(("abort", rid))

    def send_flush_cache(self) -> None:
        self.sent.append("flush")

    def unavailable(self) -> str | None:
        return self.down

    def internal_state(self) -> dict:
        return {"backend": "recording"}


def _params(**kw) -> SamplingParams:
    return SamplingParams(**kw)


def test_manager_sends_structs_through_its_backend():
    backend = Recording()

    async def run():
        tm = TokenizerManager(ServerArgs(), INFO, backend)
        tm.start()
        assert backend.tm is tm
        group = tm.submit([("a", [1, 2], _params(max_new_tokens=3)), ("b", [3], _params(max_new_tokens=0))])
        # the empty completion (max_new_tokens=0) never reaches the backend
        assert [type(m) for m in backend.sent] == [io.GenerateReq]
        g = backend.sent[0]
        assert (g.rid, g.input_ids, g.params["max_new_tokens"]) == ("a", [1, 2], 3)
        # outputs come back through the manager's sink
        tm._on_outputs(io.BatchStrOut([io.StrOut("a", "hi", [5], None, True, {"type": "length"}, 2, 1, 0)]))
        got = {}
        while (batch := await group.next()) is not None:
            for i, d in batch:
                got[i] = (d.text, d.finished)
        group.close()
        assert got == {0: ("hi", True), 1: ("", True)}
        # a running request the client leaves is aborted through the backend; a finished one is not
        g2 = tm.submit([("c", [1], _params(max_new_tokens=3))])
        g2.close()
        assert backend.sent[-1] == ("abort", "c")
        tm.fail_request("c", APIError(500, "late"))  # after the abort: nobody listens, nothing breaks
        assert tm.flush_cache() and backend.sent[-1] == "flush"
        assert tm.internal_state()["backend"] == "recording"
        tm.close()

    asyncio.run(run())


def test_a_batch_with_an_unencodable_request_sends_none():
    backend = Recording()
    tm = TokenizerManager(ServerArgs(), INFO, backend)
    with pytest.raises(APIError) as e:
        tm.submit([("a", [1], _params(max_new_tokens=3)), ("b", [1], _params(max_new_tokens=3, top_k=2**64))])
    assert e.value.status == 400 and "out of range" in e.value.message
    assert backend.sent == [] and tm.states == {}  # nothing sent, nothing left behind
    tm.close()


def test_backend_outage_is_the_servers_503_and_aborts_still_reach_it():
    backend = Recording()

    async def run():
        tm = TokenizerManager(ServerArgs(), INFO, backend)
        tm.start()
        group = tm.submit([("a", [1], _params(max_new_tokens=3))])
        backend.down = "No decode instance is reachable."
        assert tm.dead == "No decode instance is reachable."
        with pytest.raises(APIError) as e:
            tm.submit([("b", [1], _params(max_new_tokens=3))])
        assert e.value.status == 503
        group.close()
        assert backend.sent[-1] == ("abort", "a")  # an outage is not a dead pipeline: the abort goes out
        backend.down = None
        assert tm.dead is None
        group = tm.submit([("c", [1], _params(max_new_tokens=3))])
        tm.dead = "The scheduler process died."  # a dead pipeline: nothing more is sent
        n = len(backend.sent)
        assert tm.abort_request(abort_all=True) == ["c"]
        group.close()
        assert len(backend.sent) == n and tm.dead == "The scheduler process died."
        tm.close()

    asyncio.run(run())
