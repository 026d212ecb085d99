"""duet: DuetServe's two lanes, chosen by what each plan is predicted to deliver.

Every time it plans, the policy prices every way to use the GPU next and takes the one that
delivers most, instead of splitting only when the SLO is at risk (that rule is `duet-paper`):

- aggregated: the decode-first chunked batch (every ready decode plus prefill chunks) with a
  token budget b from `budgets` (512 ... 8192 in steps of 256), one launch on all SMs;
- split: prefill chunks of up to b tokens (b from `split_budgets`) on S_p = total - S_d SMs,
  and every ready decode on S_d SMs (each S_d on `decode_sms_grid`), k steps back to back.

What a candidate delivers. Prefill work per ms: its chunks' work W (the ms their GEMMs and
causal attention would take at the whole GPU's compute rate, w_T * tokens + w_A * attention
pairs: the same total however a prompt is chunked) over the time t it takes (aggregated: the
step; split: the prefill lane's launch on S_p SMs), so W / t is the fraction of an ideal GPU the
prefill gets; and decode steps every `pace` ms (aggregated: t; split: the mean of the k steps on
the decode lane, which runs beside the prefill lane). Counting tokens instead would favour a
prompt's cheap first chunks and small chunks over the efficient large ones.

Feasible: the TBT SLO. A k-step decode launch delivers each step's tokens at the step's end, so
the gap a user sees is one step. With `slo_margin` (0.85) for what the roofline does not see
(noise, host time, contention), a candidate is feasible when
- its first step ends within margin * (SLO - w) ms, w the longest any ready decode has already
  waited since its last token (a request that waited keeps only the rest of its budget);
- every later step takes at most margin * SLO ms;
- a request whose prefill completes on the prefill lane joins the decode batch only when the
  decode lane's launch in flight then ends. The decode lane fits whole steps into the prefill;
  at the prefill's end it either waits out what is left after its last whole step, r (its
  requests' gap: r plus the next step), or steps once past it (a joiner's first gap: the rest of
  that step plus its own); the shorter must fit margin * SLO too.
If nothing is feasible for the requests that already waited, those are let go and the rest
protected; if nothing is feasible at all, the fastest decode step wins.

One lane (PolicyContext.lanes == 1, e.g. the model executor on a CPU): a split's two launches
would run one after the other, not side by side as a split is priced, so a long prompt's chunk
would stall every stream. There duet never plans a split: it chooses among aggregated budgets,
the defaults extended down to `ONE_LANE_SMALL_BUDGETS` (8 ... 256 tokens, for a device on which
even 512 breaks the SLO), and when nothing is feasible it takes the fastest step that still
prefills (the smallest chunk), so prompts progress while streams are hurt least.

Calibration. Every prediction is the roofline with each operator's compute time times a and
its memory time times b, per lane kind (aggregated, prefill lane, decode lane), (a, b) fitted to
the measured launch times by weighted least squares (`duet_feedback.Calibration`, weight `calibrate` = 0.05
per launch). That is the model of a device whose compute and bandwidth curves are off by 1/a and
1/b, and it absorbs host time per step and HBM contention between the lanes, so the SLO
checks hold on a device that is not the model; `slo_margin` is left for the noise.

The objective (the score of a feasible candidate):

    score = W_p * W / t  +  G_d * min(1, tau / pace)  (+ 1e-3 * tau / pace)

- W_p = 1 + ttft_gain * min(1, age / TTFT SLO): TTFT pressure, age how long the head of the queue
  (the oldest prefilling request, else the first waiting one in admission order) has waited; 0
  when no prompt waits.
- tau: the decode pace the arrivals need (`duet_feedback.Demand`). By Little's law a request holds KV for
  (prompt + output / 2) tokens over output * tau ms, so for the arrival rate seen over the last
  `demand_window_s` the KV pool stays below `kv_target` (0.75) of its slots when
  tau <= kv_target * slots / (rate * mean((prompt + output/2) * output)), and the batch below
  `running_target` (0.65) of max_running_requests when tau <= running_target * max_running /
  (rate * mean(output)). The batch keeps more headroom: a burst brings more requests than the
  window's mean rate, and a full batch stops admission outright. At 0.9 (kv_target's value, the
  default until stop 22) azure-conv's bursts filled the batch to max_running_requests while the
  static split's faster decodes kept it at ~230 of 256 (docs/results.md).
  The pool keeps headroom too (kv_target 0.9 until stop 23): in ShareGPT's and arXiv's Poisson
  stretches near capacity a pool paced for 90% filled early, duet decoded on 16-30 SMs where the
  static split keeps 48, and once the pool was full the longer queue it had built missed more
  TTFTs (ShareGPT seed 0 at 9.5 req/s, 5 s windows: 12-19 misses against 4-9); 0.75 took both
  from below to above the tuned static split (docs/results.md).
  Decodes slower than that fill the pool until admission stops and TTFT explodes; decodes faster
  than that buy nothing. Capped at margin * SLO.
- G_d = decode_gain * (1 + kv_gain * min(1, max(0, u - kv_gain_from) / (1 - kv_gain_from))), u the
  share of the KV pool in use (evictable cache counts as free): 1 until the pool is 90% full,
  3 when it is full. A full pool stops admission until decodes free KV, so then decode pace is
  what serves the queue and prefill SMs buy little. ShareGPT (long prompts and outputs) fills the
  pool near capacity: strict attainment around its goodput, mean of six points, 0.796 without
  this term, 0.836 with it (static split 0.849); the workloads that never fill the pool do not
  see it (docs/results.md, "What was changed in stop 22").
decode_gain (1) is of the order of what prefill can add (W / t up to about 1, times W_p up to
1 + ttft_gain): a candidate may run decodes slower than tau when the prefill it buys is worth
more, e.g. while prompts wait. A steady-state pace target read as a hard constraint (decode_gain
10, the default until stop 21) gave the decodes more SMs than a burst could spare: azure-conv
with the truth's compute 15% faster, 0.927x the best tuned baseline with 10 and 0.951x with 1;
ShareGPT 0.945x and 0.971x (docs/results.md). When the arrivals ask little of the decodes (tau
at the SLO) the score is prefill throughput under the TBT SLO. Ties go to aggregated, then fewer
decode SMs.

Queue order (`ttft_order`, default "deadline"). The waiting queue is admitted in deadline order
(base.deadline_order): the prompts that can still meet the TTFT SLO first, FCFS among them, the
ones that cannot after them (Moore-Hodgson on one server: it maximises how many meet the SLO;
retracted requests and any request deferred longer than 4 TTFT SLOs keep their place). Under a
burst this is worth more than any mode choice; "fcfs" keeps the core's order (what the fixed
baselines do unless given the same option).

Lane-pair states (`LanePair`) and moves (`Move`; both, and the one-lane-busy moves, in duet_lanes.py).
The policy is asked whenever a lane is idle; what it may do depends on the pair:
- BOTH_IDLE: the search above; LAUNCH the best candidate (NOTHING_TO_DO without work).
- PREFILL_RUNNING_DECODE_IDLE: the prefill lane holds S_p SMs, the decode lane gets the rest.
  It steps while the prefill runs. When the prefill ends within `sync_fraction` of a step, or
  the partition is no longer the best (a joint plan would change it), it stops at the prefill's
  end (WAIT_FOR_PARTNER if not one step fits) so that both lanes are planned together; else it
  LAUNCHes one step past the prefill's end and the lanes keep running side by side.
- DECODE_RUNNING_PREFILL_IDLE: the decode lane holds S_d SMs. The prefill lane LAUNCHes the best
  split on this partition if it is within `hysteresis` of the best joint plan (with the decode
  lane's requests counted as they will be when its launch ends); else, or when the decode lane
  ends within `sync_fraction` of a chunk, or the chunk's joiners would wait too long for the
  decode lane, WAIT_FOR_PARTNER.
`self.last` holds the last `Decision` (state, move, reason) for tests and logs.

Options (--policy-config): budgets (aggregated token budgets; default 512..8192 step 256, plus
--chunked-prefill-size), split_budgets ([2048, 4096, 8192]), decode_sms_grid (the S_d the search
considers, as duet-paper; default the hardware's whole grid), k_max (8), slo_margin (0.85),
decode_gain (1), kv_gain (2), kv_gain_from (0.9), ttft_gain (1), kv_target (0.75), running_target (0.65),
demand_window_s (20), demand_rate ("arrivals"; "admitted", a prototype: Little's lambda no higher than
the admission rate, see duet_feedback.Demand),
sync_fraction (0: a lane waits for its partner only when a joint plan would change the partition
or its own launch cannot fit), hysteresis (0.02), ttft_order ("deadline"), calibrate (0.05; 0 turns
calibration off), compiled (true: the search's array program as numba loops, policies/search_kernels.py,
the same numbers as the numpy path it falls back to without numba).
"""
from __future__ import annotations

