"""Decode-first chunked prefill (Sarathi-Serve, vLLM v1, SGLang --enable-mixed-chunk).

Every step runs one token for every running decode plus prefill chunks up to the token budget
(`chunked_prefill_size`) minus those decodes, on all SMs. A long prompt is spread over many
steps, so no step is much longer than a budget's worth of tokens: TBT stays bounded at the
price of re-reading the weights (and earlier chunks' KV) once per chunk.

Option `ttft_order` ("fcfs", the default, or "deadline": admit first the waiting requests that
can still meet the TTFT SLO, see base.deadline_order) to measure what queue order alone is worth.
"""
from __future__ import annotations

from sglang_duet.policies.base import (
    Policy, PolicyContext, SchedulerView, StepPlan, chunked_batch, deadline_view, log_plan, predict_ms, prefill_rate,
    ttft_order_option,
)


class ChunkedPolicy(Policy):
    name = "chunked"
    supports_overlap = True  # aggregated batches only: see AggregatedPolicy

    def __init__(self, ctx: PolicyContext | None = None):
        super().__init__(ctx)
        self.ttft_order = ttft_order_option(self.options, "fcfs", self.name)
        self._rate = prefill_rate(self.ctx)

    def plan(self, view: SchedulerView) -> StepPlan | None:
        if not view.all_idle:
            return None  # one lane on all SMs: wait for the launch in flight
        if self.ttft_order == "deadline":
            view = deadline_view(view, self._rate, self.ctx.ttft_slo_ms)
        batch = chunked_batch(view, self.ctx.chunked_prefill_size)
        if batch.is_empty():
            return None
        plan = StepPlan(aggregated=batch, reason=f"decode-first, budget {self.ctx.chunked_prefill_size}")
        pred = predict_ms(self.ctx, view, batch)
        if pred is not None:
            plan.predicted_ms["aggregated"] = pred
        return log_plan(self, plan)
