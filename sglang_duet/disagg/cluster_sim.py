"""Discrete-event simulation of disaggregated serving: prefill and decode instances on emulated GPUs.

Each instance is the real SchedulerCore + policy on an EmulatedExecutor (virtual clock), as in
`sglang_duet/simulator/loop.py`; all instances share one clock. The protocol is the server's
(sglang_duet/disagg/prefill_scheduler.py, decode_scheduler.py), in virtual time:

  arrival -> the prefill instance with the fewest queued prompt tokens (max_new_tokens 1)
  -> first token: the prefill keeps the KV (the core's kv_hold hook) and the request queues (FIFO)
     at the decode instance with the most free KV
  -> when the decode instance has room: slots allocated, transfer of bytes / link bandwidth
  -> transfer done: the prefill frees its slots; the decode admits the request
     (SchedulerCore.admit_prefilled, the hook the real decode instance uses) and decodes it.

Every instance's emulated GPU runs on the same ground truth as the colocated simulator's
(`ClusterConfig.truth`, on by default: noise, host time per step, per-request attention, its own
curves; sglang_duet/cost_model/truth.py), each instance with its own noise stream (seed + index),
so disaggregated and colocated policies are compared on one truth. `truth=None`: the exact model.

Tensor parallelism is modelled (sglang_duet/cost_model/tp.py `TPCostModel`): an instance of tp GPUs
has tp times the compute, memory bandwidth and memory of one, plus two ring all-reduces per layer of
the activations (tokens x hidden x 2 bytes) over the hardware file's link. The first token's time is the prefill's (as in
DistServe); the gap to the second token includes the queueing at the decode instance and the
transfer.

`phase="prefill"` simulates a prefill instance alone (requests end at their first token) and
`phase="decode"` a decode instance alone (requests arrive prefilled, their first token at the
arrival): DistServe's per-phase goodputs, which its placement search needs.
"""
from __future__ import annotations

import dataclasses
import heapq
import time
from collections import deque
from dataclasses import dataclass, field

from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore
from sglang_duet.cost_model.tp import LinkSpec, TPCostModel, load_tp_cost_model
from sglang_duet.cost_model.truth import TruthConfig
from sglang_duet.executor.emulated import EmulatedExecutor, emulated_kv_slots
from sglang_duet.policies.base import PolicyContext, load_policy
from sglang_duet.sampling_params import SamplingParams
from sglang_duet.simulator.loop import RequestRecord, SimConfig, SimResult
from sglang_duet.workloads import RequestSpec, Workload


@dataclass
class InstanceSpec:
    policy: str = "aggregated"
    chunked_prefill_size: int = 8192
    max_running_requests: int = 256  # per GPU of the instance
    policy_options: dict = field(default_factory=dict)


@dataclass
class ClusterConfig:
    n_prefill: int = 1
    tp_prefill: int = 1
    n_decode: int = 1
    tp_decode: int = 1
    prefill: InstanceSpec = field(default_factory=InstanceSpec)
    decode: InstanceSpec = field(default_factory=InstanceSpec)
    model: str = "qwen3-8b"
    hardware: str = "h100"
    link: LinkSpec | None = None  # None: the hardware file's link (cost_model/tp.py)
    tbt_slo_ms: float = 100.0
    ttft_slo_ms: float = 1000.0
    # The emulated GPUs' ground truth, as SimConfig.truth (None: the exact model, the policies' belief)
    truth: TruthConfig | None = field(default_factory=TruthConfig)

    @property
    def gpus(self) -> int:
        return self.n_prefill * self.tp_prefill + self.n_decode * self.tp_decode


class _Instance:
    def __init__(self, role: str, cm: TPCostModel, spec: InstanceSpec, cfg: ClusterConfig, ctx_len: int,
                 index: int = 0):
        self.role = role
        self.cm = cm
        truth = cfg.truth
        if truth is not None:
            truth = dataclasses.replace(truth, seed=truth.seed + index)  # each GPU its own noise
        # One lane per instance (aggregated policies): no contention between lanes to model.
        self.ex = EmulatedExecutor(cm, clock_mode="virtual", contention="bandwidth", truth=truth)
        policy = load_policy(spec.policy, PolicyContext(
            chunked_prefill_size=spec.chunked_prefill_size, tbt_slo_ms=cfg.tbt_slo_ms, ttft_slo_ms=cfg.ttft_slo_ms,
            cost_model=cm, hardware=cm.hw, options=dict(spec.policy_options)))
        # A TP group has tp times the KV memory; its batch limit grows with it (256 per GPU).
        self.core = SchedulerCore(CoreConfig(kv_slots=emulated_kv_slots(cm), context_length=ctx_len,
                                             max_running_requests=spec.max_running_requests * cm.tp,
                                             chunked_prefill_size=spec.chunked_prefill_size), policy, clock=self.ex.now)
        self.held: dict[str, list[int]] = {}  # prefill: KV kept for the decode side
        self.pending: deque = deque()  # decode: (rid, req) waiting for KV room
        self.pending_tokens = 0  # decode: prompt tokens in `pending`
        self.queued_tokens = 0  # prefill: prompt tokens admitted and not yet prefilled

    def room(self) -> int:
        return self.core.allocator.available - self.pending_tokens

    def enqueue(self, rid: str, req: dict) -> None:
        self.pending.append((rid, req))
        self.pending_tokens += len(req["prompt"])


