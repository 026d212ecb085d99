"""DuetGPUExecutor on a CPU: the `none` partitioner, one worker thread per lane, the real tiny llama.

Split mode (prefill on one lane, k=3 decode steps on the other) must give the tokens of aggregated
mode, with both lanes in flight at once and results applied at each lane's own cadence; the
k-step decode goes through the partitioned runner's static buffers (graphs need a GPU: tests/gpu)
and is reported step by step (a partial part per step, then the final part). Nothing here depends
on the machine's speed: lane overlap is checked on the order of step marks, delivery on counts and
order.
"""
from __future__ import annotations

import time
from itertools import pairwise

import pytest
import torch

from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, ReqWork
from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.executor.duet_executor import (
    DuetGPUExecutor, HostIdBuffers, PartitionedDecodeRunner, build_duet_executor, build_executor, lane_overlap_s,
    resolve_lanes,
)
from sglang_duet.executor.gpu_executor import GPUModelExecutor
from sglang_duet.executor.model_executor import ModelExecutor
from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend
from sglang_duet.kernels.sm_partition import SMPartitioner
from sglang_duet.memory.kv_pool import KVCachePool
from sglang_duet.model_loader.loader import load_model
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams
from fake_lanes import SplitAlways

SLOTS = 1024


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    torch.manual_seed(0)
    return load_model(tiny_model_factory("llama"), dtype="float32", device="cpu").model


def prompt(i: int, n: int) -> list[int]:
    return [(i * 37 + j * 11) % 300 + 3 for j in range(n)]


# (prompt length, new tokens, sampling) per request; the penalty row takes the eager fallback
REQUESTS = [
    (5, 14, dict(temperature=0.0)),
    (23, 10, dict(temperature=0.0)),
    (40, 12, dict(temperature=0.0)),
    (9, 11, dict(temperature=0.0, repetition_penalty=1.3)),
    (31, 9, dict(temperature=0.8, top_p=0.9, seed=7)),
    (17, 13, dict(temperature=0.0)),
]
ARRIVALS = {0: [0, 1], 3: [2, 3], 6: [4], 9: [5]}  # scheduler iteration -> requests arriving


def serve(model, make_executor, policy, parts: list | None = None, times: dict | None = None):
    """Drive a SchedulerCore like EngineCore.step does; returns (tokens, core, executor, trace).
    parts: gets (lane, launch id, final, rows with tokens) per result; times: rid -> delivery time per token."""
    pool = KVCachePool(model.config.num_hidden_layers, SLOTS, model.config.num_key_value_heads,
                       model.config.head_dim, torch.float32, "cpu")
    core = SchedulerCore(CoreConfig(kv_slots=SLOTS, context_length=512, chunked_prefill_size=16), policy)
    ex = make_executor(pool)
    out: dict[str, list[int]] = {}
    trace = []  # (lane of the applied result, lanes still in flight)
    it = 0
    try:
        while it < 10_000 and (core.has_unfinished() or it <= max(ARRIVALS)):
            for i in ARRIVALS.get(it, []):
                n, new, sp = REQUESTS[i]
                core.add_request(f"r{i}", prompt(i, n), SamplingParams(max_new_tokens=new, **sp), seed=100 + i)
            for launch in core.schedule():
                ex.submit(launch)
            if core.inflight:
                for res in ex.poll(timeout=10.0):
                    lane = core.inflight[res.launch_id].lane
                    if parts is not None:
                        parts.append((lane, res.launch_id, res.final, {r for r, t in res.tokens.items() if t}))
                    for u in core.apply_result(res):
                        out.setdefault(u.rid, []).extend(u.new_token_ids)
                        if times is not None and u.new_token_ids:
                            times.setdefault(u.rid, []).extend(res.token_times[u.rid][:len(u.new_token_ids)])
                    trace.append((lane, {l.lane for l in core.inflight.values()}))
            it += 1
        assert not core.has_unfinished(), "did not finish"
        assert not ex.busy()
    finally:
        ex.shutdown()
    return out, core, ex, trace


def duet(model, cls=DuetGPUExecutor, prefill_attn=TorchAttentionBackend):
    def make(pool):
        part = SMPartitioner(132, 8, 8, backend="none", device="cpu")
        runner = PartitionedDecodeRunner(model, TorchAttentionBackend(), pool, max_bs=16, use_graphs=False)
        return cls(model, pool, runner.attn, "cpu", part, graph_runner=runner, make_attn=prefill_attn)
    return make


