"""The discrete-event simulator: the real SchedulerCore and policy, the emulated GPU on a virtual clock.

Events are request arrivals (from a workload) and launch completions (from the emulated
executor). Between events nothing changes, so the clock jumps from one to the next; the core
is asked for work after every event, exactly as the server's scheduler loop would.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.executor.emulated import EmulatedExecutor, emulated_kv_slots
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams
from sglang_duet.workloads import RequestSpec, Workload


@dataclass
class SimConfig:
    policy: str = "chunked"
    hardware: str = "h100"
    model: str = "qwen3-8b"
    workload: str = "azure-conv"
    rate: float = 4.0  # req/s
    num_requests: int = 500
    seed: int = 0
    tbt_slo_ms: float = 100.0
    ttft_slo_ms: float = 1000.0
    chunked_prefill_size: int = 2048
    max_running_requests: int = 256
    kv_slots: int | None = None  # None: what the GPU's memory holds after the weights
    context_length: int | None = None  # None: the model's
    contention: str = "bandwidth"
    policy_options: dict = field(default_factory=dict)
    arrival: dict | None = None  # override the workload's arrival process, e.g. {"process": "poisson"}


@dataclass
class RequestRecord:
    rid: str
    arrival: float
    input_len: int
    output_len: int
    token_times: list[float] = field(default_factory=list)


@dataclass
class SimResult:
    config: SimConfig
    records: list[RequestRecord]
    sim_time_s: float  # virtual seconds from the first arrival to the last token
    wall_s: float  # how long the simulation itself took
    stats: dict  # the core's counters plus lane busy time


def build_cost_model(model: str, hardware: str) -> CostModel:
    return CostModel.load(model, hardware)


def simulate(cfg: SimConfig, specs: list[RequestSpec] | None = None, cost_model: CostModel | None = None,
             max_events: int = 50_000_000) -> SimResult:
    """Run one workload through one policy; every request runs to max_new_tokens (ignore_eos)."""
    t0 = time.perf_counter()
    cm = cost_model or build_cost_model(cfg.model, cfg.hardware)
    if specs is None:
        over = {"arrival": dict(cfg.arrival)} if cfg.arrival else {}
        specs = Workload.load(cfg.workload, **over).sample(cfg.num_requests, cfg.rate, cfg.seed)
    ctx_len = cfg.context_length or cm.model.max_position_embeddings
    ex = EmulatedExecutor(cm, clock_mode="virtual", contention=cfg.contention)
    policy = load_policy(cfg.policy, PolicyContext(
        chunked_prefill_size=cfg.chunked_prefill_size, tbt_slo_ms=cfg.tbt_slo_ms, ttft_slo_ms=cfg.ttft_slo_ms,
        cost_model=cm, hardware=cm.hw, options=dict(cfg.policy_options),
    ))
    core = SchedulerCore(
        CoreConfig(kv_slots=cfg.kv_slots or emulated_kv_slots(cm), context_length=ctx_len,
                   max_running_requests=cfg.max_running_requests, chunked_prefill_size=cfg.chunked_prefill_size),
        policy, clock=ex.now,
    )
    records: dict[str, RequestRecord] = {}
    order = sorted(range(len(specs)), key=lambda i: specs[i].arrival_s)
    nxt = 0
    for _ in range(max_events):
        now = ex.now()
        while nxt < len(order) and specs[order[nxt]].arrival_s <= now:
            _admit(core, records, order[nxt], specs[order[nxt]], ctx_len)
            nxt += 1
        for launch in core.schedule():
            ex.submit(launch)
        done_at = ex.next_completion()
        arrive_at = specs[order[nxt]].arrival_s if nxt < len(order) else math.inf
        if done_at is None and arrive_at == math.inf:
            if core.has_unfinished():
                raise RuntimeError(f"simulation stuck: {core.num_waiting} waiting, {core.num_running} running, "
                                   f"nothing in flight (policy {policy.name})")
            break
        if done_at is not None and done_at <= arrive_at:
            ex.advance_to(done_at)
            for res in ex.poll(0):
                for u in core.apply_result(res):
                    n = len(u.new_token_ids)
                    if n:
                        times = res.token_times.get(u.rid) or [res.finished_at] * n
                        records[u.rid].token_times.extend(times[:n])
        else:
            ex.advance_to(arrive_at)
    else:
        raise RuntimeError(f"simulation did not finish within {max_events} events")
    recs = list(records.values())
    first = min((r.arrival for r in recs), default=0.0)
    last = max((r.token_times[-1] for r in recs if r.token_times), default=first)
    s = core.stats
    stats = {"launches": dict(s.launches), "plans": dict(s.plans), "retractions": s.retractions,
             "generated_tokens": s.generated_tokens, "prompt_tokens": s.prompt_tokens,
             "lane_busy_s": dict(ex.busy_s), "kv_slots": core.allocator.capacity}
    return SimResult(cfg, recs, last - first, time.perf_counter() - t0, stats)


def _admit(core: SchedulerCore, records: dict, i: int, spec: RequestSpec, ctx_len: int) -> None:
    rid = f"r{i}"
    # Prompt contents do not matter to the emulated GPU; lengths do. Clip to the context.
    n_in = max(1, min(spec.input_len, ctx_len - 2))
    n_out = max(1, min(spec.output_len, ctx_len - n_in))
    core.add_request(rid, [7] * n_in, SamplingParams(max_new_tokens=n_out, ignore_eos=True), seed=i,
                     arrival_time=spec.arrival_s)
    records[rid] = RequestRecord(rid, spec.arrival_s, n_in, n_out)
