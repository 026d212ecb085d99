"""Scheduling with the radix prefix cache, without a model: the core matches each waiting request's
cached prefix when it plans, so policies budget the uncached tokens, price the cached context, and
count the KV that admitting a request pins (the tree's slots it locks)."""
from __future__ import annotations

from sglang_duet.core.request import ReqState
from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.memory.radix_cache import RadixCache
from sglang_duet.policies.base import Policy, PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams
from fake_lanes import FakeLanes, reference_tokens

PREFIX = [(7 * j) % 90 + 3 for j in range(100)]


class Recording(Policy):
    """The chunked policy, recording each view's waiting (rid, num_computed, prefix_pin) and each plan."""

    name = "recording"

    def __init__(self, inner: Policy):
        super().__init__(inner.ctx)
        self.inner = inner
        self.views, self.plans = [], []

    def plan(self, view):
        self.views.append([(r.rid, r.num_computed, r.prefix_pin) for r in view.waiting])
        p = self.inner.plan(view)
        self.plans.append(p)
        return p


def make(pool=4096, budget=16, max_running=256, cost_model=None, schedule_policy="fcfs"):
    box = {}
    ctx = PolicyContext(chunked_prefill_size=budget, cost_model=cost_model,
                        hardware=cost_model.hw if cost_model else None)
    policy = Recording(load_policy("chunked", ctx))
    core = SchedulerCore(CoreConfig(kv_slots=pool, context_length=4096, max_running_requests=max_running,
                                    chunked_prefill_size=budget, schedule_policy=schedule_policy),
                         policy, clock=lambda: box["lanes"].clock())
    core.prefix_cache = RadixCache(core.allocator.free)
    box["lanes"] = lanes = FakeLanes(core, pool)
    return core, lanes, policy


def warm(core, lanes, prompt=PREFIX):
    """Run one request on `prompt` to the end: its prompt's KV is then in the tree."""
    core.add_request("warm", list(prompt), SamplingParams(max_new_tokens=1))
    lanes.run()
    assert core.prefix_cache.total == len(prompt)


def test_budget_pays_only_for_uncached_tokens():
    core, lanes, policy = make(budget=16)
    warm(core, lanes)
    n_plans = len(policy.plans)
    params = SamplingParams(max_new_tokens=3)
    b, c = PREFIX + [5] * 10, PREFIX + [6] * 10
    core.add_request("b", b, params)
    core.add_request("c", c, params)
    launch = core.schedule()[0]
    # both fit one 16-token step: b's 10 uncached tokens and 6 of c's (priced from where each prefix
    # ends); before, b's chunk was planned from position 0 and took the whole budget
    assert policy.views[n_plans] == [("b", 100, 100), ("c", 100, 0)]  # c shares b's prefix: pinned once
    assert [(w.rid, w.start_pos, len(w.input_ids)) for w in launch.work] == [("b", 100, 10), ("c", 100, 6)]
    assert core.requests["b"].cached_len == core.requests["c"].cached_len == 100
    lanes.submit(launch)
    out = {}
    for u in lanes.run():
        out.setdefault(u.rid, []).extend(u.new_token_ids)
    assert out == {"b": reference_tokens(b, 3), "c": reference_tokens(c, 3)}
    assert core.kv_free == core.allocator.capacity


def test_waiting_requests_hold_nothing_between_plans():
    core, lanes, policy = make(budget=16, max_running=1)
    warm(core, lanes)
    params = SamplingParams(max_new_tokens=2)
    core.add_request("b", PREFIX + [5] * 4, params)
    core.add_request("c", PREFIX + [6] * 4, params)  # waits: one request runs at a time
    lanes.submit(core.schedule()[0])
    c = core.requests["c"]
    assert policy.views[-1] == [("b", 100, 100), ("c", 100, 0)]
    assert c.state is ReqState.WAITING and (c.num_computed, c.prefix_pin, c.kv_slots, c.cache_node) == (0, 0, [], None)
    lanes.run()
    assert core.kv_free == core.allocator.capacity