def _kv_transfer_s(cfg: ClusterConfig, link: LinkSpec, tokens: int, bytes_per_token: int) -> float:
    # Each GPU of the prefill group sends its shard of the heads in parallel to its peer.
    lanes = max(1, min(cfg.tp_prefill, cfg.tp_decode))
    return link.latency_s + tokens * bytes_per_token / (link.bandwidth * lanes)


def simulate_cluster(cfg: ClusterConfig, specs: list[RequestSpec], phase: str = "both",
                     max_events: int = 50_000_000) -> SimResult:
    """Run `specs` through the cluster; phase 'prefill' or 'decode' simulates one phase alone."""
    if phase not in ("both", "prefill", "decode"):
        raise ValueError(f"phase must be both, prefill or decode, got {phase!r}")
    t_wall = time.perf_counter()
    cm_p = load_tp_cost_model(cfg.model, cfg.hardware, cfg.tp_prefill, cfg.link)
    cm_d = cm_p if cfg.tp_decode == cfg.tp_prefill else load_tp_cost_model(cfg.model, cfg.hardware, cfg.tp_decode,
                                                                          cfg.link)
    ctx_len = cm_p.model.max_position_embeddings
    bytes_per_token = cm_p.model.kv_bytes_per_token(cm_p.b)
    prefills = [] if phase == "decode" else [_Instance("prefill", cm_p, cfg.prefill, cfg, ctx_len, i)
                                             for i in range(cfg.n_prefill)]
    decodes = [] if phase == "prefill" else [_Instance("decode", cm_d, cfg.decode, cfg, ctx_len, 1000 + i)
                                             for i in range(cfg.n_decode)]
    instances = prefills + decodes
    records: dict[str, RequestRecord] = {}
    reqs: dict[str, dict] = {}
    transfers: list = []  # heap of (done_at, seq, rid, decode index, slots)
    seq = 0
    xfer = {"count": 0, "bytes": 0, "seconds": 0.0}

    for inst in prefills:
        def hold(r, reason, inst=inst):
            if phase == "prefill" or reqs[r.rid]["out"] <= 1:
                return False  # nothing to decode: free now
            inst.held[r.rid] = list(r.kv_slots)
            return True
        inst.core.kv_hold = hold

    order = sorted(range(len(specs)), key=lambda i: specs[i].arrival_s)
    nxt = 0

    def now_all(t: float) -> None:
        for inst in instances:
            inst.ex.advance_to(t)

    def to_decode(rid: str, first_token: int) -> None:
        d = max(range(len(decodes)), key=lambda i: decodes[i].room())
        reqs[rid]["first"] = first_token
        decodes[d].enqueue(rid, reqs[rid])

    def admit_pending(t: float) -> None:
        nonlocal seq
        for di, inst in enumerate(decodes):
            core = inst.core
            while inst.pending:
                rid, q = inst.pending[0]
                n = len(q["prompt"])
                full = core.num_running >= core.config.max_running_requests
                if full or core.allocator.available - core.num_running - 1 < n:
                    break  # FIFO, as the real decode instance
                inst.pending.popleft()
                inst.pending_tokens -= n
                slots = core.allocator.alloc(n)
                if phase == "decode":
                    dt = 0.0  # arrives with its KV: a decode instance alone
                else:
                    dt = _kv_transfer_s(cfg, cm_p.link, n, bytes_per_token)
                    xfer["count"] += 1
                    xfer["bytes"] += n * bytes_per_token
                    xfer["seconds"] += dt
                heapq.heappush(transfers, (t + dt, seq, rid, di, slots))
                seq += 1

    def finish_transfers(t: float) -> None:
        while transfers and transfers[0][0] <= t + 1e-12:
            _, _, rid, di, slots = heapq.heappop(transfers)
            q = reqs[rid]
            if phase != "decode":
                p = prefills[q["prefill"]]
                p.held.pop(rid)
                p.core.release_held(rid)
            core = decodes[di].core
            params = SamplingParams(max_new_tokens=q["out"], ignore_eos=True)
            u = core.admit_prefilled(rid, q["prompt"], q["first"], params, slots, seed=q["seed"],
                                     arrival_time=q["arrival"])
            if phase == "decode":
                # alone, a decode instance gets the request at its arrival: waiting for room counts
                records[rid].token_times.append(q["arrival"])
            assert not u.finished  # requests with one output token never reach a decode instance

    for _ in range(max_events):
        t = min((i.ex.now() for i in instances), default=0.0)
        # arrivals
        while nxt < len(order) and specs[order[nxt]].arrival_s <= t:
            i = order[nxt]
            sp = specs[i]
            nxt += 1
            rid = f"r{i}"
            n_in = max(1, min(sp.input_len, ctx_len - 2))
            n_out = max(1, min(sp.output_len, ctx_len - n_in))
            records[rid] = RequestRecord(rid, sp.arrival_s, n_in, n_out)
            reqs[rid] = {"prompt": [7] * n_in, "out": n_out, "seed": i, "arrival": sp.arrival_s}
            if phase == "decode":
                if n_out <= 1:
                    records[rid].token_times.append(sp.arrival_s)
                    continue
                reqs[rid]["first"] = 7
                d = max(range(len(decodes)), key=lambda k: decodes[k].room())
                decodes[d].enqueue(rid, reqs[rid])
                continue
            p = min(range(len(prefills)), key=lambda k: (prefills[k].queued_tokens, k))
            reqs[rid]["prefill"] = p
            prefills[p].queued_tokens += n_in
            prefills[p].core.add_request(rid, reqs[rid]["prompt"], SamplingParams(max_new_tokens=1, ignore_eos=True),
                                         seed=i, arrival_time=sp.arrival_s)
        # completions
        for inst in instances:
            for res in inst.ex.poll(0):
                for u in inst.core.apply_result(res):
                    if not u.new_token_ids:
                        continue
                    times = res.token_times.get(u.rid) or [res.finished_at] * len(u.new_token_ids)
                    rec = records[u.rid]
                    if inst.role == "prefill":
                        rec.token_times.append(times[0])
                        inst.queued_tokens -= rec.input_len
                        if phase == "both" and reqs[u.rid]["out"] > 1:
                            to_decode(u.rid, u.new_token_ids[0])
                    else:
                        rec.token_times.extend(times[:len(u.new_token_ids)])
        finish_transfers(t)
        admit_pending(t)
        finish_transfers(t)  # zero-time transfers (phase 'decode')
        for inst in instances:
            for launch in inst.core.schedule():
                inst.ex.submit(launch)
        # next event
        cands = [i.ex.next_completion() for i in instances]
        nexts = [c for c in cands if c is not None]
        if nxt < len(order):
            nexts.append(specs[order[nxt]].arrival_s)
        if transfers:
            nexts.append(transfers[0][0])
        if not nexts:
            if any(i.core.has_unfinished() or i.pending for i in instances):
                raise RuntimeError("cluster simulation stuck: work left, nothing in flight")
            break
        now_all(max(min(nexts), t))
    else:
        raise RuntimeError(f"cluster simulation did not finish within {max_events} events")
    recs = list(records.values())
    first = min((r.arrival for r in recs), default=0.0)
    last = max((r.token_times[-1] for r in recs if r.token_times), default=first)
    sim_cfg = SimConfig(policy=f"disagg-{cfg.n_prefill}p{cfg.tp_prefill}-{cfg.n_decode}d{cfg.tp_decode}",
                        hardware=cfg.hardware, model=cfg.model, rate=0.0, num_requests=len(recs),
                        tbt_slo_ms=cfg.tbt_slo_ms, ttft_slo_ms=cfg.ttft_slo_ms, truth=cfg.truth)
    stats = {"kv_transfers": xfer, "gpus": cfg.gpus, "phase": phase,
             "retractions": sum(i.core.stats.retractions for i in instances)}
    return SimResult(sim_cfg, recs, last - first, time.perf_counter() - t_wall, stats)


def sample_specs(workload: str, n: int, rate: float, seed: int = 0) -> list[RequestSpec]:
    return Workload.load(workload).sample(n, rate, seed)


__all__ = ["ClusterConfig", "InstanceSpec", "simulate_cluster", "sample_specs",
           "load_tp_cost_model"]
