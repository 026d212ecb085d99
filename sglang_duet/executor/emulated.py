"""The emulated GPU: an executor that times every launch with a roofline ground truth.

No model runs. A launch takes its truth time on its lane's SMs (all SMs for an aggregated launch,
`launch.sms` for a split lane); a k-step decode launch runs its k steps back to back (contexts
grow by one per step). Token ids are a hash of (request seed, position), so outputs are
deterministic and never an eos: lengths are set by max_new_tokens, as with ignore_eos.

Delivery. A step's tokens become visible to the host when that step ends: a k-step launch is
reported in parts (`LaunchResult.final=False`, one per step, token times = the step's end), then
a final part at the launch's end with the last step's tokens; a one-step launch is one final
result. Every step boundary is an event: `next_completion()` returns the next boundary or
completion, a virtual clock stops there, and a wall-clock `poll` wakes there.

Truth apart from belief (`sglang_duet/cost_model/truth.py`, docs/cost-model.md). Policies plan
with the CostModel they are given; this executor prices with a `TruthConfig`: its own hardware
(optionally with perturbed curves), per-launch lognormal noise on device time, host time per
step as a function of the batch size, a partition-switch cost, HBM contention per operator phase
and attention priced per request. `truth=None` (the constructor's default) is
`TruthConfig.exact()`: the belief itself, as the emulator was before; the simulator and the
`--executor emulated` server turn the truth model on by default.

HBM contention. SM partitions split SMs, not memory bandwidth. While two lanes overlap, each
phase of a launch has a bandwidth demand (its bytes over its time alone on its partition); when
two demands add up to more than the whole GPU's achievable bandwidth, both get the same share
s = B / (D_a + D_b) of what they would reach alone (memory-bound operators stretch as 1/s,
compute-bound ones as max(tc, tm/s), host time not at all). `contention="phase"` splits each
launch into its memory-bound operators, its compute-bound operators and its host time, and
prices a lane's slowdown as the time-weighted average over the other lane's phases (the phases
of a layer interleave far faster than a step lasts, so a decode step sees the prefill's mix,
including the memory-bound phases that the launch average hides); `"bandwidth"` uses one
launch-averaged demand (the earlier model); `"none"` turns contention off. Progress is tracked
in alone-seconds, so a launch slows only while the overlap lasts and every event time is
recomputed whenever a launch starts or ends. `"measured"` (a measured truth's, see
cost_model/truth.py) slows a decode and a prefill lane by the slowdowns measured on a GPU instead.

Clocks. 'wall': time.monotonic (or the given clock); poll(timeout) really sleeps until the next
event or the timeout, so a server serves with GPU-shaped latencies (`time_scale` < 1 runs faster
than the GPU would, for tests). 'virtual': a simulated clock that only moves when `advance_to` or
a blocking poll moves it (the discrete-event simulator).
"""
from __future__ import annotations

import logging
import os
import random
import time

from sglang_duet.core.plan import NO_TOKEN, LaneKind, Launch, LaunchResult, RowResult
from sglang_duet.cost_model.truth import (
    CONTENTION_MODES, LaunchCost, TruthConfig, lognormal_factor, make_pricer, truth_cost_model,
)
from sglang_duet.executor.base import Executor
from sglang_duet.executor.emulated_tokens import VECTOR_ROWS, LaunchRows, token_id, token_ids  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

MEM_FRACTION_DEFAULT = 0.85  # as the model executor on a GPU: weights + KV share of device memory
TRUTH_ENV = "SGLANG_DUET_EMULATED_TRUTH"  # the server's truth options (see TruthConfig.parse)