def test_prefix_pin_keeps_the_policy_from_over_asking_kv():
    """63 usable slots: the tree holds b's 40-token prefix, 23 are free. Admitting b (20 new tokens)
    locks the prefix, leaving 3: the policy must not plan d (20 tokens, nothing cached) beside it,
    which only the free-slot count without the pin would allow (the core would then drop d's chunk)."""
    prefix = PREFIX[:40]
    core, lanes, policy = make(pool=64, budget=64)
    warm(core, lanes, prefix)
    params = SamplingParams(max_new_tokens=1)
    core.add_request("b", prefix + [5] * 20, params)
    core.add_request("d", [9] * 20, params)
    launches = core.schedule()
    assert policy.views[-1] == [("b", 40, 40), ("d", 0, 0)]
    chunks = [(c.rid, c.start, c.length) for c in policy.plans[-1].aggregated.prefill]
    assert chunks == [("b", 40, 20)]
    assert [(w.rid, w.start_pos) for w in launches[0].work] == [("b", 40)]  # what was planned, ran
    for launch in launches:
        lanes.submit(launch)
    lanes.run()
    assert core.kv_free == core.allocator.capacity


def test_an_evicted_prefix_keeps_the_chunk_token_count():
    """The hit the policy planned with shrank before admission (an allocation earlier in the same
    plan evicted it): the chunk starts where the cache now ends, with the token count planned."""
    core, lanes, policy = make(budget=16)
    warm(core, lanes)
    core.add_request("b", PREFIX + [5] * 10, SamplingParams(max_new_tokens=2))
    core._match_waiting()
    b = core.requests["b"]
    assert b.num_computed == 100
    core.prefix_cache.evict(core.prefix_cache.total)  # the tree loses the prefix meanwhile
    from sglang_duet.core.plan import PrefillChunk

    chunk = core._use_cached_prefix(b, PrefillChunk("b", 100, 10))
    assert (chunk.start, chunk.length, b.num_computed, b.cached_len) == (0, 10, 0, 0)


def test_the_cost_model_prices_the_uncached_part_with_its_context():
    cm = CostModel.load("qwen3-8b", "h100")
    core, lanes, policy = make(budget=16, cost_model=cm)
    warm(core, lanes)
    core.add_request("b", PREFIX + [5] * 10, SamplingParams(max_new_tokens=1))
    core.schedule()
    predicted = policy.plans[-1].predicted_ms["aggregated"]
    assert predicted == cm.batch_time([(10, 100)]) * 1e3
    assert predicted != cm.batch_time([(16, 0)]) * 1e3  # what a chunk planned from position 0 was priced at


def test_lpm_orders_the_window_by_the_hit_it_plans_with():
    core, lanes, policy = make(budget=256, max_running=1, schedule_policy="lpm")
    warm(core, lanes)
    params = SamplingParams(max_new_tokens=1)
    core.add_request("x", [9] * 30, params)
    core.add_request("b", PREFIX + [5] * 3, params)
    launch = core.schedule()[0]
    assert policy.views[-1] == [("b", 100, 100), ("x", 0, 0)]
    assert [(w.rid, w.start_pos, len(w.input_ids)) for w in launch.work] == [("b", 100, 3)]


def test_a_prefill_instance_holds_cached_kv_locked_and_caches_it_on_release():
    """Disaggregation (kv_hold) with the prefix cache on a prefill instance: while a decode
    instance has still to pull a finished prompt's KV, no slot of it is freed or evicted (the tree's
    shared part stays locked); the release puts the prompt in the tree, and the pool is whole."""
    core, lanes, policy = make(pool=256, budget=64)
    held = {}

    def hold(r, reason):
        held[r.rid] = list(r.kv_slots)
        return True

    warm(core, lanes, PREFIX[:60])
    core.kv_hold = hold
    a = PREFIX[:60] + [5] * 20
    core.add_request("a", a, SamplingParams(max_new_tokens=1))
    for launch in core.schedule():
        lanes.submit(launch)
    out = {u.rid: u for u in lanes.run()}
    assert out["a"].finished and out["a"].cached_tokens == 60 and len(held["a"]) == 80
    cache = core.prefix_cache
    cache.evict(cache.total)  # the pool runs short: nothing the held request uses may go
    assert cache.match_prefix(a)[0] == held["a"][:80]  # its prompt was cached when its prefill ended
    kv = list(lanes.kv)
    assert core.kv_free == core.allocator.capacity - 80
    assert core.release_held("a") == 80
    assert [kv[s] for s in held["a"]] == a and cache.match_prefix(a)[0] == held["a"]
    assert core.kv_free == core.allocator.capacity and cache.evictable == cache.total == 80
    core.add_request("b", a + [7], SamplingParams(max_new_tokens=1))  # the next turn hits all of it
    for launch in core.schedule():
        lanes.submit(launch)
    assert {u.rid: u for u in lanes.run()}["b"].cached_tokens == 80


