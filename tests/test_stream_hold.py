"""--stream-interval's hold-back shared by the core and the scheduler process (issue #14).

With an interval the core builds no update for a running request's one token between two sends
(`SchedulerCore.stream_hold`), and the scheduler process reads the held tokens from the request's
output_ids when it sends. Checked on the real SchedulerProcess (core, policy, the emulated device on
a virtual clock), by equality and counts: the BatchTokenOut messages are exactly those of the same
run with the core building every update, fewer updates are built, nothing is left behind, and the
KV pool ends as it began (an abort midway, a stop string, logprobs, a late arrival included).
"""
from __future__ import annotations

import os

import pytest

from sglang_duet.server import io_struct as io
from sglang_duet.server.args import parse_args
from sglang_duet.server.ipc import IPCPaths
from sglang_duet.server.scheduler_proc import SchedulerProcess
from sglang_duet.sampling_params import SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CONFIG = os.path.join(REPO, "configs", "models", "smollm2-135m.json")

# rid -> (max_new_tokens, extra params, step it arrives at)
REQUESTS = {
    "one": (1, {}, 0),
    "long": (20, {}, 0),
    "lps": (17, {"logprobs": True}, 0),
    "aborted": (30, {}, 0),
    "short": (9, {}, 0),
    "stop": (40, {"stop": ["e"]}, 0),
    "late": (25, {}, 3),
    "late-lps": (12, {"logprobs": True, "top_logprobs": 2}, 5),
}
ABORT = ("aborted", 6)  # (rid, step)


def _run(interval: int, core_hold: bool) -> dict:
    args = parse_args(["--executor", "emulated", "--emulated-step-ms", "10", "--model-config", MODEL_CONFIG,
                       "--max-total-tokens", "8192", "--max-running-requests", "16", "--stream-interval",
                       str(interval), "--disable-radix-cache", "--log-level", "warning"])
    paths = IPCPaths.create()
    sent: list[bytes] = []
    try:
        sched = SchedulerProcess(args, paths)
        sched.timer.inner.mode = "virtual"  # the device's time passes at once
        sched.send = type("Sink", (), {"send": staticmethod(sent.append)})()
        if not core_hold:
            sched._core_hold = sched.engine.core.stream_hold = None
        engine, core = sched.engine, sched.engine.core
        free0 = core.allocator.available
        built = 0
        for step in range(200):
            for i, (rid, (n, extra, at)) in enumerate(REQUESTS.items()):
                if at == step:
                    params = SamplingParams(max_new_tokens=n, ignore_eos=True, seed=100 + i, **extra)
                    sched._add(io.GenerateReq(rid, [300 + i, 301, 302, 303], params.to_dict(), 0.0))
            if step == ABORT[1]:
                sched._abort(ABORT[0])
            if not engine.has_work():
                break
            results = sched.timer.final_results
            updates = engine.step(None)  # the loop's order: launch, wait for a result, apply it
            if (updates or sched.timer.final_results != results) and core.can_plan() and engine.has_work():
                updates += engine.step(0.0)  # the launch behind the running one (overlap)
            built += len(updates)
            if updates:
                sched._send_updates(updates)
        assert not engine.has_work()
        msgs = [io.decode(m) for m in sent]
        state = {"held": dict(sched._held), "core_hold": dict(core.stream_hold or {}),
                 "kv_back": core.allocator.available == free0, "requests": dict(core.requests)}
        sched.close()
    finally:
        paths.cleanup()
    return {"msgs": [m for m in msgs if isinstance(m, io.BatchTokenOut)], "built": built, **state}


@pytest.fixture(scope="module")
def runs():
    return {(i, h): _run(i, h) for i, h in ((1, False), (8, False), (8, True), (3, True))}


def test_core_hold_sends_exactly_the_same_messages(runs):
    """Interval 8: the scheduler's messages with the core holding equal, field by field and step by
    step, those of the core building every update (the run before this change)."""
    held, plain = runs[(8, True)], runs[(8, False)]
    assert held["msgs"] == plain["msgs"]
    assert len(held["msgs"]) > 4
    rows = [o for m in held["msgs"] for o in m.outs]
    assert {o.rid for o in rows if o.finished} == set(REQUESTS)
    assert any(o.finish_reason and o.finish_reason["type"] == "abort" for o in rows)
    assert any(o.finish_reason and o.finish_reason["type"] == "stop" for o in rows)
    assert any(o.logprobs for o in rows)


def test_core_hold_builds_fewer_updates(runs):
    """The point of it: held tokens get no RequestUpdate (a count, not a time)."""
    assert runs[(8, True)]["built"] < runs[(8, False)]["built"] * 0.5
    assert runs[(8, False)]["built"] == runs[(1, False)]["built"]


@pytest.mark.parametrize("interval", [3, 8])
def test_core_hold_keeps_every_token_and_the_interval(runs, interval):
    """Each request's ids (and logprobs) concatenate to exactly interval 1's; outputs at tokens 1,
    1+N, 1+2N, ... and the end (one token per step here); completion counts add up."""
    ref, got = {}, {}
    for m in runs[(1, False)]["msgs"]:
        for o in m.outs:
            ref.setdefault(o.rid, []).append(o)
    for m in runs[(interval, True)]["msgs"]:
        for o in m.outs:
            got.setdefault(o.rid, []).append(o)
    assert set(got) == set(ref) == set(REQUESTS)
    for rid, outs in ref.items():
        g = got[rid]
        assert [t for o in g for t in o.new_ids] == [t for o in outs for t in o.new_ids]
        assert [lp for o in g for lp in o.logprobs or ()] == [lp for o in outs for lp in o.logprobs or ()]
        assert g[-1].finished and g[-1].finish_reason == outs[-1].finish_reason
        assert not any(o.finished for o in g[:-1])
        counts = [o.completion_tokens for o in g]
        assert counts == [sum(len(x.new_ids) for x in g[:j + 1]) for j in range(len(g))]
        n = counts[-1]
        assert set(counts) <= {1, *range(1 + interval, n + 1, interval), n}


def test_core_hold_leaves_nothing_behind(runs):
    """Once every request ended (one aborted): no held tokens or hold marks, no request in the core,
    and the KV pool holds exactly the free slots it began with."""
    for key in ((8, True), (3, True), (8, False)):
        r = runs[key]
        assert r["held"] == {} and r["core_hold"] == {} and r["requests"] == {}
        assert r["kv_back"]