class _Phase:
    """Part of a launch that HBM contention stretches one way: time(s) at bandwidth share s is
    tm / s (memory-bound operators) + sum max(tc, tm / s) over `pairs` (compute-bound ones) + fixed."""

    __slots__ = ("tm", "pairs", "fixed", "alone", "demand")

    def __init__(self, tm: float, pairs: tuple, fixed: float, nbytes: float):
        self.tm, self.pairs, self.fixed = tm, pairs, fixed
        self.alone = self.time(1.0)
        self.demand = nbytes / self.alone if self.alone > 0 else 0.0

    def time(self, s: float) -> float:
        t = self.tm / s + self.fixed
        for tc, tm in self.pairs:
            x = tm / s
            t += tc if tc >= x else x
        return t


class _Running:
    __slots__ = ("launch", "bounds", "phases", "alone", "started", "rate", "done", "updated", "step", "rows")

    def __init__(self, launch: Launch, rows: LaunchRows, bounds: list[float], phases: list[_Phase],
                 started: float):
        self.launch = launch
        self.rows = rows
        self.bounds = bounds  # alone-seconds (time-scaled) done at the end of each step
        self.phases = phases  # for contention; times in emulated-GPU seconds
        self.alone = sum(p.alone for p in phases)
        self.started = started
        self.rate = 1.0  # alone-seconds per second, now
        self.done = 0.0  # alone-seconds done at `updated`
        self.updated = started
        self.step = 0  # the next step boundary to report

    def next_event(self) -> float:
        return self.updated + (self.bounds[self.step] - self.done) / self.rate


_TRUTH_CMS: dict = {}  # (id(belief), hardware, perturb) -> (belief, truth cost model)
_PRICERS: dict = {}  # (id(truth cm), per_request) -> (truth cm, pricer): pricing caches outlive one run


def truth_pricer(cost_model, truth: TruthConfig):
    """The pricer of `truth` over the belief `cost_model`, shared between runs (sweeps reuse its cache)."""
    key = (id(cost_model), truth.hardware, truth.perturb)
    hit = _TRUTH_CMS.get(key)
    if hit is None or hit[0] is not cost_model:
        if len(_TRUTH_CMS) > 16:
            _TRUTH_CMS.clear()
        hit = _TRUTH_CMS[key] = (cost_model, truth_cost_model(cost_model, truth))
    cm = hit[1]
    pkey = (id(cm), truth.per_request_attention)
    got = _PRICERS.get(pkey)
    if got is None or got[0] is not cm:
        if len(_PRICERS) > 16:
            _PRICERS.clear()
        got = _PRICERS[pkey] = (cm, make_pricer(cm, truth.per_request_attention))
    return got[1]