def test_prefix_scheduling_benchmark_counts(capsys):
    """benchmark/prefix_scheduling.py: a burst of 32 requests behind a cached 1000-token prompt gets
    its first tokens in 2 steps of a 512-token budget (25 + 7 own-token chunks), not one per step."""
    from benchmark.prefix_scheduling import main

    main([])
    out = capsys.readouterr().out
    assert "schedule-time match: 2 steps" in out and "admission only: 32 steps" in out


def test_the_tree_version_and_match_length():
    pool = []
    c = RadixCache(pool.extend)
    v = c.version
    c.insert([1, 2, 3, 4], [11, 12, 13, 14])
    assert c.version == v + 1
    assert c.match_length([1, 2, 9])[0] == 2 and c.version == v + 1  # a split changes no match
    assert c.insert([1, 2, 3], [0, 0, 0]) == 3 and c.version == v + 1  # nothing new
    for ids in ([1, 2, 3, 4, 5], [1, 2], [7], []):
        n, node = c.match_length(ids)
        slots, node2 = c.match_prefix(ids)
        assert n == len(slots) and node is node2
    c.evict(1)
    assert c.version == v + 2


def test_a_waiting_request_is_matched_again_only_when_the_tree_changed(monkeypatch):
    core, lanes, policy = make(budget=16, max_running=1)
    warm(core, lanes)
    params = SamplingParams(max_new_tokens=2)
    core.add_request("b", PREFIX + [5] * 4, params)
    core.add_request("c", PREFIX + [6] * 4, params)  # waits behind b
    calls = []
    real = core.prefix_cache.match_length
    monkeypatch.setattr(core.prefix_cache, "match_length", lambda ids: calls.append(len(ids)) or real(ids))
    core._match_waiting()
    assert len(calls) == 2
    core._match_waiting()
    assert len(calls) == 2  # nothing changed: the kept matches
    core.prefix_cache.evict(core.prefix_cache.total)  # the tree changed: match again, and see it
    core._match_waiting()
    assert len(calls) == 4 and [r.num_computed for r in core.waiting] == [0, 0]


class _CountingHeapq:
    """radix_cache's heapq, counting the entries it handles: a push or pop is one, a heapify its length."""

    def __init__(self):
        import heapq
        self._hq, self.work = heapq, 0

    def heappush(self, heap, item):
        self.work += 1
        self._hq.heappush(heap, item)

    def heappop(self, heap):
        self.work += 1
        return self._hq.heappop(heap)

    def heapify(self, heap):
        self.work += len(heap)
        self._hq.heapify(heap)


def test_eviction_work_per_request_does_not_grow_with_the_tree(monkeypatch):
    """Issue 14: once the pool is full of cached prefixes every admission evicts, and each eviction
    walked and heapified every leaf of the tree (so the scheduler's CPU per request grew with the
    requests served: 0.1 -> 1.1-2.7 ms after ~3,000 short requests on a 73k-slot pool). The eviction
    heap now outlives one eviction: its work per admitted request stays a small constant while the
    tree holds hundreds of leaves, and the heap stays within 2 x the tree's nodes."""
    from sglang_duet.memory import radix_cache

    counting = _CountingHeapq()
    monkeypatch.setattr(radix_cache, "heapq", counting)
    core, lanes, _ = make(pool=2400, budget=512, max_running=32)
    cache = core.prefix_cache
    shared = PREFIX[:30]
    params = SamplingParams(max_new_tokens=1)
    served, per_burst = 0, []
    for _ in range(40):  # 1,280 requests: the pool is full of leaves after about 250
        work0 = counting.work
        for _ in range(32):
            i = served
            core.add_request(f"r{i}", shared + [3 + (i // 90 ** k) % 90 for k in range(8)], params)
            served += 1
        lanes.run()
        per_burst.append((counting.work - work0) / 32)
        assert cache.heap_size() <= 2 * cache.nodes + 64
        assert core.kv_free == core.allocator.capacity  # nothing held once the burst is done
    stack, leaves = [cache.root], 0
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        leaves += not node.children
    assert leaves >= 200 and cache.total > core.allocator.capacity - 40  # a full pool of distinct prompts
    late = per_burst[-20:]  # (compactions show as the odd burst at ~3x the others)
    assert sum(late) / len(late) <= 8 and max(late) <= 24, per_burst  # the whole-tree walk: >= 200 each
