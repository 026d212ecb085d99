"""DuetGPUExecutor on a CPU: the `none` partitioner, one worker thread per lane, the real tiny llama.

Split mode (prefill on one lane, k=3 decode steps on the other) must give the tokens of aggregated
mode, with both lanes in flight at once and results applied at each lane's own cadence; the
k-step decode goes through the partitioned runner's static buffers (graphs need a GPU: tests/gpu).
Nothing here depends on the machine's speed: lane overlap is checked on the order of step marks.
"""
from __future__ import annotations

import time
from itertools import pairwise

import pytest
import torch

from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, ReqWork
from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.executor.duet_executor import (
    DuetGPUExecutor, PartitionedDecodeRunner, build_duet_executor, build_executor, lane_overlap_s, resolve_lanes,
)
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


def serve(model, make_executor, policy):
    """Drive a SchedulerCore like EngineCore.step does; returns (tokens, core, executor, trace)."""
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
                    for u in core.apply_result(res):
                        out.setdefault(u.rid, []).extend(u.new_token_ids)
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
    out, core, ex, trace = serve(model, duet(model), SplitAlways(prefill_budget=16, steps=3))
    assert out == reference
    assert core.stats.plans["split"] > 0 and core.stats.launches["aggregated"] == 0
    assert core.allocator.available == core.allocator.capacity, "KV pool not back to free"
    assert ex.stats.max_lanes_in_flight == 2
    assert lane_overlap_s(ex.intervals) > 0, "prefill and decode never ran at the same time"
    # decodes took the k-step device path (static buffers, ids fed back), the penalty row the eager one,
    # prefills sampled on the device
    assert ex.stats.paths["graph"] > 0 and ex.stats.paths["eager"] > 0 and ex.stats.paths["device"] > 0
    assert ex.stats.splits_used == {32}
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

    def run(self, layer_id, *args):
        if layer_id == 0 and self.hold is not None:
            self.hold()
        return super().run(layer_id, *args)


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


def test_token_times_are_per_step_and_ordered(model):
    pool = KVCachePool(model.config.num_hidden_layers, 64, model.config.num_key_value_heads, model.config.head_dim,
                       torch.float32, "cpu")
    ex = duet(model)(pool)
    try:
        w = ReqWork("a", [5], 3, list(range(1, 9)), True, steps=4, params=SamplingParams(temperature=0.0),
                    prompt_ids=[3, 4, 5, 6])
        ex.submit(Launch(0, LaneKind.DECODE, LaneBatch(decode=["a"], steps=4), [w], sms=20))
        (res,) = ex.poll(timeout=10)
        assert len(res.tokens["a"]) == 4 and res.token_times["a"] == sorted(res.token_times["a"])
        assert res.started_at <= res.token_times["a"][0] and res.finished_at == res.token_times["a"][-1]
        assert ex.stats.splits_used == {24}  # 20 SMs asked, the grid gives 24
        assert ex.poll(timeout=0) == [] and not ex.busy()
        # one interval per step, in order, each ending at its token's time; the launch starts at its first step
        steps = [(s, e) for lane, lid, s, e in ex.intervals if lane == LaneKind.DECODE and lid == 0]
        assert len(steps) == 4 and [e for _, e in steps] == res.token_times["a"]
        assert all(s <= e for s, e in steps) and all(e <= s2 for (_, e), (s2, _) in pairwise(steps))
        assert res.started_at == steps[0][0]
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

    def run(self, layer_id, *args):
        self.log.append((f"run{layer_id}", time.monotonic()))
        return super().run(layer_id, *args)


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