class EmulatedExecutor(Executor):
    concurrent_lanes = True
    # Overlap scheduling: a launch submitted while its lane runs another is queued and starts when
    # that one ends (the device runs them back to back); its truth host time overlapped the running
    # launch's device time, so only what exceeds it is charged.
    supports_overlap = True
    # Queued launches run back to back in submission order, however many wait (a GPU stream's
    # order), and their ids come from (seed, position) alone: two may wait behind the running one
    # (CoreConfig.overlap_depth), so a host that falls one step behind does not idle the device.
    overlap_depth = 2
    # A launch's rows are read when it is submitted (LaunchRows), never later but for their rid,
    # sample, steps and input length: the core may hand a decode launch of the same requests the
    # previous launch's work list, advanced in place (CoreConfig.persistent_rows), and the columns
    # are then advanced too instead of read again.
    persistent_rows = True

    def __init__(self, cost_model, clock_mode: str = "wall", contention: str | None = None,
                 clock=time.monotonic, time_scale: float = 1.0, token_range: tuple[int, int] | None = None,
                 banned_tokens=frozenset(), start: float = 0.0, truth: TruthConfig | None = None):
        if clock_mode not in ("wall", "virtual"):
            raise ValueError(f"clock_mode must be 'wall' or 'virtual', got {clock_mode!r}")
        if contention is not None and contention not in CONTENTION_MODES:
            raise ValueError(f"contention must be one of {CONTENTION_MODES}, got {contention!r}")
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self._cm = cost_model  # the belief (what policies plan with); also sizes the token range
        self.truth = truth if truth is not None else TruthConfig.exact()  # also sets the contention mode
        if contention is not None:
            if contention == "measured" and not self.truth.contention_points:
                raise ValueError("contention 'measured' needs a truth with contention_points (e.g. a truth file)")
            self.contention = contention
        self.mode = clock_mode
        self._wall = clock
        self.time_scale = time_scale
        self.vnow = start
        self.token_lo, self.token_hi = token_range or (0, cost_model.model.vocab_size)
        self.banned = frozenset(banned_tokens)
        self._running: dict[int, _Running] = {}
        self._queued: dict[LaneKind, list[tuple[Launch, LaunchRows]]] = {}  # waiting for their lane (overlap)
        self._last_rows: dict[LaneKind, tuple[list, LaunchRows]] = {}  # lane -> (work, rows) last submitted
        self._done: list[LaunchResult] = []
        self._lane_sms: dict[LaneKind, int | None] = {}
        self.busy_s = {"aggregated": 0.0, "prefill": 0.0, "decode": 0.0}  # emulated lane time, for stats
        self.truth_stats = {"switches": 0, "host_s": 0.0, "device_s": 0.0}

    # ---- belief and truth (either may be swapped after construction, e.g. cost_model/constant.py) ----
    @property
    def cm(self):
        return self._cm

    @cm.setter
    def cm(self, value) -> None:
        self._cm = value
        self._reprice()

    @property
    def truth(self) -> TruthConfig:
        return self._truth

    @truth.setter
    def truth(self, value: TruthConfig) -> None:
        """A new truth: its pricing, its contention mode and a noise generator seeded afresh."""
        self._truth = value
        self.contention = value.contention
        self._rng = random.Random(value.seed)
        self._reprice()

    def _reprice(self) -> None:
        self.pricer = truth_pricer(self._cm, self._truth)
        self.hw = self.pricer.cm.hw  # the truth's hardware

    # ---- clock ------------------------------------------------------------------------------
    def now(self) -> float:
        return self.vnow if self.mode == "virtual" else self._wall()

    def advance_to(self, t: float) -> None:
        """Virtual mode: move the clock forward (step ends and completions up to t become pollable)."""
        if self.mode != "virtual":
            raise RuntimeError("advance_to is for the virtual clock")
        self._settle(t)
        self.vnow = max(self.vnow, t)

    def next_completion(self) -> float | None:
        """When the next result part is due: a step boundary of a k-step launch, or a launch's end."""
        if self._done:
            return self.now()
        return min((r.next_event() for r in self._running.values()), default=None)

    def busy(self) -> bool:
        return bool(self._running or self._done or any(self._queued.values()))

    # ---- launches ---------------------------------------------------------------------------
    def price(self, launch: Launch, rows: LaunchRows | None = None) -> LaunchCost:
        """The launch's truth cost alone on its SMs (before noise, host time and switch cost);
        `rows`: the launch's own, when they are gathered already."""
        rows = rows if rows is not None else LaunchRows(launch.work)
        sms = None if launch.lane == LaneKind.AGGREGATED else launch.sms
        lc = self.pricer.price_rows(rows.q, rows.c, rows.s, sms)
        scale = self._truth.prefill_step_scale
        if scale != 1.0 and max(rows.q, default=1) > 1:  # an eager forward (prefill chunk, mixed batch)
            lc.scale_first_step(scale)
        return lc

    def submit(self, launch: Launch) -> None:
        now = self.now()
        self._settle(now)
        rows = self._rows(launch)
        if any(r.launch.lane == launch.lane for r in self._running.values()):
            self._queued.setdefault(launch.lane, []).append((launch, rows))  # overlap: runs when the lane frees
            return
        self._start(launch, rows, now, hidden_host_s=0.0)

    def _rows(self, launch: Launch) -> LaunchRows:
        """The launch's columns, read once, at submit (its pricing and every step's report read them):
        the previous launch's of its lane advanced by its steps when the core handed the same work
        list back (persistent rows: the same requests, each row advanced in place), else read."""
        last = self._last_rows.get(launch.lane)
        work = launch.work
        rows = last[1].advanced() if last is not None and last[0] is work else LaunchRows(work)
        self._last_rows[launch.lane] = (work, rows)
        return rows

    def _start(self, launch: Launch, rows: LaunchRows, now: float, hidden_host_s: float) -> None:
        """Start a launch at `now`; `hidden_host_s` of its host time already ran beside the launch
        before it on its lane (overlap scheduling) and is not charged again."""
        truth = self.truth
        lc = self.price(launch, rows)
        noise = lognormal_factor(self._rng, truth.noise_sigma)
        switch = 0.0
        if launch.lane != LaneKind.AGGREGATED:
            prev = self._lane_sms.get(launch.lane)
            if prev is not None and prev != launch.sms and truth.switch_s > 0:
                switch = truth.switch_s
                self.truth_stats["switches"] += 1
            self._lane_sms[launch.lane] = launch.sms
        scale = self.time_scale
        acc, bounds, host_total = switch, [], switch
        if not truth.host_hidden:  # a lane worker that prepares, runs and syncs each step in turn
            hidden_host_s = 0.0
        for dev, reqs in zip(lc.step_s, lc.step_reqs):
            host = truth.host_s(reqs)
            if hidden_host_s > 0:  # prepared while the launch before it ran
                hidden = min(host, hidden_host_s)
                host -= hidden
                hidden_host_s -= hidden
            host_total += host
            acc += dev * noise + host
            bounds.append(acc * scale)
        self.truth_stats["host_s"] += host_total
        self.truth_stats["device_s"] += lc.device_s * noise
        phases = self._phases(lc, noise, host_total)
        run = _Running(launch, rows, bounds, phases, now)
        self._progress(now)  # the other lane ran at its old rate until now
        self._running[launch.launch_id] = run
        self._rerate()

    def _phases(self, lc: LaunchCost, n: float, host: float) -> list[_Phase]:
        pairs = tuple((tc * n, tm * n) for tc, tm in lc.comp.values())
        out = []
        if self.contention == "phase":
            if lc.mem_tm or lc.mem_fixed:
                out.append(_Phase(lc.mem_tm * n, (), lc.mem_fixed * n, lc.mem_bytes))
            if pairs or lc.comp_fixed or lc.fixed:
                out.append(_Phase(0.0, pairs, (lc.comp_fixed + lc.fixed) * n, lc.comp_bytes))
        else:
            out.append(_Phase(lc.mem_tm * n, pairs, (lc.mem_fixed + lc.comp_fixed + lc.fixed) * n, lc.bytes))
        if host > 0:
            out.append(_Phase(0.0, (), host, 0.0))
        return out

    def poll(self, timeout: float | None = None) -> list[LaunchResult]:
        """Result parts due by now; waits until the next step end or completion, or `timeout` seconds."""
        now = self.now()
        self._settle(now)
        if not self._done and self._running and (timeout is None or timeout > 0):
            nxt = min(r.next_event() for r in self._running.values())
            until = nxt if timeout is None else min(nxt, now + timeout)
            if self.mode == "virtual":
                self.advance_to(until)
            else:
                wait = until - self._wall()
                if wait > 0:
                    time.sleep(wait)
                self._settle(self._wall())
        out, self._done = self._done, []
        return out

    # ---- progress model ---------------------------------------------------------------------
    def _settle(self, t: float) -> None:
        """Report every step end and completion up to time t, in order, re-rating the lanes at each completion."""
        running = self._running
        while running:
            if len(running) == 1:
                (run,) = running.values()
            else:
                run = min(running.values(), key=_Running.next_event)
            end = run.next_event()
            if end > t + 1e-12:
                break
            last = run.step == len(run.bounds) - 1
            if last:
                self._progress(end)
                del running[run.launch.launch_id]
                self._report(run, end, final=True)
                queue = self._queued.get(run.launch.lane)
                if queue:  # the lane's next launch starts as this one ends
                    self._start(*queue.pop(0), end, hidden_host_s=(end - run.started) / self.time_scale)
                self._rerate()
            else:
                self._report(run, end, final=False)
                run.step += 1

    def _progress(self, t: float) -> None:
        for r in self._running.values():
            if t > r.updated:
                r.done += (t - r.updated) * r.rate
                r.updated = t

    def _rerate(self) -> None:
        runs = list(self._running.values())
        if len(runs) < 2 or self.contention == "none":
            for r in runs:
                r.rate = 1.0
            return
        if self.contention == "measured":
            self._rerate_measured(runs)
            return
        total_bw = self.hw.bandwidth()
        for r in runs:
            others = [p for o in runs if o is not r for p in o.phases]
            other_alone = sum(p.alone for p in others)
            t = 0.0
            for p in r.phases:
                if p.demand <= 0:
                    t += p.alone
                    continue
                for q in others:
                    d = p.demand + q.demand
                    w = q.alone / other_alone if other_alone > 0 else 0.0
                    t += w * (p.time(total_bw / d) if d > total_bw else p.alone)
            r.rate = r.alone / t if t > 0 else 1.0

    def _rerate_measured(self, runs: list[_Running]) -> None:
        """contention=measured: while a decode-lane and a prefill-lane launch run together, each
        progresses at 1 / its measured slowdown (TruthConfig.lane_slowdowns at the decode lane's
        SMs), host time included (a GPU's two lane workers share one host too); anything else
        runs at its alone rate."""
        by_lane = {r.launch.lane: r for r in runs}
        dec, pre = by_lane.get(LaneKind.DECODE), by_lane.get(LaneKind.PREFILL)
        for r in runs:
            r.rate = 1.0
        if dec is not None and pre is not None:
            sms = dec.launch.sms if dec.launch.sms is not None else self.hw.total_sms
            xd, xp = self._truth.lane_slowdowns(sms)
            dec.rate, pre.rate = 1.0 / xd, 1.0 / xp

    def _report(self, run: _Running, t: float, final: bool) -> None:
        """The tokens of step `run.step`, visible at t; the final part also ends the launch. One token
        per row that samples in this step (a RowResult: no per-request dicts, ids hashed in one pass)."""
        launch, j = run.launch, run.step
        if final:
            self.busy_s[launch.lane.value] += t - run.started
        rows = run.rows.tokens(j, self.token_lo, self.token_hi, self.banned)
        work, lp_rows = launch.work, run.rows.lp_rows
        # No logits here: a token's logprob is reported as certain (0), its top list empty.
        lps = {work[i].rid: [{"token_id": rows[i], "logprob": 0.0, "top": []}]
               for i in lp_rows if rows[i] != NO_TOKEN} if lp_rows else None
        self._done.append(RowResult(launch.launch_id, work, rows, started_at=run.started, finished_at=t,
                                    final=final, logprobs=lps))


