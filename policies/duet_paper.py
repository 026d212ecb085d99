"""duet-paper: DuetServe as the paper states it, kept unchanged so that `duet` is measured against it.

Aggregated by default, SM-level spatial multiplexing when the TBT SLO is at risk
(`--policy duet-paper`; the default `duet` chooses by predicted delivered throughput instead,
see policies/duet.py and docs/policies.md).

Each time both lanes are idle the policy builds the chunked (decode-first) plan and prices it
with the roofline cost model on all SMs. Within the TBT SLO it runs aggregated. Otherwise it
splits the plan: the prefill chunks go to the prefill lane on S_p SMs and the decodes to the
decode lane on S_d = total - S_p SMs, where the decode lane runs k steps back to back while
the prefill runs. (S_d, k) maximise

    (useful decode tokens(k) + prefill tokens) / max(k-step decode time(S_d), prefill time(S_p))

subject to every decode step meeting the TBT SLO; among equal objectives the smallest S_d
(and k) wins, leaving the most SMs to prefill. "Useful" decode tokens count a request that
finishes after m < k steps as m, so k never runs past what the batch can use.

While one lane is still busy the partition is fixed (the busy lane holds its SMs), so the
idle lane gets the rest. A decode lane that finished its k steps while the prefill runs gets
another batch, with k re-chosen to end before the prefill's predicted end; once the prefill
ends within one step, the decode lane waits for it (if the TBT budget allows), so that both
lanes are planned together again: the only moment the partition can change. A prefill lane
that finished first gets the next chunk at once (prefill SMs are the scarce ones), unless the
next decode batch (with the requests this chunk completes) would break the SLO on the decode
partition; then it waits for the decode lane so the partition can grow.

Budgets. Every decode step keeps a running TBT budget: a request that has already waited w ms
since its last token (e.g. across a lane hand-over) only has SLO - w left, which both the
aggregated check and the first decode step of a split respect.

Joining requests. A request whose prefill ends on the prefill lane joins the decode batch only
when the decode lane's current launch ends, so its first gap can reach two decode steps (the
rest of the running step, then its own). With `join_guard` (default on; its effect is measured
in docs/results.md) a split whose prefill part completes a request holds its decode steps to
SLO / 2, so that gap stays within the SLO too; off, only the steady-state gaps are guaranteed
(the paper's constraint as stated).

Options (--policy-config): k_max (8), slo_margin (1.0: fraction of the TBT SLO a predicted
step may use; < 1 leaves room for HBM contention the roofline does not see), join_guard (true),
split_prefill_budget (prefill tokens per split-mode chunk; default: the chunked plan's),
decode_sms_grid (the decode-partition sizes S_d the search considers: a list of ints or a comma
string such as "16,32,48,64"; each must be on the hardware's partition grid; default: the whole
grid. Fewer sizes mean fewer green contexts and decode graphs to create, e.g. for a short GPU run).
"""
from __future__ import annotations

from dataclasses import dataclass

from sglang_duet.policies.base import (
    LaneBatch, LaneKind, LatencyModel, Policy, PolicyContext, SchedulerView, StepPlan, batch_shape,
    chunked_batch, decode_sms_grid, log_plan, lookahead_cap, remaining_tokens, require_cost_model,
    select_prefills, steps_ms, useful_decode_tokens,
)


_TIE = 1e-9  # relative: objectives closer than this are ties (float noise), resolved to fewer SMs / smaller k


@dataclass
class SplitChoice:
    decode_sms: int
    k: int
    objective: float  # tokens per ms
    decode_ms: float  # all k steps
    step_ms: float  # the slowest (last) step: the TBT the decodes see
    prefill_ms: float


