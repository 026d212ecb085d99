"""The waiting queue's columns (core/waiting_queue.py) and the compiled deadline walk that reads them.

The walk over columns must answer what `deadline_order`'s walk over the request objects answers, on
every plan: the columns must be in step with the requests through arrivals, admissions, retractions,
aborts and the prefix cache's per-plan matches, and the compiled walk must set the same requests aside.
"""
from __future__ import annotations

import heapq
import random

import numpy as np
import pytest

from sglang_duet.core.request import Request
from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore, SchedulerView
from sglang_duet.core.waiting_queue import WaitingQueue
from sglang_duet.memory.radix_cache import RadixCache
from sglang_duet.policies import search_kernels_loader
from sglang_duet.policies.base import Policy, PolicyContext, deadline_order, load_policy
from sglang_duet.sampling_params import SamplingParams
from fake_lanes import FakeLanes

needs_numba = pytest.mark.skipif(not search_kernels_loader.AVAILABLE, reason="numba not installed")


def _req(i: int, rng: random.Random, out: int = 0) -> Request:
    r = Request(f"r{i}", [3] * rng.randrange(1, 300), SamplingParams(max_new_tokens=8), rng.uniform(0, 5), seed=i)
    r.output_ids = [4] * out
    return r


def test_queue_operations_keep_the_columns_in_step():
    rng = random.Random(0)
    q, ref = WaitingQueue(capacity=2), []  # capacity 2: the columns grow several times
    for step in range(400):
        op = rng.random()
        if op < 0.45 or not ref:
            r = _req(step, rng)
            q.append(r)
            ref.append(r)
        elif op < 0.55:
            r = _req(step, rng, out=rng.randrange(1, 9))  # a retracted request: first again
            q.appendleft(r)
            ref.insert(0, r)
        elif op < 0.8:
            r = rng.choice(ref)
            q.remove(r)
            ref.remove(r)
        else:  # the prefix cache's match: the head's num_computed set and (lpm) reordered
            head = q.head(rng.randrange(1, 8))
            for r in head:
                r.num_computed = rng.randrange(0, r.prompt_len)
            head.sort(key=lambda r: -r.num_computed)
            q.replace_head(head)
            ref[:len(head)] = head
            assert q.check()
            for r in head:
                r.num_computed = 0
            q.clear_computed()
        assert q.snapshot() == ref and len(q) == len(ref) and q.check()
    cols = q.columns()
    assert cols.seq_len.tolist() == [r.prompt_len + len(r.output_ids) for r in ref]
    assert cols.out_len.tolist() == [len(r.output_ids) for r in ref]
    with pytest.raises(ValueError):
        q.remove(_req(10_000, rng))
    # a view's columns are copies: the queue changing later does not reach it
    before = cols.arrival.copy()
    q.remove(ref[0])
    assert np.array_equal(cols.arrival, before)


def test_a_request_in_flight_fails_the_check():
    q = WaitingQueue()
    r = _req(0, random.Random(1))
    q.append(r)
    assert q.check()
    r.pending = 1  # the column walk takes pending as 0 for a waiting request
    assert not q.check()


def _view(waiting: list[Request], now: float, with_columns: bool) -> SchedulerView:
    q = WaitingQueue()
    for r in waiting:
        q.append(r)
    return SchedulerView(now=now, waiting=list(waiting), prefilling=[], decoding=[], inflight={},
                         idle_lanes=frozenset(), kv_free=0, kv_total=0, num_running=0, config=CoreConfig(kv_slots=2, context_length=4096),
                         waiting_columns=q.columns() if with_columns else None)


@needs_numba
@pytest.mark.parametrize("seed", range(6))
def test_compiled_walk_orders_as_the_python_walk(seed):
    """Random queues under heavy pressure (many late: the heap works), with retracted requests, long
    waits past the defer limit, and cached prefixes at the head."""
    rng = random.Random(seed)
    for _ in range(60):
        n = rng.randrange(2, 120)
        waiting = sorted((_req(i, rng, out=rng.randrange(1, 5) if rng.random() < 0.1 else 0) for i in range(n)),
                         key=lambda r: r.arrival_time)
        for r in waiting[:rng.randrange(0, 8)]:
            r.num_computed = rng.randrange(0, r.prompt_len)
        now = 5.0 + rng.uniform(0, 8)
        tpm = rng.choice([5.0, 20.0, 80.0, 1e4])
        slo = rng.choice([200.0, 1000.0, 3000.0])
        want = deadline_order(_view(waiting, now, False), tpm, slo)
        got = deadline_order(_view(waiting, now, True), tpm, slo)
        assert [r.rid for r in got] == [r.rid for r in want]


