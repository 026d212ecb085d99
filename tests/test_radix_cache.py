"""The radix prefix cache: the tree on its own, then through the engine on a tiny model, where
outputs must be token-exact with the cache on and off (shared system prompts, staggered arrivals,
retraction forced, aborts) and the KV pool whole at the end."""
from __future__ import annotations

import pytest

from sglang_duet.memory.radix_cache import RadixCache


class Pool:
    def __init__(self):
        self.freed: list[int] = []

    def free(self, slots):
        self.freed.extend(slots)


def test_match_insert_split():
    pool = Pool()
    c = RadixCache(pool.free)
    assert c.match_prefix([1, 2, 3]) == ([], c.root)
    assert c.insert([1, 2, 3, 4], [11, 12, 13, 14]) == 0
    assert c.total == c.evictable == 4
    slots, node = c.match_prefix([1, 2, 9])  # splits the edge after 2 tokens
    assert slots == [11, 12] and node.key == [1, 2]
    assert c.match_prefix([1, 2, 3, 4, 5])[0] == [11, 12, 13, 14]
    # a second sequence sharing [1, 2]: 2 tokens already there, the tree takes the rest
    assert c.insert([1, 2, 7], [21, 22, 27]) == 2
    assert c.total == 5 and c.match_prefix([1, 2, 7])[0] == [11, 12, 27]
    assert c.insert([1, 2, 3, 4], [31, 32, 33, 34]) == 4  # all there: the caller's slots are duplicates
    assert pool.freed == []


def test_locks_and_lru_eviction():
    pool = Pool()
    c = RadixCache(pool.free)
    c.insert([1, 2, 3], [11, 12, 13])
    c.insert([5, 6], [15, 16])
    c.insert([8], [18])
    _, node = c.match_prefix([1, 2, 3])  # most recently used, and locked
    c.lock(node)
    assert c.evictable == 3
    assert c.evict(1) == 2 and pool.freed == [15, 16]  # least recently used first
    assert c.evict(10) == 1 and pool.freed == [15, 16, 18]  # the locked path stays
    assert c.match_prefix([1, 2, 3])[0] == [11, 12, 13]
    assert not c.reset()
    c.unlock(node)
    assert c.evictable == 3 and c.reset() and c.total == 0
    assert sorted(pool.freed) == [11, 12, 13, 15, 16, 18]
    with pytest.raises(RuntimeError):
        c.unlock(node)


def test_split_keeps_locks_and_parents_become_leaves():
    pool = Pool()
    c = RadixCache(pool.free)
    c.insert([1, 2, 3, 4], [1, 2, 3, 4])
    _, deep = c.match_prefix([1, 2, 3, 4])
    c.lock(deep)
    c.match_prefix([1, 2, 9])  # split above a locked node: the new parent is locked too
    assert c.evictable == 0 and c.evict(4) == 0
    c.unlock(deep)
    c.insert([1, 2, 5], [1, 2, 5])
    assert c.evict(100) == 5 and c.total == 0 and sorted(pool.freed) == [1, 2, 3, 4, 5]


def test_pages():
    c = RadixCache(Pool().free, page_size=2)
    assert c.insert([1, 2, 3, 4, 5], [11, 12, 13, 14, 15]) == 0
    assert c.total == 4  # whole pages only
    assert c.match_prefix([1, 2, 3, 9])[0] == [11, 12]  # the match ends at a page boundary
    assert c.insert([1, 2, 3, 9], [0, 0, 23, 29]) == 2 and c.total == 6


# ---- through the engine ---------------------------------------------------------------------------

SYSTEM = "You are a helpful assistant. Answer briefly and precisely, in English. "
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "What is 2 + 2?", "Say hello.",
             "Describe the sea.", "Count to three.", "What colour is the sky?", "Spell cat."]


def run(engine, prompts, arrivals, params, abort_at=None):
    """Requests join at the given steps; returns rid -> (tokens, cached_tokens of the last update)."""
    core = engine.core
    got = {f"r{i}": [] for i in range(len(prompts))}
    cached = {}
    done, step = set(), 0
    while len(done) < len(prompts):
        for i in arrivals.get(step, []):
            core.add_request(f"r{i}", prompts[i], params)
        for rid in (abort_at or {}).get(step, []):
            core.abort(rid)
        for u in core.step():
            got[u.rid].extend(u.new_token_ids)
            cached[u.rid] = u.cached_tokens
            if u.finished:
                done.add(u.rid)
        step += 1
        assert step < 10_000
    return got, cached