@pytest.fixture(scope="module")
def reference(model):
    """Aggregated mode on the plain single-lane executor."""
    out, core, _, _ = serve(model, lambda pool: ModelExecutor(model, pool, TorchAttentionBackend(), torch.device("cpu")),
                            load_policy("aggregated", PolicyContext(chunked_prefill_size=16)))
    assert core.allocator.available == core.allocator.capacity
    assert {k: len(v) for k, v in out.items()} == {f"r{i}": r[1] for i, r in enumerate(REQUESTS)}
    return out


def test_split_mode_gives_aggregated_tokens_with_two_lanes_in_flight(model, reference):
    parts, times = [], {}
    out, core, ex, trace = serve(model, duet(model), SplitAlways(prefill_budget=16, steps=3), parts, times)
    assert out == reference
    # Graph-path decode launches came in 3 per-step parts then an empty final; everything else in one part.
    per_launch: dict[int, list] = {}
    for lane, lid, final, rows in parts:
        per_launch.setdefault(lid, []).append((lane, final, rows))
    stepped = 0
    for lid, got in per_launch.items():
        assert [f for _, f, _ in got] == [False] * (len(got) - 1) + [True], "one final part, last"
        if len(got) > 1:
            stepped += 1
            assert got[0][0] == LaneKind.DECODE and len(got) == 3 + 1 and not got[-1][2]
    assert stepped == ex.stats.paths["graph"] > 0
    # delivery times of a request never go back, and are the host times poll saw them (>= the device's)
    assert all(ts == sorted(ts) for ts in times.values()) and times.keys() == out.keys()
    assert all(d.device_t <= d.seen_t for d in ex.deliveries)
    assert ex.buffers.allocated <= 4  # host id buffers are reused, not allocated per launch
    assert core.stats.plans["split"] > 0 and core.stats.launches["aggregated"] == 0
    assert core.allocator.available == core.allocator.capacity, "KV pool not back to free"
    assert ex.stats.max_lanes_in_flight == 2
    assert lane_overlap_s(ex.intervals) > 0, "prefill and decode never ran at the same time"
    # decodes took the k-step device path (static buffers, ids fed back), the penalty row the eager one,
    # prefills sampled on the device
    assert ex.stats.paths["graph"] > 0 and ex.stats.paths["eager"] > 0 and ex.stats.paths["device"] > 0
    assert ex.stats.splits_used == {32}
    # every path of both lanes gathered its slots from the one shared req-to-token table
    assert ex.table.stats.fallbacks == 0 and ex.table.stats.slots_copied > 0
    assert ex._agg.table is ex._eager_main.table is ex._eager_prefill.table is ex.table
    assert ex.runner.captured() == {}  # CPU: nothing captured, buckets used per partition key
    assert 32 in ex.runner._by_key and ex.runner._by_key[32]
    assert {r.role for r in ex.partitioner.records} == {"decode", "prefill"}


def test_aggregated_plans_through_the_two_lane_executor(model, reference):
    out, core, ex, _ = serve(model, duet(model), load_policy("aggregated", PolicyContext(chunked_prefill_size=16)))
    assert out == reference
    assert ex.stats.launches["aggregated"] > 0 and ex.stats.launches["decode"] == 0
    assert ex.stats.paths["aggregated"] == ex.stats.launches["aggregated"]
    assert core.allocator.available == core.allocator.capacity


class HoldingAttention(TorchAttentionBackend):
    """The prefill lane's attention: the first layer of every forward calls `hold` first."""

    hold = None

    def run(self, layer_id, *args, **kw):
        if layer_id == 0 and self.hold is not None:
            self.hold()
        return super().run(layer_id, *args, **kw)


