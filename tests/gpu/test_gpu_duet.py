"""Duet on the GPU: green-context SM partitions and the two-lane executor.

What a CPU cannot check: that a partition of S SMs really runs kernels on S SMs (a GEMM takes
about total/S times longer), that a memory-bound decode step keeps most of its speed on 32 SMs,
that a CUDA graph captured on a partition stays confined when replayed, that split mode gives
aggregated mode's tokens with real streams and graphs, and that calibration writes a file the
cost model loads. Measured facts go to $DUET_GPU_FACTS (JSON) when set, for docs/gpu-notes.md.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from gpu_common import GPU, SMALL_CONFIG, requires_flashinfer, requires_triton, small_model
from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.cost_model.hardware import HardwareSpec
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.memory.kv_pool import KVCachePool
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams
from fake_lanes import SplitAlways

pytestmark = GPU

FACTS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _facts():
    yield
    path = os.environ.get("DUET_GPU_FACTS")
    if path and FACTS:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        old = {}
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
        old.update(FACTS)
        with open(path, "w") as f:
            json.dump(old, f, indent=2, default=str)


def _hardware() -> str:
    return "h200" if "H200" in torch.cuda.get_device_name(0) else "h100"


@pytest.fixture(scope="module")
def part():
    from sglang_duet.kernels.sm_partition import SMPartitioner

    p = SMPartitioner.for_device("cuda", HardwareSpec.load(_hardware()), backend="auto")
    FACTS["partition_backend"] = p.backend
    if p.backend == "none":
        pytest.skip("no green-context backend here (install cuda-bindings, or torch with green contexts)")
    return p


def _host_time(stream, fn, iters: int, warmup: int = 2) -> float:
    """Seconds per call, by device synchronisation around `iters` calls issued on `stream` (robust
    whatever CUDA events do across green contexts)."""
    ctx = torch.cuda.stream(stream) if stream is not None else torch.cuda.stream(torch.cuda.current_stream())
    with ctx:
        for _ in range(warmup):
            fn()
        _sync(stream)
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(stream)
    return (time.perf_counter() - t) / iters


def _sync(stream) -> None:
    """The stream, then the device (a device synchronisation may not cover a green context's streams)."""
    if stream is not None:
        stream.synchronize()
    torch.cuda.synchronize()


def test_split_grants_and_disjoint_contexts(part):
    sp = part.split(32)
    FACTS["split_32"] = {"decode_granted": sp.decode_granted, "prefill_granted": sp.prefill_granted,
                         "disjoint": sp.disjoint}
    FACTS["granted_single"] = {s: part.granted(s) for s in (8, 9, 16, 64, 120)}
    assert sp.decode_granted >= 32 and sp.decode_stream is not None and sp.prefill_stream is not None
    if part.backend == "cuda":
        assert sp.disjoint and sp.decode_granted + sp.prefill_granted <= part.total
        assert part.granted(9) in (16, 9), "Hopper grants multiples of 8"
    assert part.split(30) is sp


def test_gemm_takes_about_total_over_s_longer(part):
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    full = _host_time(None, lambda: a @ b, 10)
    ratios = {}
    for s in (8, 32, 64):
        t = _host_time(part.stream(s), lambda: a @ b, 5)
        ratios[s] = {"measured": t / full, "expected": part.total / part.granted(s)}
    FACTS["gemm_8192_ratio_vs_full"] = ratios
    FACTS["gemm_8192_full_tflops"] = 2 * n ** 3 / full / 1e12
    for s, r in ratios.items():
        assert 0.6 * r["expected"] <= r["measured"] <= 1.5 * r["expected"], (s, r)


# A memory-bound model: ~2B parameters (4 GB in bf16), so a decode step reads weights, not launches.
MID_CONFIG = dict(SMALL_CONFIG, hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000)


def _attn(name, cfg):
    if name == "triton":
        from sglang_duet.kernels.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(cfg.num_key_value_heads)
    from sglang_duet.kernels.attention.flashinfer_backend import FlashInferAttentionBackend

    return FlashInferAttentionBackend(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, "cuda")


@requires_triton
def test_decode_step_on_32_sms_keeps_most_of_its_speed(part, tmp_path):
    from sglang_duet.executor.duet_executor import PartitionedDecodeRunner
    from sglang_duet.model_loader.loader import load_model

    path = tmp_path / "mid.json"
    path.write_text(json.dumps(MID_CONFIG))
    model = load_model(None, load_format="dummy", model_config_path=str(path), dtype="bfloat16", device="cuda").model
    cfg = model.config
    ctx = 512
    pool = KVCachePool(cfg.num_hidden_layers, 8 * (ctx + 1) + 16, cfg.num_key_value_heads, cfg.head_dim,
                       torch.bfloat16, "cuda")
    runner = PartitionedDecodeRunner(model, _attn("triton", cfg), pool, max_bs=8)
    out = {}
    for bs in (1, 8):
        table = torch.arange(1, 1 + bs * (ctx + 1), device="cuda").view(bs, ctx + 1)
        kv, loc = table.reshape(-1), table[:, ctx]
        ids = torch.randint(0, cfg.vocab_size, (bs,), device="cuda")
        times = {}
        for key, stream in ((None, None), (32, part.split(32).decode_stream)):
            runner.select(key, stream)
            times[key] = _host_time(stream, lambda: runner.run(ids, [ctx] * bs, loc, [ctx + 1] * bs, kv), 20)
        out[bs] = {"full_ms": times[None] * 1e3, "sms32_ms": times[32] * 1e3, "speed_kept": times[None] / times[32]}
    runner.select(None)
    FACTS["decode_2b_on_32_sms"] = out
    FACTS["decode_2b_predicted_speed_kept_b1"] = (
        CostModel(cfg, HardwareSpec.load(_hardware())).decode_time(1, ctx)
        / CostModel(cfg, HardwareSpec.load(_hardware())).decode_time(1, ctx, sms=32))
    assert 32 in runner.captured() and None in runner.captured()
    for bs, r in out.items():
        assert r["speed_kept"] >= 0.5, (bs, r)  # "most of its speed": the estimate is ~0.7


def test_graph_captured_on_a_partition_stays_confined(part):
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)

    def capture(stream):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            for _ in range(2):
                a @ b
            g.capture_begin(capture_error_mode="thread_local")
            out = a @ b
            g.capture_end()
        _sync(stream)
        return g, out

    s8 = part.stream(8)
    g_full, _ = capture(torch.cuda.Stream())
    g8, _ = capture(s8)
    full = _host_time(None, g_full.replay, 10)
    on_partition = _host_time(s8, g8.replay, 3)
    on_default = _host_time(None, g8.replay, 3)
    expected = part.total / part.granted(8)
    FACTS["graph_gemm_8sms"] = {"replay_on_partition_ratio": on_partition / full,
                                "replay_on_default_stream_ratio": on_default / full, "expected": expected}
    # The executor replays a partition's graphs on that partition's stream: confined there.
    assert on_partition / full >= 0.5 * expected