def count_tokens(engine):
    """Wrap the executor: counts the input tokens computed (the decodes are the same with the cache
    on and off, so the difference is the prefill the cache saved)."""
    seen = {"tokens": 0}
    ex = engine.core.executor
    inner = ex.submit

    def submit(launch):
        seen["tokens"] += sum(len(w.input_ids) for w in launch.work)
        return inner(launch)

    ex.submit = submit
    return seen


@pytest.mark.parametrize("kv_tokens", [None, 300])  # 300: retraction forced
def test_token_exact_with_and_without_the_cache(tiny_model_factory, kv_tokens):
    from sglang_duet import Engine
    from sglang_duet.sampling_params import SamplingParams

    path = tiny_model_factory("llama")
    kw = dict(dtype="float32", chunked_prefill_size=32)
    if kv_tokens:
        kw["max_total_tokens"] = kv_tokens
    arrivals = {0: [0, 1], 2: [2], 5: [3, 4], 9: [5], 14: [6, 7]}
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    results = {}
    for cache in (True, False):
        engine = Engine(model_path=path, disable_radix_cache=not cache, **kw)
        prompts = [engine.tokenizer.encode(SYSTEM + q) for q in QUESTIONS]
        work = count_tokens(engine)
        got, cached = run(engine, prompts, arrivals, params)
        core = engine.core.core
        assert core.kv_free == core.allocator.capacity  # whole: every slot free or only cached
        if cache:
            c = core.prefix_cache
            assert c.evictable == c.total and core.allocator.available + c.total == core.allocator.capacity
            assert c.reset() and core.allocator.available == core.allocator.capacity
            assert sum(1 for v in cached.values() if v > 0) >= 4, cached  # later arrivals hit the system prompt
        else:
            assert all(v == 0 for v in cached.values())
        results[cache] = (got, work["tokens"], core.stats.retractions)
        engine.shutdown()
    assert results[True][0] == results[False][0]
    assert results[True][1] < results[False][1]  # prefill tokens saved
    if kv_tokens:
        assert results[False][2] > 0  # the pool really was short


def test_aborts_leave_the_pool_whole(tiny_model_factory):
    from sglang_duet import Engine
    from sglang_duet.sampling_params import SamplingParams

    engine = Engine(model_path=tiny_model_factory("llama"), dtype="float32", chunked_prefill_size=16,
                    max_total_tokens=400)
    prompts = [engine.tokenizer.encode(SYSTEM + q) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True)
    got, _ = run(engine, prompts, {0: [0, 1, 2, 3], 1: [4, 5], 3: [6, 7]}, params,
                 abort_at={1: ["r0"], 2: ["r4", "r6"], 4: ["r2"], 6: ["r7"]})
    core = engine.core.core
    assert core.kv_free == core.allocator.capacity
    assert core.allocator.available + core.prefix_cache.total == core.allocator.capacity
    assert core.prefix_cache.reset() and core.allocator.available == core.allocator.capacity
    engine.shutdown()


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_lpm_admits_the_longest_cached_prefix_first(tiny_model_factory, policy):
    """One request runs at a time; B (nothing cached) waits ahead of C (its prompt is cached)."""
    from sglang_duet import Engine
    from sglang_duet.sampling_params import SamplingParams

    engine = Engine(model_path=tiny_model_factory("llama"), dtype="float32", max_running_requests=1,
                    schedule_policy=policy)
    tok = engine.tokenizer
    shared = tok.encode(SYSTEM * 2)
    params = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    prompts = [shared + tok.encode(" warm up"), tok.encode("Nothing in common here at all."),
               shared + tok.encode(" and a question")]
    first = []
    run_order = {0: [0], 1: [1, 2]}
    core = engine.core
    step, done = 0, set()
    while len(done) < 3:
        for i in run_order.get(step, []):
            core.add_request(f"r{i}", prompts[i], params)
        for u in core.step():
            if u.new_token_ids and u.rid not in first:
                first.append(u.rid)
            if u.finished:
                done.add(u.rid)
        step += 1
    assert first == (["r0", "r1", "r2"] if policy == "fcfs" else ["r0", "r2", "r1"])
    engine.shutdown()