def emulated_kv_slots(cost_model, mem_fraction: float | None = None) -> int:
    """KV token slots the emulated GPU holds: its memory share minus the weights."""
    model, hw = cost_model.model, cost_model.hw
    free = hw.memory_bytes * (mem_fraction or MEM_FRACTION_DEFAULT) - model.num_params() * cost_model.b
    if free <= 0:
        raise ValueError(f"--executor emulated: {model.name} does not fit in {hw.name}'s memory "
                         f"({hw.memory_bytes / 1e9:.0f} GB); pass --max-total-tokens")
    return int(free // model.kv_bytes_per_token(cost_model.b))


def emulated_cost_model(model_config, hw, tp_size: int = 1):
    """The cost model of the emulated device: one GPU, or under `--tp-size N` a group of N priced as
    one (cost_model/tp.py: N times the compute, bandwidth and memory, plus the all-reduces over the
    hardware file's link). One process emulates the whole group: no ranks are started."""
    from sglang_duet.cost_model.roofline import CostModel
    from sglang_duet.cost_model.tp import TPCostModel

    return CostModel(model_config, hw) if tp_size == 1 else TPCostModel(model_config, hw, tp_size)


def build_emulated(engine_core, args) -> None:
    """EngineCore hook for `--executor emulated`: model config, tokenizer, KV size, executor."""
    from sglang_duet.cost_model.hardware import HardwareSpec, configs_dir
    from sglang_duet.models.config import ModelConfig

    cfg_path = args.model_config or str(configs_dir() / "models" / "qwen3-8b.json")
    model_config = ModelConfig.from_path(cfg_path)
    hw = HardwareSpec.load(args.hardware)
    tp = int(getattr(args, "tp_size", 1) or 1)
    cm = emulated_cost_model(model_config, hw, tp)  # KV: the group's memory minus the weights, once
    tokenizer, tok_dir = _embedded_tokenizer()
    slots = args.max_total_tokens + 1 if args.max_total_tokens else emulated_kv_slots(cm, args.mem_fraction_static)
    if tokenizer is not None:
        # Emit ids the tokenizer can decode, above its special tokens (which include its eos).
        special = [i for i in tokenizer.all_special_ids if i is not None]
        special += list(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        lo, hi = (max(special) + 1 if special else 0), len(tokenizer)
    else:
        lo, hi = 0, model_config.vocab_size
    banned = set(model_config.eos_token_ids) | {getattr(tokenizer, "eos_token_id", None)} - {None}
    extra = getattr(args, "extra", None) or {}
    engine_core.model_config = model_config
    engine_core.tokenizer = tokenizer
    engine_core.chat_template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    engine_core.model_dir = tok_dir
    engine_core.kv_slots = int(slots)
    engine_core.input_vocab_size = hi  # prompts are tokenized by the embedded tokenizer, whatever the config
    truth = server_truth(args, extra)
    engine_core.executor = EmulatedExecutor(
        cm, clock_mode="wall", contention=extra.get("emulated_contention"),
        clock=engine_core.clock, time_scale=float(extra.get("emulated_time_scale", 1.0)),
        token_range=(lo, hi), banned_tokens=banned, truth=truth,
    )
    engine_core.emulated_cost_model = cm  # the policies plan with it too (EngineCore._policy_context)
    engine_core.device = f"emulated:{hw.name}" + (f"x{tp}" if tp > 1 else "")
    logger.info("emulated GPU: %s on %s%s (%s), %d KV slots, token ids in [%d, %d); truth: %s", model_config.name,
                hw.name, f" x {tp} (tensor parallel)" if tp > 1 else "", hw.source, slots, lo, hi, truth.describe())


def server_truth(args, extra: dict) -> TruthConfig:
    """The server's truth model: on by default (seeded with --random-seed); `extra['emulated_truth']`
    (a TruthConfig, 'off', or TruthConfig.parse's 'key=value,...') or the SGLANG_DUET_EMULATED_TRUTH
    environment variable (same text) changes it."""
    spec = extra.get("emulated_truth", os.environ.get(TRUTH_ENV))
    if isinstance(spec, TruthConfig):
        return spec
    return TruthConfig.parse(spec, seed=int(getattr(args, "random_seed", 0) or 0))


def _embedded_tokenizer():
    """The embedded default model's tokenizer (so the server can return text), or (None, None)."""
    try:
        from transformers import AutoTokenizer

        from sglang_duet.model_loader.embedded import default_model_path

        path = default_model_path()
        return AutoTokenizer.from_pretrained(path, local_files_only=True), path
    except Exception as e:  # noqa: BLE001 - text output is a convenience; token ids still work
        logger.warning("emulated executor: no tokenizer (%s); responses carry token ids only", e)
        return None, None