class HeldPrefill(DuetGPUExecutor):
    """A prefill holds its first layer until a decode launch that started after the hold began has reached
    the scheduler, or until poll() finds no decode launch in flight: a prefill then spans whole decode
    launches on any machine, however fast or loaded (a long prefill on its partition, without a clock)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decode_starts: list[float] = []  # started_at of every decode result handed to the scheduler
        self.decode_idle: list[float] = []  # when _collect found no decode launch in flight
        self.attn_prefill.hold = self._hold

    def _collect(self):
        lanes = {lid: r.launch.lane for lid, r in self._inflight.items()}
        if LaneKind.DECODE not in lanes.values():
            self.decode_idle.append(self.clock())
        out = super()._collect()
        self.decode_starts += [r.started_at for r in out if lanes[r.launch_id] == LaneKind.DECODE]
        return out

    def _hold(self):
        t0 = self.clock()
        with self._cv:  # wake poll() so that it looks at the decode lane again
            self._seq += 1
            self._cv.notify_all()
        while not any(t >= t0 for t in self.decode_starts + self.decode_idle):
            assert self.clock() < t0 + 300, "held prefill never released"  # a hang guard, not a speed bound
            time.sleep(1e-3)


def _overlapping_decodes(intervals) -> set[int]:
    """Decode launches with a step that started before a prefill step ended and ended after it started."""
    pre = [(s, e) for lane, _, s, e in intervals if lane == LaneKind.PREFILL]
    return {lid for lane, lid, s, e in intervals
            if lane == LaneKind.DECODE and any(s < pe and e > ps for ps, pe in pre)}


def test_decode_results_arrive_at_their_own_cadence_during_a_prefill(model, reference):
    out, core, ex, trace = serve(model, duet(model, HeldPrefill, HoldingAttention),
                                 SplitAlways(prefill_budget=16, steps=3))
    assert out == reference
    during = [lane for lane, still in trace if lane == LaneKind.DECODE and LaneKind.PREFILL in still]
    assert len(during) >= 3, "the decode lane did not keep stepping while a prefill ran"
    # the device-side evidence: whole decode launches inside prefill intervals (order of marks, not seconds)
    assert len(_overlapping_decodes(ex.intervals)) >= 3
    assert lane_overlap_s(ex.intervals) > 0
    decode_ids = {lid for lane, lid, _, _ in ex.intervals if lane == LaneKind.DECODE}
    assert len(decode_ids) == ex.stats.launches["decode"]
    assert core.allocator.available == core.allocator.capacity


def _small_pool(model, slots=64):
    return KVCachePool(model.config.num_hidden_layers, slots, model.config.num_key_value_heads, model.config.head_dim,
                       torch.float32, "cpu")


def _decode_work(steps=(4,)):
    """Decode rows with their own step counts (a row asking for fewer steps drops out of the later ones)."""
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_p=0.8, seed=3),
              SamplingParams(temperature=1.0, seed=4)]
    return [ReqWork(f"r{i}", [5 + i], 3, list(range(1 + 12 * i, 13 + 12 * i)), True, steps=k, sampling_seed=50 + i,
                    params=params[i % 3], prompt_ids=[3, 4, 5, 6 + i], output_ids=[9] * i)
            for i, k in enumerate(steps)]


def _parts(ex, launch_id, timeout=10.0):
    """Every part of one launch, in the order poll() returned them, up to its final part."""
    got = []
    while not (got and got[-1].final):
        for res in ex.poll(timeout=timeout):
            assert res.launch_id == launch_id
            got.append(res)
    return got


def _one_part(model, work):
    """The same launch on the single-lane graph executor (CPU: the static-buffer path): one final part."""
    pool = _small_pool(model)
    runner = PartitionedDecodeRunner(model, TorchAttentionBackend(), pool, max_bs=16, use_graphs=False)
    ex = GPUModelExecutor(model, pool, runner.attn, torch.device("cpu"), graph_runner=runner)
    ex.submit(Launch(0, LaneKind.DECODE, LaneBatch(decode=[w.rid for w in work], steps=max(w.steps for w in work)),
                     work))
    (res,) = ex.poll()
    assert res.final and len(ex.deliveries) == max(w.steps for w in work)
    return res


@pytest.mark.parametrize("steps", [(4,), (4, 2, 1)], ids=["one-row", "rows-drop"])
def test_decode_launch_is_reported_step_by_step(model, steps):
    work = _decode_work(steps)
    ex = duet(model)(_small_pool(model))
    try:
        ex.submit(Launch(0, LaneKind.DECODE, LaneBatch(decode=[w.rid for w in work], steps=max(steps)), work, sms=20))
        parts = _parts(ex, 0)
        assert ex.poll(timeout=0) == [] and not ex.busy()
        assert ex.stats.splits_used == {24}  # 20 SMs asked, the grid gives 24
    finally:
        ex.shutdown()
    k = max(steps)
    *partial, final = parts
    # k partial parts: part j holds step j's token of every row still running at step j; then an empty final
    assert len(partial) == k and not any(p.final for p in partial) and final.final
    for j, p in enumerate(partial):
        assert {rid: len(t) for rid, t in p.tokens.items()} == {w.rid: 1 for w in work if w.steps > j}
        assert p.token_times.keys() == p.tokens.keys()
    assert not any(final.tokens.values())
    # the same tokens as the launch reported in one part
    ref = _one_part(model, _decode_work(steps))
    joined = {w.rid: [t for p in partial for t in p.tokens.get(w.rid, [])] for w in work}
    assert joined == ref.tokens and all(len(joined[w.rid]) == w.steps for w in work)
    # delivery times: per request non-decreasing, step j's no earlier than step j's end on the "device"
    steps_iv = [(s, e) for lane, lid, s, e in ex.intervals if lane == LaneKind.DECODE and lid == 0]
    assert len(steps_iv) == k and all(s <= e for s, e in steps_iv)
    assert all(e <= s2 for (_, e), (s2, _) in pairwise(steps_iv))
    for w in work:
        ts = [t for p in partial for t in p.token_times.get(w.rid, [])]
        assert ts == sorted(ts) and all(t >= e for t, (_, e) in zip(ts, steps_iv))
    assert [p.finished_at for p in partial] == sorted(p.finished_at for p in partial)
    # the final part spans the launch on the device: first step's start to last step's end
    assert (final.started_at, final.finished_at) == (steps_iv[0][0], steps_iv[-1][1])
    assert all(p.started_at == final.started_at for p in partial)
    logged = [d for d in ex.deliveries if d.launch_id == 0]
    assert [d.step for d in logged] == list(range(k)) and all(d.device_t <= d.seen_t for d in logged)


class GatedRunner(PartitionedDecodeRunner):
    """Each decode step after a launch's first waits until the test has been handed the previous step's
    tokens: a launch can only finish if its steps are delivered while it runs (no clock involved)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.delivered = lambda: 0  # set by the test: partial parts received so far

    def run(self, *args, **kwargs):
        t0 = time.monotonic()
        while self.delivered() < self.calls:
            assert time.monotonic() < t0 + 60, "step not delivered before the next one was computed"  # hang guard
            time.sleep(1e-3)
        self.calls += 1
        return super().run(*args, **kwargs)


