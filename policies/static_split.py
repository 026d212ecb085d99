"""A fixed SM split: prefill and decode always isolated (DistServe-style, inside one GPU).

The decode lane owns `decode_sms` SMs (option, default 32) and runs every ready decode `lookahead`
steps at a time (option, default 1); the prefill lane owns the rest and runs prefill chunks of up
to `chunked_prefill_size` tokens. The lanes never wait for each other, so a long prefill never
delays a decode step, but neither lane can borrow the other's idle SMs: the baseline that shows
what duet's adaptivity buys. Option `ttft_order` as for chunked ("fcfs" by default).
"""
from __future__ import annotations

from sglang_duet.policies.base import (
    LaneBatch, LaneKind, Policy, PolicyContext, SchedulerView, StepPlan, deadline_view, decode_ids, log_plan,
    lookahead_cap, predict_ms, prefill_rate, remaining_tokens, require_cost_model, select_prefills, ttft_order_option,
)


class StaticSplitPolicy(Policy):
    name = "static-split"

    def __init__(self, ctx: PolicyContext | None = None):
        super().__init__(ctx)
        require_cost_model(self.ctx, self.name, need_model=False)  # the SM count comes from the hardware
        hw = self.ctx.hardware
        want = int(self.options.get("decode_sms", 32))
        grid = hw.partition_grid()
        if want not in grid:
            raise ValueError(f"static-split: decode_sms={want} is not a valid partition on {hw.name}: {grid}")
        self.decode_sms = want
        self.prefill_sms = hw.total_sms - want
        self.k = int(self.options.get("lookahead", 1))
        if self.k < 1:
            raise ValueError(f"static-split: lookahead must be >= 1, got {self.k}")
        self.ttft_order = ttft_order_option(self.options, "fcfs", self.name)
        self._rate = prefill_rate(self.ctx) * self.prefill_sms / hw.total_sms

    def plan(self, view: SchedulerView) -> StepPlan | None:
        plan = StepPlan(prefill_sms=self.prefill_sms, decode_sms=self.decode_sms, reason="static split")
        idle = view.idle_lanes
        if self.ttft_order == "deadline" and LaneKind.PREFILL in idle:
            view = deadline_view(view, self._rate, self.ctx.ttft_slo_ms)
        ready = decode_ids(view)
        if LaneKind.PREFILL in idle:
            # Keep one KV slot per decode step of the running decodes free for them.
            chunks = select_prefills(view, self.ctx.chunked_prefill_size, kv_reserved=len(ready) * self.k)
            if chunks:
                plan.prefill_lane = LaneBatch(prefill=chunks)
        if LaneKind.DECODE in idle and ready:
            ctx_len = view.config.context_length
            k = lookahead_cap(view, [remaining_tokens(r, ctx_len) for r in view.decoding], self.k)
            plan.decode_lane = LaneBatch(decode=ready, steps=k)
        if plan.is_empty():
            return None
        for lane, batch in plan.lane_batches():
            sms = self.prefill_sms if lane == LaneKind.PREFILL else self.decode_sms
            pred = predict_ms(self.ctx, view, batch, sms)
            if pred is not None:
                plan.predicted_ms[lane.value] = pred * batch.steps
        return log_plan(self, plan)