def test_timing_events_on_partition_streams(part):
    """EventTimer maps events recorded on green-context streams onto the host clock."""
    from sglang_duet.executor.duet_executor import EventTimer

    timer = EventTimer(torch.device("cuda"))
    sp = part.split(32)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t0 = time.monotonic()
    marks = []
    for stream in (sp.decode_stream, sp.prefill_stream):
        with torch.cuda.stream(stream):
            for _ in range(20):
                a @ a
            marks.append(timer.mark())
    _sync(sp.decode_stream)
    _sync(sp.prefill_stream)
    t1 = time.monotonic()
    hosts = [timer.host_time(m) for m in marks]
    FACTS["events_on_green_streams"] = {"host_times_within": [h - t0 for h in hosts], "window": t1 - t0}
    assert all(t0 - 1e-3 <= h <= t1 + 1e-3 for h in hosts)


# ---- split mode end to end --------------------------------------------------------------------

def _serve(model, ex, policy, prompts, new, parts: list | None = None):
    """parts: gets (launch id, final, lane) per result, in the order poll() returned them."""
    slots = 4096
    core = SchedulerCore(CoreConfig(kv_slots=slots, context_length=2048, chunked_prefill_size=64), policy)
    out: dict[str, list[int]] = {}
    arrivals = {3 * i: [i] for i in range(len(prompts))}
    it = 0
    try:
        while it < 20_000 and (core.has_unfinished() or it <= max(arrivals)):
            for i in arrivals.get(it, []):
                core.add_request(f"r{i}", prompts[i], SamplingParams(temperature=0.0, max_new_tokens=new), seed=i)
            for launch in core.schedule():
                ex.submit(launch)
            if core.inflight:
                for res in ex.poll(timeout=30.0):
                    if parts is not None:
                        parts.append((res.launch_id, res.final, core.inflight[res.launch_id].lane))
                    for u in core.apply_result(res):
                        out.setdefault(u.rid, []).extend(u.new_token_ids)
            it += 1
        assert not core.has_unfinished()
        assert core.allocator.available == core.allocator.capacity
    finally:
        ex.shutdown()
    return out