import logging

import numpy as np

from sglang_duet.policies.base import (
    LaneBatch, LaneKind, Policy, PolicyContext, Priced, SchedulerView, StepPlan, Summary, SummaryPricer,
    deadline_view, decode_sms_grid, log_plan, lookahead_cap_of, require_cost_model, select_prefills,
    ttft_order_option,
)
from sglang_duet.policies import search_kernels_loader as search_kernels
from sglang_duet.policies.duet_feedback import Calibration, Demand
from sglang_duet.policies.duet_lanes import Decision, LanePair, Move, OneLaneBusy
from sglang_duet.policies.duet_scoring import SearchInputs, warm_up
from sglang_duet.policies.duet_scoring import score as score_candidates
from sglang_duet.policies.duet_search import (
    Candidate, Decodes, Prefix, Search, SearchTables, decodes_of, projected_decodes,
)


logger = logging.getLogger(__name__)

DEFAULT_BUDGETS = tuple(range(512, 8192 + 1, 256))
DEFAULT_SPLIT_BUDGETS = (2048, 4096, 8192)
ONE_LANE_SMALL_BUDGETS = (8, 16, 32, 64, 128, 256)  # added to the default budgets when only one lane exists


def _budgets(value, default, who: str) -> list[int]:
    if value is None:
        return sorted(set(default))
    items = value.split(",") if isinstance(value, str) else ([value] if isinstance(value, (int, float)) else value)
    try:
        out = sorted({int(x) for x in items if str(x).strip() != ""})
    except (TypeError, ValueError):
        raise ValueError(f"duet: {who} must be a list of token counts, got {value!r}") from None
    if not out or out[0] < 1:
        raise ValueError(f"duet: {who} must be positive token counts, got {value!r}")
    return out


