"""Tokens delivered step by step: a k-step launch reported in parts (LaunchResult.final=False).

A user's TBT is the gap between two tokens reaching them, so an executor reports each decode
step's tokens when that step completes, not when the k-step launch ends. The core must append
them in order, finish a request mid-launch (reporting it at once) while keeping its KV slots
until the launch is over (the device may still write to them), and end the launch on its final
part exactly as a one-part result would.
"""
from __future__ import annotations

import pytest

from sglang_duet.core.plan import LaunchResult
from sglang_duet.sampling_params import SamplingParams
from fake_lanes import FakeLanes, SplitAlways, reference_tokens
from test_scheduler_core import make, outputs, prompt


def _split_core(partials: bool, steps: int = 4, pool: int = 4096):
    core, _ = make(pool=pool, policy=SplitAlways(prefill_budget=64, steps=steps))
    lanes = FakeLanes(core, pool, partials=partials)
    core.clock = lanes.clock
    return core, lanes


def _token_times(core, lanes, n_req: int):
    times: dict[str, list[float]] = {}
    ups = []
    for _ in range(100_000):
        ups.extend(core.take_updates())
        for launch in core.schedule():
            lanes.submit(launch)
        if not lanes.pending:
            break
        import heapq

        t, _, res = heapq.heappop(lanes.pending)
        lanes.now = t
        for u in core.apply_result(res):
            ups.append(u)
            times.setdefault(u.rid, []).extend([t] * len(u.new_token_ids))
    return ups, times


def test_per_step_parts_give_the_same_tokens_earlier():
    lens = [(5, 9), (40, 13), (17, 6)]
    results = {}
    for partials in (False, True):
        core, lanes = _split_core(partials)
        for i, (p, n) in enumerate(lens):
            core.add_request(f"r{i}", prompt(i, p), SamplingParams(max_new_tokens=n))
        ups, times = _token_times(core, lanes, len(lens))
        out, reasons = outputs(ups)
        for i, (p, n) in enumerate(lens):
            assert out[f"r{i}"] == reference_tokens(prompt(i, p), n)
            assert reasons[f"r{i}"] == {"type": "length", "length": n}
        assert core.allocator.available == core.allocator.capacity and not core.requests
        results[partials] = times
    # Within a request, delivery times never go back.
    for ts in results[True].values():
        assert ts == sorted(ts)
    # Bursts are gone: with one part per launch, k tokens share one delivery time.
    assert max(_same_time_run(ts) for ts in results[False].values()) == 4
    assert max(_same_time_run(ts) for ts in results[True].values()) == 1


def test_parts_do_not_make_a_request_prefill_again():
    """After a k-step launch delivered in parts, every request is ready to decode: its KV covers all
    but the last token (a core that forgot the delivered tokens would re-prefill them)."""
    core, lanes = _split_core(partials=True, steps=4)
    core.add_request("a", prompt(3, 7), SamplingParams(max_new_tokens=40))
    import heapq

    decode_parts = 0
    while core.has_unfinished():
        for launch in core.schedule():
            lanes.submit(launch)
        t, _, res = heapq.heappop(lanes.pending)
        lanes.now = t
        core.apply_result(res)
        decode_parts += not res.final
        r = core.requests.get("a")
        if res.final and r is not None and not r.finished:
            assert r.num_computed == r.seq_len - 1, "the delivered tokens were forgotten"
    assert decode_parts > 0
    prefill_tokens = sum(c.length for lnch in lanes.launches for c in lnch.batch.prefill)
    assert prefill_tokens == 7


def _same_time_run(ts):
    best = run = 1
    for a, b in zip(ts, ts[1:]):
        run = run + 1 if abs(a - b) < 1e-12 else 1
        best = max(best, run)
    return best


def test_a_request_that_ends_mid_launch_is_reported_then_keeps_its_slots_until_the_launch_ends():
    core, lanes = _split_core(partials=True, steps=4)
    core.add_request("a", prompt(1, 6), SamplingParams(max_new_tokens=3))  # 1 from prefill + 2 of a 4-step decode
    ups = []
    ended_at = None
    while core.has_unfinished():
        for launch in core.schedule():
            lanes.submit(launch)
        import heapq

        t, _, res = heapq.heappop(lanes.pending)
        lanes.now = t
        before = core.allocator.available
        got = core.apply_result(res)
        ups += got
        if any(u.finished for u in got) and not res.final:
            ended_at = t
            assert core.allocator.available == before, "KV freed while the launch still runs"
            assert "a" in core.requests and core.requests["a"].release_deferred
            assert core.has_unfinished()  # the launch is still in flight
    out, reasons = outputs(ups)
    assert ended_at is not None
    assert out["a"] == reference_tokens(prompt(1, 6), 3) and reasons["a"]["type"] == "length"
    assert core.allocator.available == core.allocator.capacity and not core.requests


def test_abort_during_a_launch_stops_delivery_and_frees_at_its_end():
    core, lanes = _split_core(partials=True, steps=4)
    core.add_request("a", prompt(2, 6), SamplingParams(max_new_tokens=50))
    import heapq

    ups = []
    aborted = False
    while core.has_unfinished():
        for launch in core.schedule():
            lanes.submit(launch)
        t, _, res = heapq.heappop(lanes.pending)
        lanes.now = t
        got = core.apply_result(res)
        ups += got
        n = sum(len(u.new_token_ids) for u in ups)
        if not aborted and n >= 3 and not res.final:
            core.abort("a")
            aborted = True
            n_at_abort = n
    out, reasons = outputs(ups)
    assert reasons["a"]["type"] == "abort"
    assert len(out["a"]) == n_at_abort, "tokens were delivered after the abort"
    assert core.allocator.available == core.allocator.capacity and not core.requests


def test_result_for_an_unknown_launch_is_an_error():
    core, _ = make()
    with pytest.raises(KeyError):
        core.apply_result(LaunchResult(99))
