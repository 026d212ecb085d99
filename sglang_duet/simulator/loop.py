"""The discrete-event simulator: the real SchedulerCore and policy, the emulated GPU on a virtual clock.

Events are request arrivals (from a workload) and result parts from the emulated executor: the
end of every decode step (its tokens reach the host then) and the end of every launch. Between
events nothing changes, so the clock jumps from one to the next; the core is asked for work after
every event that leaves a lane idle, exactly as the server's scheduler loop would.

Token times are delivery times: a token counts from the moment its result part is applied (the
part's token time, never earlier than the part's arrival), so every TBT is a gap between two
deliveries to the user.

The emulated GPU runs on its own ground truth (`SimConfig.truth`, on by default; see
sglang_duet/cost_model/truth.py), while the policy plans with the plain cost model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from sglang_duet.core.plan import LaneKind
from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.cost_model.roofline import CostModel
from sglang_duet.cost_model.tp import TPCostModel
from sglang_duet.cost_model.truth import TruthConfig
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
    # Tensor parallelism: the emulated GPU is a group of tp_size GPUs and the policy plans with the
    # same TP cost model (cost_model/tp.py); its KV pool is their memory minus the sharded weights.
    tp_size: int = 1
    kv_slots: int | None = None  # None: what the GPUs' memory holds after the weights
    context_length: int | None = None  # None: the model's
    contention: str | None = None  # HBM contention model; None: the truth's (phase; bandwidth when truth is None)
    # The emulated GPU's ground truth (noise, host time, switch cost, per-request attention, its
    # own hardware). None: the exact model, the belief itself. Its seed is the noise generator's.
    truth: TruthConfig | None = field(default_factory=TruthConfig)
    record_launches: bool = False  # keep a LaunchRecord per launch (SimResult.launches)
    # Overlap scheduling (the engine's default): policies that support it plan the next aggregated
    # step while one runs, and the emulated GPU runs them back to back, hiding their host time.
    overlap: bool = True
    policy_options: dict = field(default_factory=dict)
    arrival: dict | None = None  # override the workload's arrival process, e.g. {"process": "poisson"}
    workload_options: dict = field(default_factory=dict)  # other workload-file keys, e.g. {"start": 3000}


@dataclass
class RequestRecord:
    rid: str
    arrival: float
    input_len: int
    output_len: int
    token_times: list[float] = field(default_factory=list)


@dataclass
class LaunchRecord:
    """One launch: what the policy predicted, what the belief prices it at, what the truth took."""

    launch_id: int
    lane: str
    sms: int | None
    steps: int
    tokens: int  # new tokens of its first step
    started: float
    predicted_s: float | None  # the policy's prediction for its lane, if it made one
    belief_s: float  # the cost model the policy plans with, summed over the launch's steps
    actual_s: float  # from its start to its final part, on the emulated GPU's truth


@dataclass
class SimResult:
    config: SimConfig
    records: list[RequestRecord]
    sim_time_s: float  # virtual seconds from the first arrival to the last token
    wall_s: float  # how long the simulation itself took
    stats: dict  # the core's counters plus lane busy time
    launches: list[LaunchRecord] = field(default_factory=list)  # with SimConfig.record_launches


def build_cost_model(model: str, hardware: str, tp_size: int = 1) -> CostModel:
    """The plain roofline for one GPU; a TPCostModel (compute split, all-reduces added) for a group."""
    if tp_size == 1:
        return CostModel.load(model, hardware)
    return TPCostModel.load(model, hardware, tp_size)


def simulate(cfg: SimConfig, specs: list[RequestSpec] | None = None, cost_model: CostModel | None = None,
             max_events: int = 50_000_000) -> SimResult:
    """Run one workload through one policy; every request runs to max_new_tokens (ignore_eos)."""
    t0 = time.perf_counter()
    cm = cost_model or build_cost_model(cfg.model, cfg.hardware, cfg.tp_size)
    if specs is None:
        over = dict(cfg.workload_options)
        if cfg.arrival:
            over["arrival"] = dict(cfg.arrival)
        specs = Workload.load(cfg.workload, **over).sample(cfg.num_requests, cfg.rate, cfg.seed)
    ctx_len = cfg.context_length or cm.model.max_position_embeddings
    ex = EmulatedExecutor(cm, clock_mode="virtual", contention=cfg.contention, truth=cfg.truth)
    policy = load_policy(cfg.policy, PolicyContext(
        chunked_prefill_size=cfg.chunked_prefill_size, tbt_slo_ms=cfg.tbt_slo_ms, ttft_slo_ms=cfg.ttft_slo_ms,
        cost_model=cm, hardware=cm.hw, options=dict(cfg.policy_options),
    ))
    core = SchedulerCore(
        CoreConfig(kv_slots=cfg.kv_slots or emulated_kv_slots(cm), context_length=ctx_len,
                   max_running_requests=cfg.max_running_requests, chunked_prefill_size=cfg.chunked_prefill_size,
                   overlap=cfg.overlap),
        policy, clock=ex.now,
    )
    records: dict[str, RequestRecord] = {}
    order = sorted(range(len(specs)), key=lambda i: specs[i].arrival_s)
    nxt = 0
    n_specs = len(order)
    events = 0
    log: dict | None = {} if cfg.record_launches else None
    launches: list[LaunchRecord] = []
    for events in range(max_events):  # noqa: B007 - reported in stats
        now = ex.now()
        while nxt < n_specs and specs[order[nxt]].arrival_s <= now:
            _admit(core, records, order[nxt], specs[order[nxt]], ctx_len)
            nxt += 1
        while core.can_plan():  # a second round plans the step queued behind the running one (overlap)
            planned = core.schedule()
            for launch in planned:
                ex.submit(launch)
                if log is not None:
                    log[launch.launch_id] = launch
            if not planned:
                break
        done_at = ex.next_completion()
        arrive_at = specs[order[nxt]].arrival_s if nxt < n_specs else math.inf
        if done_at is None and arrive_at == math.inf:
            if core.has_unfinished():
                raise RuntimeError(f"simulation stuck: {core.num_waiting} waiting, {core.num_running} running, "
                                   f"nothing in flight (policy {policy.name})")
            break
        if done_at is not None and done_at <= arrive_at:
            ex.advance_to(done_at)
            for res in ex.poll(0):
                at = ex.now()  # the part reaches the host now: no token of it counts from earlier
                if log is not None and res.final:
                    launches.append(_record(cm, log.pop(res.launch_id), res))
                tt = res.token_times
                for u in core.apply_result(res):
                    n = len(u.new_token_ids)
                    if not n:
                        continue
                    times = tt.get(u.rid)
                    rec = records[u.rid].token_times
                    if times and n == 1:  # the usual part: one step's token
                        t = times[0]
                        rec.append(t if t >= at else at)
                    elif times:
                        rec.extend(t if t >= at else at for t in times[:n])
                    else:
                        rec.extend([max(res.finished_at, at)] * n)
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
             "lane_busy_s": dict(ex.busy_s), "kv_slots": core.allocator.capacity, "events": events,
             "truth": cfg.truth.describe() if cfg.truth is not None else "exact", "contention": ex.contention,
             **{f"truth_{k}": v for k, v in ex.truth_stats.items()}}
    return SimResult(cfg, recs, last - first, time.perf_counter() - t0, stats, launches)


def _record(cm, launch, res) -> LaunchRecord:
    sms = None if launch.lane == LaneKind.AGGREGATED else launch.sms
    steps = max(w.steps for w in launch.work)
    belief = sum(cm.batch_time([(len(w.input_ids), w.start_pos) if j == 0 else (1, w.start_pos + j)
                                for w in launch.work if w.steps > j], sms) for j in range(steps))
    pred = launch.predicted_ms.get(launch.lane.value)
    return LaunchRecord(launch.launch_id, launch.lane.value, launch.sms, steps,
                        sum(len(w.input_ids) for w in launch.work), res.started_at,
                        pred / 1e3 if pred is not None else None, belief, res.finished_at - res.started_at)


def _admit(core: SchedulerCore, records: dict, i: int, spec: RequestSpec, ctx_len: int) -> None:
    rid = f"r{i}"
    # Prompt contents do not matter to the emulated GPU; lengths do. Clip to the context.
    n_in = max(1, min(spec.input_len, ctx_len - 2))
    n_out = max(1, min(spec.output_len, ctx_len - n_in))
    core.add_request(rid, [7] * n_in, SamplingParams(max_new_tokens=n_out, ignore_eos=True), seed=i,
                     arrival_time=spec.arrival_s)
    records[rid] = RequestRecord(rid, spec.arrival_s, n_in, n_out)