class DuetPaperPolicy(Policy):
    name = "duet-paper"

    def __init__(self, ctx: PolicyContext | None = None):
        super().__init__(ctx)
        require_cost_model(self.ctx, self.name)
        self.k_max = int(self.options.get("k_max", 8))
        if self.k_max < 1:
            raise ValueError(f"{self.name}: k_max must be >= 1, got {self.k_max}")
        self.slo_ms = self.ctx.tbt_slo_ms * float(self.options.get("slo_margin", 1.0))
        self.split_budget = int(self.options.get("split_prefill_budget", 0)) or None
        self.join_guard = bool(self.options.get("join_guard", True))
        self.hw = self.ctx.hardware
        self.total = self.hw.total_sms
        self.grid = self._decode_grid(self.options.get("decode_sms_grid"))
        self.lat = LatencyModel(self.ctx.cost_model, k_ref=max(2, self.k_max))
        # (batch object we launched, predicted end time): the in-flight launch of each lane.
        self._ends: dict[LaneKind, tuple[LaneBatch, float]] = {}

    def _decode_grid(self, value) -> list[int]:
        """The decode_sms_grid option: sorted distinct sizes on the hardware grid (None: all of it)."""
        return decode_sms_grid(self.hw, value, self.name)

    # ---- the search (public so tests can brute-force it) ---------------------------------------
    def step_limit_ms(self, joins: bool) -> float:
        """The longest decode step allowed: the SLO, or half of it when requests will join mid-launch."""
        return self.slo_ms / 2 if joins and self.join_guard else self.slo_ms

    def choose_k(self, first: float, slope: float, remaining: list[int], prefill_tokens: int, prefill_ms: float,
                 cap: int, limit_ms: float | None = None, first_limit_ms: float | None = None):
        """Best k for a decode curve: (k, objective, k-step ms, last step ms), or None when even one step
        breaks the limits (every step <= limit_ms; the first <= first_limit_ms, the SLO budget the
        longest-waiting request has left)."""
        limit = self.slo_ms if limit_ms is None else limit_ms
        if first > (limit if first_limit_ms is None else min(limit, first_limit_ms)):
            return None
        best = None
        for k in range(1, cap + 1):
            total, last = steps_ms(first, slope, k)
            if last > limit:
                break  # steps only get slower as contexts grow
            obj = (useful_decode_tokens(remaining, k) + prefill_tokens) / max(total, prefill_ms)
            if best is None or obj > best[1] * (1 + _TIE):
                best = (k, obj, total, last)
        return best

    def choose_split(self, decode_shape, remaining: list[int], prefill_shape, cap: int,
                     limit_ms: float | None = None, first_limit_ms: float | None = None) -> SplitChoice | None:
        """The (S_d, k) maximising the objective with the decode steps within the limits (the SLO)."""
        p_tokens = sum(q for q, _ in prefill_shape)
        best = None
        for sd in self.grid:
            first, slope = self.lat.decode_curve(decode_shape, sd)
            if first > (self.slo_ms if limit_ms is None else limit_ms):
                continue  # too few SMs: skip pricing the prefill
            tp = self.lat.step_ms(prefill_shape, self.total - sd)
            got = self.choose_k(first, slope, remaining, p_tokens, tp, cap, limit_ms, first_limit_ms)
            if got is not None and (best is None or got[1] > best.objective * (1 + _TIE)):
                best = SplitChoice(sd, got[0], got[1], got[2], got[3], tp)
        return best

    # ---- planning ---------------------------------------------------------------------------
    def plan(self, view: SchedulerView) -> StepPlan | None:
        if view.all_idle:
            self._ends.clear()
            return self._plan_both(view)
        if LaneKind.DECODE in view.idle_lanes:
            return self._plan_decode_lane(view)
        if LaneKind.PREFILL in view.idle_lanes:
            return self._plan_prefill_lane(view)
        return None

    def _plan_both(self, view: SchedulerView) -> StepPlan | None:
        batch = chunked_batch(view, self.ctx.chunked_prefill_size)
        if batch.is_empty():
            return None
        pred = self.lat.step_ms(batch_shape(view, batch))
        wait = self._wait_ms(view)  # a request that already waited since its last token has less budget
        if pred + wait <= self.slo_ms or not batch.decode or not batch.prefill:
            why = "within SLO" if pred + wait <= self.slo_ms else "nothing to split"
            return self._aggregated(batch, pred, f"chunked plan {pred:.1f}ms (+{wait:.1f}ms waited), {why}")
        prefills = batch.prefill
        if self.split_budget:
            prefills = select_prefills(view, self.split_budget, kv_reserved=len(batch.decode))
        dshape, remaining = self._decode_shape(view)
        pshape = [(c.length, c.start) for c in prefills]
        cap = lookahead_cap(view, remaining, self.k_max, kv_reserved=sum(q for q, _ in pshape))
        limit = self.step_limit_ms(self._completes(view, prefills))
        choice = self.choose_split(dshape, remaining, pshape, cap, limit, self.slo_ms - wait)
        if choice is None and wait > 0:  # the longest waiter cannot be saved: protect the others
            choice = self.choose_split(dshape, remaining, pshape, cap, limit)
        if choice is None:
            return self._aggregated(batch, pred, f"chunked plan {pred:.1f}ms; no partition meets the SLO")
        sd = choice.decode_sms
        plan = StepPlan(
            prefill_lane=LaneBatch(prefill=prefills), decode_lane=LaneBatch(decode=batch.decode, steps=choice.k),
            prefill_sms=self.total - sd, decode_sms=sd,
            predicted_ms={"prefill": choice.prefill_ms, "decode": choice.decode_ms},
            reason=(f"split: chunked plan {pred:.1f}ms (+{wait:.1f}ms waited) > SLO {self.slo_ms:.0f}ms; "
                    f"S_d={sd} k={choice.k} step {choice.step_ms:.1f}ms (limit {limit:.0f}), "
                    f"{choice.objective:.2f} tok/ms"),
        )
        self._remember(view, plan)
        return log_plan(self, plan)

    def _plan_decode_lane(self, view: SchedulerView) -> StepPlan | None:
        """Prefill lane busy: decode on the SMs it leaves, k steps that end before the prefill does."""
        if not view.decoding:
            return None
        busy = view.inflight[LaneKind.PREFILL]
        sd = self.total - (busy.sms or self.total - self.grid[0])
        left_ms = self._left_ms(view, LaneKind.PREFILL, busy)
        wait = self._wait_ms(view)
        dshape, remaining = self._decode_shape(view)
        first, slope = self.lat.decode_curve(dshape, sd)
        if left_ms < first and wait + left_ms + first <= self.slo_ms:
            # The prefill ends within one step: wait for it, so that both lanes are planned together
            # (the only moment the partition can change); only the decode partition idles meanwhile.
            return None
        fit = 1
        while fit < self.k_max and steps_ms(first, slope, fit + 1)[0] <= left_ms:
            fit += 1
        cap = min(fit, lookahead_cap(view, remaining, self.k_max))
        got = (self.choose_k(first, slope, remaining, 0, left_ms, cap, self.slo_ms, self.slo_ms - wait)
               or self.choose_k(first, slope, remaining, 0, left_ms, cap, self.slo_ms))
        k, total, why = (got[0], got[2], "") if got else (1, first, "; partition too small for the SLO")
        plan = StepPlan(
            decode_lane=LaneBatch(decode=[r.rid for r in view.decoding], steps=k), decode_sms=sd,
            predicted_ms={"decode": total},
            reason=f"decode lane alone: prefill busy {left_ms:.1f}ms more; S_d={sd} k={k}{why}",
        )
        self._remember(view, plan)
        return log_plan(self, plan)

    def _plan_prefill_lane(self, view: SchedulerView) -> StepPlan | None:
        """Decode lane busy: next prefill chunk on the SMs it leaves, unless the partition must change."""
        busy = view.inflight[LaneKind.DECODE]
        sd = busy.sms or self.grid[0]
        reserve = len(view.decoding) + len(busy.work)
        chunks = select_prefills(view, self.split_budget or self.ctx.chunked_prefill_size, kv_reserved=reserve)
        if not chunks:
            return None
        # The next decode batch: decodes ready now, those on the lane (one step on), and the requests
        # this chunk completes. If it would break the SLO on the decode partition, leave the prefill
        # lane idle: when the decode lane finishes, both lanes re-plan the partition.
        nxt = self._decode_shape(view)[0] + [(1, w.start_pos + w.steps) for w in busy.work]
        nxt += [(1, c.start + c.length) for c in chunks if c.length >= self._left_prefill(view, c.rid)]
        if self.lat.step_ms(nxt, sd) > self.slo_ms:
            return None
        sp = self.total - sd
        tp = self.lat.step_ms([(c.length, c.start) for c in chunks], sp)
        left_ms = self._left_ms(view, LaneKind.DECODE, busy)
        plan = StepPlan(prefill_lane=LaneBatch(prefill=chunks), prefill_sms=sp, predicted_ms={"prefill": tp},
                        reason=f"prefill lane alone: decode busy {left_ms:.1f}ms more; S_p={sp}")
        self._remember(view, plan)
        return log_plan(self, plan)

    # ---- helpers ----------------------------------------------------------------------------
    def _aggregated(self, batch: LaneBatch, pred: float, reason: str) -> StepPlan:
        return log_plan(self, StepPlan(aggregated=batch, predicted_ms={"aggregated": pred}, reason=reason))

    def _decode_shape(self, view: SchedulerView) -> tuple[list[tuple[int, int]], list[int]]:
        ctx_len = view.config.context_length
        return ([(1, r.num_computed) for r in view.decoding],
                [remaining_tokens(r, ctx_len) for r in view.decoding])

    @staticmethod
    def _wait_ms(view: SchedulerView) -> float:
        """How long the longest-waiting ready decode has waited since its last token."""
        last = min((r.last_token_time for r in view.decoding if r.last_token_time is not None), default=None)
        return 0.0 if last is None else max(0.0, (view.now - last) * 1e3)

    @staticmethod
    def _left_prefill(view: SchedulerView, rid: str) -> int:
        for r in view.prefilling:
            if r.rid == rid:
                return r.remaining_prefill
        for r in view.waiting:
            if r.rid == rid:
                return r.remaining_prefill
        return 0

    def _completes(self, view: SchedulerView, chunks) -> bool:
        """Whether any chunk is its request's last (the request then joins the decode batch)."""
        return any(c.length >= self._left_prefill(view, c.rid) for c in chunks)

    def _remember(self, view: SchedulerView, plan: StepPlan) -> None:
        for lane, batch in plan.lane_batches():
            self._ends[lane] = (batch, view.now + plan.predicted_ms[lane.value] / 1e3)

    def _left_ms(self, view: SchedulerView, lane: LaneKind, launch) -> float:
        """Predicted ms until the busy lane's launch finishes (its full prediction if unknown)."""
        mine = self._ends.get(lane)
        if mine is not None and mine[0] is launch.batch:
            return max(0.0, (mine[1] - view.now) * 1e3)
        return launch.predicted_ms.get(lane.value, 0.0)