class DuetPolicy(OneLaneBusy, Policy):
    name = "duet"

    def __init__(self, ctx: PolicyContext | None = None):
        super().__init__(ctx)
        require_cost_model(self.ctx, self.name)
        o = self.options
        self.k_max = int(o.get("k_max", 8))
        if self.k_max < 1:
            raise ValueError(f"duet: k_max must be >= 1, got {self.k_max}")
        self.margin = float(o.get("slo_margin", 0.85))
        if not 0 < self.margin <= 1:
            raise ValueError(f"duet: slo_margin must be in (0, 1], got {self.margin}")
        self.decode_gain = float(o.get("decode_gain", 1.0))
        self.kv_gain = float(o.get("kv_gain", 2.0))
        self.kv_gain_from = float(o.get("kv_gain_from", 0.9))
        if self.kv_gain < 0 or not 0 <= self.kv_gain_from < 1:
            raise ValueError(f"duet: kv_gain must be >= 0 and kv_gain_from in [0, 1), got {self.kv_gain}, "
                             f"{self.kv_gain_from}")
        self.ttft_gain = float(o.get("ttft_gain", 1.0))
        # 0: a lane never idles to meet its partner for a joint plan merely because the partner ends
        # soon. At capacity TTFT binds, and a prefill lane held idle while prompts wait (up to a
        # quarter chunk with 0.25) cost more goodput than the joint plans gained (docs/results.md).
        self.sync_fraction = float(o.get("sync_fraction", 0.0))
        self.hysteresis = float(o.get("hysteresis", 0.02))
        self.ttft_order = ttft_order_option(o, "deadline", self.name)
        self.lanes = int(getattr(self.ctx, "lanes", 2))
        if self.lanes not in (1, 2):
            raise ValueError(f"duet: lanes must be 1 or 2, got {self.lanes}")
        default_budgets = DEFAULT_BUDGETS + (self.ctx.chunked_prefill_size,)
        if self.lanes == 1:
            default_budgets += ONE_LANE_SMALL_BUDGETS
        self.budgets = _budgets(o.get("budgets"), default_budgets, "budgets")
        self.split_budgets = _budgets(o.get("split_budgets"), DEFAULT_SPLIT_BUDGETS, "split_budgets")
        self.hw = self.ctx.hardware
        self.total = self.hw.total_sms
        self.grid = decode_sms_grid(self.hw, o.get("decode_sms_grid"), self.name)
        self.slo_ms = self.ctx.tbt_slo_ms
        self.pricer = SummaryPricer(self.ctx.cost_model)
        running_target = float(o.get("running_target", 0.65))
        if not 0 < running_target <= 1:
            raise ValueError(f"duet: running_target must be in (0, 1], got {running_target}")
        self.demand = Demand(float(o.get("demand_window_s", 20.0)), float(o.get("kv_target", 0.75)), running_target,
                             rate_from=str(o.get("demand_rate", "arrivals")))
        self._grid_index = {sms: g for g, sms in enumerate(self.grid)}
        self._decode_scale_src = self._decode_scale_row = None
        self._scales_key: tuple | None = None
        self._cal_key: tuple | None = None
        self._cal: dict = {}
        self._scales: np.ndarray | None = None
        ref = 4096
        self.rp_ref = ref / self.pricer.summary_ms(Summary.of([(ref, 0)]))  # prefill tokens/ms, whole GPU
        self._work = self.pricer.work_weights()
        self.tables = SearchTables(self.pricer, self.total, self.grid, self.budgets, self.split_budgets, self.k_max,
                                   splits=self.lanes > 1)  # one lane: never a split
        self._ends: dict[LaneKind, tuple[LaneBatch, float]] = {}  # lane -> (batch launched, predicted end)
        self.calibrate = float(o.get("calibrate", 0.05))  # EWMA weight of each measured launch (0: off)
        self.calibration = {lane: Calibration(self.calibrate)
                            for lane in (LaneKind.AGGREGATED, LaneKind.PREFILL, LaneKind.DECODE)}
        self._cal_order = tuple(self.calibration[lane] for lane in (LaneKind.AGGREGATED, LaneKind.DECODE, LaneKind.PREFILL))
        self._raw: dict[int, tuple[float, float]] = {}  # id(batch launched) -> its (compute, memory) ms
        self._step_row = np.zeros(4)  # scratch of _decode_steps
        # the search's array program compiled (policies/search_kernels.py; the same numbers as numpy's)
        self.compiled = (str(o.get("compiled", True)).lower() not in ("0", "false", "no")
                         and search_kernels.AVAILABLE and self.pricer.exact)
        if self.compiled:
            self._scales = np.ones((3, 2))
            try:
                warm_up(self.tables, self.pricer, self._scale_rows(), self._work)
            except Exception as e:  # noqa: BLE001 - e.g. a numba too old or too new for these kernels
                logger.warning("duet: the compiled search is not available (%s: %s); planning with numpy",
                               type(e).__name__, e)
                self.compiled, self._scales, self._scales_key = False, None, None
        self.last: Decision | None = None

    # ---- the state machine ---------------------------------------------------------------------
    @staticmethod
    def lane_pair(view: SchedulerView) -> LanePair | None:
        if view.all_idle:
            return LanePair.BOTH_IDLE
        if LaneKind.DECODE in view.idle_lanes:
            return LanePair.PREFILL_RUNNING_DECODE_IDLE
        if LaneKind.PREFILL in view.idle_lanes:
            return LanePair.DECODE_RUNNING_PREFILL_IDLE
        return None  # an aggregated launch holds every SM (the core does not ask then)

    def plan(self, view: SchedulerView) -> StepPlan | None:
        self.demand.observe(view)
        if self.ttft_order == "deadline":
            view = deadline_view(view, self.rp_ref, self.ctx.ttft_slo_ms)
        state = self.lane_pair(view)
        if state is None:
            return None
        if state is LanePair.BOTH_IDLE:
            self._ends.clear()
            d = self._both_idle(view)
        elif state is LanePair.PREFILL_RUNNING_DECODE_IDLE:
            d = self._decode_lane_alone(view)
        else:
            d = self._prefill_lane_alone(view)
        self.last = d
        if d.move is not Move.LAUNCH:
            return None
        d.plan.reason = f"[{d.state.value}] {d.reason}"
        if len(self._raw) > 64:  # launches whose results never came back (a test, an abort)
            self._raw.clear()
        for lane, batch in d.plan.lane_batches():
            self._ends[lane] = (batch, view.now + d.plan.predicted_ms[lane.value] / 1e3)
            if lane in d.parts:
                self._raw[id(batch)] = d.parts[lane]
        return log_plan(self, d.plan)

    def on_result(self, launch, result) -> None:
        """Calibrate the lane kind's (a, b) on the launch's measured time (see `Calibration`)."""
        super().on_result(launch, result)
        parts = self._raw.pop(id(launch.batch), None)
        if parts is not None:
            self.calibration[launch.lane].update(parts[0], parts[1], (result.finished_at - result.started_at) * 1e3)

    # ---- the search ----------------------------------------------------------------------------
    def candidates(self, view: SchedulerView, dec: Decodes | None = None) -> list[Candidate]:
        """Every candidate priced and scored, as objects (tests, logs); `search` is the fast path."""
        s = self.search(view, dec)
        return [s.candidate(i) for i in range(len(s))]

    def search(self, view: SchedulerView, dec: Decodes | None = None, keep_sd: int | None = None) -> Search:
        """Price and score every candidate (see the module docstring) in one vectorised pass.

        plan() overhead is call count, not the work in each (226 priced rows with the default
        budgets and grid), so everything constant per policy is built once (`SearchTables`), the
        batches that repeat (the queue exhausted before the largest budgets) are found in Python,
        X's rows are multiplied out once for all decode partitions, and the array program runs as
        one compiled call (`duet_scoring.score_compiled`; option `compiled`, default on where numba
        is installed) that gives numpy's numbers bit for bit. tests/test_duet_policy.py pins the plans.
        keep_sd: the busy lane's partition, whose best split `_partition_stays` reads (found in the
        compiled call too)."""
        dec = dec or self._decodes(view)
        n = dec.n
        tb = self.tables
        first_limit, limit = self._limits(dec.waited_ms)
        w_p, tau = self.weights(view)

        # One FCFS chunk list serves every budget (a smaller budget takes a prefix of it), keeping KV
        # for k_cap look-ahead steps of every decode (what a split needs; aggregated needs one).
        k_cap = lookahead_cap_of(view, n, dec.longest, self.k_max, kv_reserved=self.split_budgets[-1]) if n else 1
        prefix, total = None, 0.0
        if view.waiting or view.prefilling:
            rest: list[int] = []
            chunks = select_prefills(view, tb.chunk_budget, kv_reserved=n * k_cap, remaining=rest)
            prefix = Prefix(chunks, rest)
            total = prefix.total

        # aggregated: the decode-first batch for each budget; split: prefill chunks for each split
        # budget; identical batches (the queue exhausted) priced once
        sh, budgets, less_n, ba = tb.shape_parts(n, total)
        x = SearchInputs(n, dec.cached, k_cap, prefix, first_limit, limit, w_p, tau,
                         self.decode_weight(view) if n else 1.0, self._grid_index.get(keep_sd, -1))
        C, kk, feasible, score, priced, found = score_candidates(tb, self.pricer, self._scale_rows(), self._work, x, sh,
                                                                budgets, less_n, self.compiled)
        s = Search(
            split=sh.split, agg_budgets=ba, split_budgets=tb.split_array[:sh.nb], grid=tb.grid, tau=tau, tokens=C[6],
            k=kk, step=C[0], decode=C[1], first=C[2], slowest=C[3], joiner=C[4], feasible=feasible, score=score,
            prefix=prefix, dec=dec, priced=priced, cal=self._cal_values(),
        )
        if found is not None:
            s.found = found
            s._best.append(found.best)
            if x.keep_g >= 0:
                s.kept = (keep_sd, found.kept)
        return s

    def _cal_values(self) -> dict:
        """lane -> (a, b), rebuilt only when the calibration moved (read after `_scale_rows`)."""
        if self._cal_key is not self._scales_key:
            self._cal_key = self._scales_key
            self._cal = {lane: (c.a, c.b) for lane, c in self.calibration.items()}
        return self._cal

    def _scale_rows(self) -> np.ndarray:
        """The pricer's scale rows of the aggregated, decode and prefill lanes' calibrations, rebuilt
        only when one of them moved."""
        agg, dec, pre = self._cal_order
        key = ((agg.a, agg.b), (dec.a, dec.b), (pre.a, pre.b))
        if key != self._scales_key:
            self._scales_key = key
            if self.compiled:  # the pairs themselves (the loop repeats them as scale_rows does), in place
                p = self._scales
                (p[0, 0], p[0, 1]), (p[1, 0], p[1, 1]), (p[2, 0], p[2, 1]) = key
            else:
                self._scales = self.pricer.scale_rows(key)
        return self._scales

    def _decode_scale(self) -> np.ndarray:
        """The decode lane's scale row as a one-row array (the same array while it stands)."""
        scales = self._scale_rows()
        if self._decode_scale_src is not scales:  # (compiled: a view of the pairs, updated in place)
            self._decode_scale_src, self._decode_scale_row = scales, scales[1:2] if self.compiled else scales[1:2].copy()
        return self._decode_scale_row

    def decode_weight(self, view: SchedulerView) -> float:
        """decode_gain, raised by up to kv_gain times as the KV pool fills past kv_gain_from: with the
        pool nearly full, admission waits on the KV the decodes free, so decode pace is what
        serves the queue and prefill SMs buy little (see the module docstring)."""
        used = 1.0 - view.kv_free / max(1, view.kv_total)
        if self.kv_gain == 0 or used <= self.kv_gain_from:
            return self.decode_gain
        return self.decode_gain * (1.0 + self.kv_gain * min(1.0, (used - self.kv_gain_from) / (1.0 - self.kv_gain_from)))

    def weights(self, view: SchedulerView) -> tuple[float, float]:
        """(W_p, tau): what prefill progress is worth now (TTFT pressure) and the decode pace (ms)
        the arrivals need; see the module docstring."""
        # the head of the queue the policy serves next: the oldest prefilling request, else the first waiting
        head = view.prefilling[0] if view.prefilling else (view.waiting[0] if view.waiting else None)
        w_p = 0.0
        if head is not None:
            age = max(0.0, (view.now - head.arrival_time) * 1e3)
            w_p = 1.0 + self.ttft_gain * min(1.0, age / self.ctx.ttft_slo_ms)
        return w_p, self.demand.target_ms(view, self.margin * self.slo_ms)

    def choose(self, s: Search) -> tuple[int, str]:
        """The best feasible candidate; else the best for the requests that can still be saved;
        else the fastest decode."""
        i = s.best()
        if i is not None:
            return i, "best feasible"
        if s.dec.waited_ms > 0:
            first_limit, limit = self._limits(0.0)
            ok = (s.first <= first_limit) & (s.slowest <= limit) & (s.joiner <= limit)
            i = s.best(ok)
            if i is not None:
                return i, f"none within the {s.dec.waited_ms:.0f} ms already waited; best for the rest"
        if self.lanes == 1 and (s.tokens > 0).any():
            # One lane: the fastest step that still prefills (a decode-only step would starve the
            # prompts while missing the SLO anyway); ties to the lowest index, the smallest budget.
            step = np.where(s.tokens > 0, s.step, np.inf)
            return int(np.argmin(step)), "nothing meets the SLO on one lane: smallest chunk that makes progress"
        order = np.lexsort((-s.score, s.slowest, s.first))
        return int(order[0]), "nothing meets the SLO: fastest decode"

    # ---- BOTH_IDLE -----------------------------------------------------------------------------
    def _both_idle(self, view: SchedulerView) -> Decision:
        state = LanePair.BOTH_IDLE
        s = self.search(view)
        if not len(s):
            return Decision(state, Move.NOTHING_TO_DO, "no admissible work")
        i, why = self.choose(s)
        c = s.candidate(i)
        dec = s.dec
        sd = f"S_d={c.decode_sms} k={c.k} " if c.mode == "split" else ""
        desc = (f"{c.mode} b={c.budget} {sd}P={c.prefill_tokens} in {c.step_ms:.1f} ms, decode pace "
                f"{c.pace_ms:.1f} ms (target {s.tau:.1f}), first {c.first_ms:.1f} ms (+{dec.waited_ms:.1f} "
                f"waited), score {c.score:.3f}: {why} of {len(s)}")
        if c.mode == "aggregated":
            plan = StepPlan(aggregated=LaneBatch(prefill=c.prefill, decode=dec.ids), predicted_ms={"aggregated": c.step_ms})
        else:
            plan = StepPlan(prefill_lane=LaneBatch(prefill=c.prefill), decode_lane=LaneBatch(decode=dec.ids, steps=c.k),
                            prefill_sms=self.total - c.decode_sms, decode_sms=c.decode_sms,
                            predicted_ms={"prefill": c.step_ms, "decode": c.decode_ms})
        return Decision(state, Move.LAUNCH, desc, plan, len(s), parts=s.parts_of(i))

    # ---- helpers -------------------------------------------------------------------------------
    def _limits(self, waited_ms: float) -> tuple[float, float]:
        """(first-step limit, later-step limit) in predicted ms."""
        return self.margin * (self.slo_ms - waited_ms), self.margin * self.slo_ms

    def _decodes(self, view: SchedulerView) -> Decodes:
        return decodes_of(view, self.k_max)

    def _projected_decodes(self, view: SchedulerView, busy, left_ms: float) -> Decodes:
        return projected_decodes(view, busy, left_ms, self._decodes(view), self.k_max)

    def _decode_steps(self, dec: Decodes, sms: int, k: int) -> Priced:
        """Each of k decode steps on `sms` SMs, priced with the decode lane's calibration."""
        layout = self.tables.step_layout(sms, k)
        if self.compiled and dec.n:  # one compiled call (the same numbers)
            W, w_const, ops = self.pricer.weights
            P, t = search_kernels.kernels().decode_steps(self.tables.unit_template, dec.n, float(dec.cached), k, W,
                                                         w_const, layout.take, layout.prep_rows, layout.prep_of,
                                                         layout.block, self._decode_scale(), ops)
            return Priced(t, P, ops, compiled=True)
        row = self._step_row  # scratch: what the cached tokens add (a tuple here costs its conversion)
        row[2] = row[3] = dec.cached
        X = np.add(self.tables.decode_template(dec.n)[:k], row)
        return self.pricer.ms_blocks(X, layout, self._decode_scale(), nonempty=dec.n > 0)

    def _left_ms(self, view: SchedulerView, lane: LaneKind, launch) -> float:
        """Predicted ms until the busy lane's launch finishes (its full prediction if unknown)."""
        mine = self._ends.get(lane)
        if mine is not None and mine[0] is launch.batch:
            return max(0.0, (mine[1] - view.now) * 1e3)
        return launch.predicted_ms.get(lane.value, 0.0)