def test_each_step_reaches_the_host_before_the_next_is_computed(model):
    pool = _small_pool(model)
    runner = GatedRunner(model, TorchAttentionBackend(), pool, max_bs=16, use_graphs=False)
    part = SMPartitioner(132, 8, 8, backend="none", device="cpu")
    ex = DuetGPUExecutor(model, pool, runner.attn, "cpu", part, graph_runner=runner)
    got = []
    runner.delivered = lambda: sum(not r.final for r in got)
    try:
        work = _decode_work((4, 4))
        ex.submit(Launch(0, LaneKind.DECODE, LaneBatch(decode=["r0", "r1"], steps=4), work, sms=32))
        while not (got and got[-1].final):
            got.extend(ex.poll(timeout=10))
    finally:
        ex.shutdown()
    assert [r.final for r in got] == [False] * 4 + [True] and runner.calls == 4
    joined = {rid: [t for r in got for t in r.tokens.get(rid, [])] for rid in ("r0", "r1")}
    assert joined == _one_part(model, _decode_work((4, 4))).tokens


def test_host_id_buffers_are_reused_and_held_until_the_final_part_was_applied(model):
    bufs = HostIdBuffers(torch.device("cpu"), cols=16, rows=4, prealloc=2)
    a, b = bufs.acquire(3, 8), bufs.acquire(4, 16)
    assert a is not b and bufs.free == 0 and bufs.allocated == 2
    big = bufs.acquire(9, 20)  # larger than the preallocated shape: its own buffer
    assert tuple(big.shape) == (9, 20) and bufs.allocated == 3
    bufs.release(a)
    assert bufs.acquire(2, 2) is a and bufs.allocated == 3

    ex = duet(model)(_small_pool(model))
    try:
        free0 = ex.buffers.free
        for lid in range(3):  # launch after launch: no new buffer
            work = _decode_work((3,))
            ex.submit(Launch(lid, LaneKind.DECODE, LaneBatch(decode=["r0"], steps=3), work, sms=32))
            parts = _parts(ex, lid)
            assert parts[-1].final
            assert ex.buffers.free == free0 - 1, "handed back before the caller applied the final part"
        assert ex.poll(timeout=0) == [] and ex.buffers.free == free0  # the next poll hands it back
        assert ex.buffers.allocated == 2
    finally:
        ex.shutdown()


class PlanLog(TorchAttentionBackend):
    """An attention backend that plans ahead like FlashInfer's (plan_now) and logs (what, when)."""

    def __init__(self):
        super().__init__()
        self.log: list[tuple[str, float]] = []

    def plan(self, fb):
        self.log.append(("plan", time.monotonic()))
        super().plan(fb)

    def plan_now(self, q_dtype, kv_dtype):
        self.log.append((f"plan_now {q_dtype} {kv_dtype}", time.monotonic()))

    def run(self, layer_id, *args, **kw):
        self.log.append((f"run{layer_id}", time.monotonic()))
        return super().run(layer_id, *args, **kw)