def test_multi_turn_benchmark_smoke(tiny_model_factory, capsys, monkeypatch):
    """benchmark/prefix_cache.py on a tiny model: same tokens, fewer prefill tokens with the cache."""
    import json

    import benchmark.prefix_cache as bench
    from benchmark.prefix_cache import main

    monkeypatch.setattr(bench, "SYSTEM", SYSTEM)  # the tiny tokenizer needs more tokens; its context is 512

    main(["--conversations", "2", "--turns", "2", "--new-tokens", "4", "--model-path", tiny_model_factory("llama")])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    off, on, summary = lines[-3], lines[-2], lines[-1]
    assert summary["token_exact"] and on["cached_tokens"] > 0 == off["cached_tokens"]
    assert on["prefill_tokens_computed"] == off["prefill_tokens_computed"] - on["cached_tokens"]


def test_a_prefill_instance_with_the_cache_hands_over_whole_kv(tiny_model_factory):
    """Disaggregation in one process: a prefill engine with the prefix cache holds each finished
    prompt's KV (the kv_hold hook, as disagg/scheduler.py does) while later prompts hit and evict
    around it; each held KV is copied into a cache-less decode engine's pool, which continues the
    request (admit_prefilled). Outputs equal one plain engine's, and both pools end whole."""
    from sglang_duet import Engine
    from sglang_duet.sampling_params import SamplingParams

    path = tiny_model_factory("llama")
    kw = dict(dtype="float32", chunked_prefill_size=32)
    pre = Engine(model_path=path, max_total_tokens=240, **kw)  # short: the tree must evict
    dec = Engine(model_path=path, disable_radix_cache=True, **kw)
    ref = Engine(model_path=path, disable_radix_cache=True, **kw)
    try:
        prompts = [pre.tokenizer.encode(SYSTEM + q) for q in QUESTIONS[:5]]
        greedy = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
        want = [o["output_ids"] for o in ref.generate(input_ids=prompts, sampling_params=greedy)]
        pcore, held = pre.core.core, {}

        def hold(r, reason):
            if r.rid.startswith("f"):
                return False  # an ordinary request: its KV goes to the tree, unlocked
            held[r.rid] = list(r.kv_slots)
            return True

        pcore.kv_hold = hold
        evicted = []
        evict = pcore.prefix_cache.evict
        pcore.prefix_cache.evict = lambda n: evicted.append(evict(n)) or evicted[-1]
        first, cached = {}, {}
        fillers = [pre.tokenizer.encode(f"{q} Unrelated filler text number {i}, " * 3) for i, q in enumerate(QUESTIONS)]
        order = [("r0", prompts[0]), ("r1", prompts[1])] + [(f"f{i}", f) for i, f in enumerate(fillers[:3])] + \
            [(f"r{i}", prompts[i]) for i in range(2, len(prompts))]
        for rid, p in order:  # one after another: each later one hits the system prompt
            pre.core.add_request(rid, p, SamplingParams(temperature=0.0, max_new_tokens=1))
            while rid not in first:
                for u in pre.core.step():
                    if u.finished:
                        first[u.rid], cached[u.rid] = u.new_token_ids[0], u.cached_tokens
        assert sum(1 for k, v in cached.items() if v > 0 and k.startswith("r")) >= 3, cached
        assert sum(evicted) > 0  # the pool ran short while KV was held: only unheld cache went
        dcore, pool_p, pool_d = dec.core.core, pre.core.kv_pool.buffer, dec.core.kv_pool.buffer
        got = {}
        for i, p in enumerate(prompts):
            rid = f"r{i}"
            slots = dcore.allocator.alloc(len(p))
            pool_d[:, :, slots] = pool_p[:, :, held[rid]]
            assert pcore.release_held(rid) == len(p)
            u = dcore.admit_prefilled(rid, p, first[rid], SamplingParams(**greedy), slots)
            got[rid] = list(u.new_token_ids)
        done = set()
        while len(done) < len(prompts):
            for u in dec.core.step():
                got[u.rid].extend(u.new_token_ids)
                if u.finished:
                    done.add(u.rid)
        assert [got[f"r{i}"] for i in range(len(prompts))] == want
        assert pcore.kv_free == pcore.allocator.capacity and dcore.kv_free == dcore.allocator.capacity
        assert pcore.allocator.available + pcore.prefix_cache.total == pcore.allocator.capacity
    finally:
        for e in (pre, dec, ref):
            e.shutdown()