def _duet(model, attn_name, part):
    from sglang_duet.executor.duet_executor import build_duet_executor

    cfg = model.config
    pool = KVCachePool(cfg.num_hidden_layers, 4096, cfg.num_key_value_heads, cfg.head_dim,
                       next(model.parameters()).dtype, "cuda")

    class Args:
        cuda_graph_max_bs = 16
        duet_capture_sms = [32]  # SplitAlways's split: captured up front, not inside the run
        extra = {}

    return build_duet_executor(model, pool, _attn(attn_name, cfg), "cuda", Args(), partitioner=part,
                               make_attn=lambda: _attn(attn_name, cfg))


BACKENDS = [pytest.param("triton", "float32", marks=requires_triton),
            pytest.param("flashinfer", "bfloat16", marks=requires_flashinfer)]


@pytest.mark.parametrize("attn_name,dtype", BACKENDS)
def test_split_mode_tokens_match_aggregated(part, tmp_path, attn_name, dtype):
    from sglang_duet.executor.duet_executor import lane_overlap_s

    model = small_model(tmp_path, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (9, 300, 40, 700, 17, 150)]
    new = 24
    ref = _serve(model, _duet(model, attn_name, part), load_policy("aggregated", PolicyContext(chunked_prefill_size=64)),
                 prompts, new)
    ex = _duet(model, attn_name, part)
    parts = []
    got = _serve(model, ex, SplitAlways(prefill_budget=64, steps=4), prompts, new, parts)
    overlap = lane_overlap_s(ex.intervals)
    FACTS[f"split_{attn_name}_{dtype}"] = {"paths": ex.stats.paths, "lane_overlap_s": overlap,
                                            "captured": {str(k): v for k, v in ex.runner.captured().items()},
                                            "delivery": _delivery_facts(ex), "host_id_buffers": ex.buffers.allocated}
    assert ex.stats.paths["graph"] > 0 and 32 in ex.runner.captured()
    # per-step delivery: every graph-path decode launch came as 4 partial parts (one per step) then a final
    per_launch: dict = {}
    for lid, final, lane in parts:
        per_launch.setdefault(lid, []).append((final, lane))
    stepped = [v for v in per_launch.values() if len(v) > 1]
    assert all([f for f, _ in v] == [False] * 4 + [True] and v[0][1].value == "decode" for v in stepped)
    assert len(stepped) == ex.stats.paths["graph"]
    assert ex.buffers.allocated <= 4, "pinned id buffers allocated per launch instead of reused"
    assert overlap > 0, "the prefill and decode lanes never ran at the same time on the device"
    if dtype == "float32":
        assert got == ref
    else:  # bf16: a different batch composition may flip a near-tie; most tokens must agree
        agree = sum(a == b for k in ref for a, b in zip(ref[k], got[k])) / sum(len(v) for v in ref.values())
        FACTS[f"split_{attn_name}_{dtype}"]["agreement"] = agree
        assert all(got[k][:4] == ref[k][:4] for k in ref) and agree >= 0.9


def _delivery_facts(ex) -> dict:
    """How late the host saw each decode step after its event (poll cadence + GIL), and how many steps
    reached the host while their launch still ran on the device (per-step delivery at work)."""
    import statistics

    ds = [d for d in ex.deliveries if d.lane == "decode"]
    if not ds:
        return {}
    lag = sorted((d.seen_t - d.device_t) * 1e3 for d in ds)
    last = {}
    for d in ds:
        last[d.launch_id] = max(last.get(d.launch_id, 0.0), d.device_t)
    early = sum(d.seen_t < last[d.launch_id] for d in ds)
    return {"steps": len(ds), "lag_ms_median": statistics.median(lag), "lag_ms_max": lag[-1],
            "lag_ms_min": lag[0], "seen_before_launch_end": early}