def test_prefill_step_is_timed_from_after_its_plan(model):
    """The prefill lane plans (plan_now included) before its first-kernel mark, and the forward does not
    plan again; the launch is one interval from that mark to its end."""
    pool = KVCachePool(model.config.num_hidden_layers, 64, model.config.num_key_value_heads, model.config.head_dim,
                       torch.float32, "cpu")
    ex = duet(model, prefill_attn=PlanLog)(pool)
    try:
        w = ReqWork("a", [5, 6, 7], 0, [1, 2, 3], True, params=SamplingParams(temperature=0.0))
        ex.submit(Launch(0, LaneKind.PREFILL, LaneBatch(), [w], sms=100))
        (res,) = ex.poll(timeout=10)
        log = ex.attn_prefill.log
        assert [what for what, _ in log[:3]] == ["plan", "plan_now torch.float32 torch.float32", "run0"]
        assert [what for what, _ in log].count("plan") == 1
        assert log[1][1] <= res.started_at <= log[2][1]
        assert [(s, e) for lane, _, s, e in ex.intervals] == [(res.started_at, res.finished_at)]
        assert ex.stats.paths["device"] == 1
    finally:
        ex.shutdown()


def test_a_failing_launch_is_reported_by_poll(model):
    pool = KVCachePool(model.config.num_hidden_layers, 64, model.config.num_key_value_heads, model.config.head_dim,
                       torch.float32, "cpu")
    ex = duet(model)(pool)
    try:
        bad = ReqWork("a", [5, 6], 0, [1], True, params=SamplingParams(temperature=0.0))  # too few KV slots
        ex.submit(Launch(0, LaneKind.PREFILL, LaneBatch(), [bad], sms=100))
        with pytest.raises(RuntimeError, match="prefill lane: launch 0 failed"):
            ex.poll(timeout=10)
        assert not ex.busy()
    finally:
        ex.shutdown()


def test_lanes_flag_and_factory(model):
    assert resolve_lanes("auto", "cpu", "duet") == 1 and resolve_lanes("auto", "cuda", "duet") == 2
    assert resolve_lanes("auto", "cuda", "aggregated") == 1 and resolve_lanes("2", "cpu", "aggregated") == 2
    assert resolve_lanes(None, "cuda", "static-split") == 2
    with pytest.raises(ValueError, match="--lanes"):
        resolve_lanes("3", "cpu", "duet")
    pool = KVCachePool(model.config.num_hidden_layers, 64, model.config.num_key_value_heads, model.config.head_dim,
                       torch.float32, "cpu")

    class Args:
        policy = "duet"
        hardware = "h100"
        extra = {}

    assert type(build_executor(model, pool, TorchAttentionBackend(), "cpu", Args())) is ModelExecutor
    Args.extra = {"lanes": "2"}
    ex = build_executor(model, pool, TorchAttentionBackend(), "cpu", Args())
    try:
        assert isinstance(ex, DuetGPUExecutor) and ex.concurrent_lanes
        assert ex.partitioner.backend == "none" and ex.partitioner.grid()[-1] == 120
        assert isinstance(ex.runner, PartitionedDecodeRunner) and not ex.runner.use_graphs
    finally:
        ex.shutdown()
    ex = build_duet_executor(model, pool, TorchAttentionBackend(), "cpu")
    ex.shutdown()


def _prepared(model, capture) -> list[int]:
    pool = KVCachePool(model.config.num_hidden_layers, 64, model.config.num_key_value_heads, model.config.head_dim,
                       torch.float32, "cpu")

    class Args:
        hardware = "h100"
        duet_capture_sms = capture
        extra = {}

    ex = build_duet_executor(model, pool, TorchAttentionBackend(), "cpu", Args())
    ex.shutdown()
    assert ex.runner.captured() == {}  # CPU: splits only, no graphs
    return [r.requested for r in ex.partitioner.records if r.role == "decode"]


def test_factory_prepares_the_decode_splits(model):
    assert _prepared(model, [16, 40]) == [16, 40]
    assert _prepared(model, "16,24") == [16, 24]
    assert _prepared(model, []) == []
    assert _prepared(model, None) == list(range(8, 121, 8))  # the whole grid
    assert _prepared(model, [200, 32]) == [32]  # off the grid: logged and left to the lazy path