class Checking(Policy):
    """chunked, and on every plan: the view's columns equal its requests' numbers, and deadline order
    over the columns (compiled) equals it over the requests."""

    name = "checking"

    def __init__(self, inner: Policy, tokens_per_ms: float, ttft_slo_ms: float):
        super().__init__(inner.ctx)
        self.inner, self.tpm, self.slo = inner, tokens_per_ms, ttft_slo_ms
        self.plans = self.reordered = self.matched = self.retracted = 0

    def plan(self, view):
        c = view.waiting_columns
        w = view.waiting
        assert c.arrival.tolist() == [r.arrival_time for r in w]
        assert c.seq_len.tolist() == [r.prompt_len + len(r.output_ids) for r in w]
        assert c.out_len.tolist() == [len(r.output_ids) for r in w]
        assert c.computed.tolist() == [r.num_computed for r in w]
        assert not any(r.pending for r in w)
        self.matched += any(c.computed)
        self.retracted += any(c.out_len)
        if search_kernels_loader.AVAILABLE:
            want = deadline_order(SchedulerView(**{**view.__dict__, "waiting_columns": None}), self.tpm, self.slo)
            got = deadline_order(view, self.tpm, self.slo)
            assert [r.rid for r in got] == [r.rid for r in want]
            self.reordered += got is not w
        self.plans += 1
        return self.inner.plan(view)


def test_columns_stay_in_step_through_the_core():
    """Arrivals over time, a prefix cache (lpm reorders the head), a small KV pool (retractions) and
    aborts: the columns agree with the requests at every plan, and so do both walks."""
    rng = random.Random(3)
    budget, pool = 64, 1200
    policy = Checking(load_policy("chunked", PolicyContext(chunked_prefill_size=budget)), 2.0, 300.0)
    box = {}
    core = SchedulerCore(CoreConfig(kv_slots=pool, context_length=2048, max_running_requests=32,
                                    chunked_prefill_size=budget, schedule_policy="lpm"),
                         policy, clock=lambda: box["lanes"].clock())
    core.prefix_cache = RadixCache(core.allocator.free)
    box["lanes"] = lanes = FakeLanes(core, pool, prefill_ms=0.5, decode_ms=4.0)
    shared = [(5 * j) % 80 + 3 for j in range(60)]
    arrivals = sorted((rng.uniform(0, 3.0), i) for i in range(120))
    aborts = {f"q{i}" for i in range(0, 120, 9)}
    while arrivals or core.has_unfinished():
        while arrivals and arrivals[0][0] <= lanes.now:
            _, i = arrivals.pop(0)
            prompt = (shared[:rng.randrange(0, 60)] if i % 2 else []) + [rng.randrange(3, 90) for _ in range(rng.randrange(1, 120))]
            core.add_request(f"q{i}", prompt, SamplingParams(max_new_tokens=rng.randrange(1, 40), ignore_eos=True))
            if f"q{i}" in aborts and rng.random() < 0.5:
                core.abort(f"q{i}")
        while True:
            launches = core.schedule()
            for launch in launches:
                lanes.submit(launch)
            if not launches:
                break
        core.take_updates()
        assert core.waiting.check()
        if lanes.pending:
            t, _, res = heapq.heappop(lanes.pending)
            lanes.now = t
            core.apply_result(res)
        elif arrivals:
            lanes.now = arrivals[0][0]
    assert policy.plans > 100 and policy.matched > 0 and core.stats.retractions > 0 and policy.retracted > 0
    if search_kernels_loader.AVAILABLE:
        assert policy.reordered > 0  # the pressure made deadline order differ from FCFS
    assert core.allocator.available + core.prefix_cache.total == core.allocator.capacity  # the tree holds the rest