@requires_triton
def test_decode_steps_are_delivered_while_the_launch_runs(part, tmp_path):
    """One 8-step decode launch on a 32-SM partition, polled without a host sync: 8 partial parts in order,
    then the final part; tokens equal the single-lane executor's (fp32 + Triton). How many steps reached the
    host before the launch's last step ended on the device is recorded (a fact, not asserted: it depends
    on the step time vs the poll cadence)."""
    from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, ReqWork
    from sglang_duet.executor.gpu_executor import GPUModelExecutor
    from sglang_duet.kernels.cuda_graph import CudaGraphDecodeRunner
    from sglang_duet.kernels.attention.torch_backend import TorchAttentionBackend
    from sglang_duet.kernels.attention.base import ForwardBatch

    model = small_model(tmp_path, dtype="float32")
    cfg = model.config
    steps, n = 8, 6
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 1000, (30 + 20 * i,), generator=g).tolist() for i in range(n)]
    slot_lists, nxt = [], 1
    for p in prompts:
        slot_lists.append(list(range(nxt, nxt + len(p) + steps)))
        nxt += len(p) + steps

    def launch():
        work = [ReqWork(f"r{i}", [p[-1]], len(p) - 1, s, True, steps=steps, sampling_seed=i,
                        params=SamplingParams(temperature=0.0), prompt_ids=list(p))
                for i, (p, s) in enumerate(zip(prompts, slot_lists))]
        return Launch(0, LaneKind.DECODE, LaneBatch(decode=[w.rid for w in work], steps=steps), work, sms=32)

    def pool():
        kv = KVCachePool(cfg.num_hidden_layers, 4096, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cuda")
        fb = ForwardBatch.build([(p[:-1], 0, s[: len(p) - 1], True) for p, s in zip(prompts, slot_lists)], "cuda")
        model(fb, TorchAttentionBackend(), kv)
        torch.cuda.synchronize()
        return kv

    kv = pool()
    ref_ex = GPUModelExecutor(model, kv, _attn("triton", cfg), torch.device("cuda"),
                              graph_runner=CudaGraphDecodeRunner(model, _attn("triton", cfg), kv, max_bs=8))
    ref_ex.submit(launch())
    (ref,) = ref_ex.poll()

    from sglang_duet.executor.duet_executor import build_duet_executor

    class Args:
        cuda_graph_max_bs = 8
        duet_capture_sms = [32]
        extra = {}

    ex = build_duet_executor(model, pool(), _attn("triton", cfg), "cuda", Args(), partitioner=part,
                             make_attn=lambda: _attn("triton", cfg))
    got = []
    try:
        ex.submit(launch())
        while not (got and got[-1].final):
            got.extend(ex.poll(timeout=30.0))
    finally:
        ex.shutdown()
    assert [r.final for r in got] == [False] * steps + [True]
    joined = {rid: [t for r in got for t in r.tokens.get(rid, [])] for rid in ref.tokens}
    assert joined == ref.tokens
    seen = [r.finished_at for r in got[:-1]]
    assert seen == sorted(seen)
    FACTS["per_step_delivery_8_steps"] = dict(_delivery_facts(ex), launch_device_ms=(got[-1].finished_at
                                                                                     - got[-1].started_at) * 1e3)


@requires_triton
def test_calibration_quick_writes_a_loadable_file(tmp_path):
    from sglang_duet import calibrate

    cfg = tmp_path / "small.json"
    cfg.write_text(json.dumps(SMALL_CONFIG))
    out = tmp_path / "cal.yaml"
    assert calibrate.main(["--quick", "--model-config", str(cfg), "--hardware", _hardware(), "--out", str(out),
                           "--attention-backend", "triton", "--quiet"]) == 0
    spec = HardwareSpec.load(out)
    pts = spec.curves.compute.points
    FACTS["calibration_quick"] = {"compute": pts, "bandwidth": spec.curves.bandwidth.points,
                                  "measured": spec.measured}
    assert len(pts) >= 2 and pts[-1][1] > 3 * pts[0][1], "compute should grow with the SM count"
    assert CostModel.load("qwen3-8b", str(out)).decode_time(1, 1024, sms=32) > 0
