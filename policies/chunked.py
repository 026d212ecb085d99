"""Decode-first chunked prefill (Sarathi-Serve, vLLM v1, SGLang --enable-mixed-chunk).

Every step runs one token for every running decode plus prefill chunks up to the token budget
(`chunked_prefill_size`) minus those decodes, on all SMs. A long prompt is spread over many
steps, so no step is much longer than a budget's worth of tokens: TBT stays bounded at the
price of re-reading the weights (and earlier chunks' KV) once per chunk.

Option `ttft_order` ("fcfs", the default, or "deadline": admit first the waiting requests that
can still meet the TTFT SLO, see base.deadline_order) to measure what queue order alone is worth.

Option `surge_tokens` (default 0: off; the CPU default policy sets it, cost_model/cpu_budget.py): the
budget protects running streams, so while more requests wait for their first token (waiting or
mid-prefill) than streams decode, a step's prefill may take `surge_tokens` tokens instead. A burst
of arrivals is then prefilled in one or two efficient steps instead of 64-token chunks that every
running stream waits through, one after the other; a lone long prompt next to a running stream is
still chunked at the budget.
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
        self.surge_tokens = int(self.options.get("surge_tokens", 0))
        if self.surge_tokens < 0:
            raise ValueError(f"{self.name}: surge_tokens must be >= 0, got {self.surge_tokens}")

    def plan(self, view: SchedulerView) -> StepPlan | None:
        if not view.all_idle:
            return None  # one lane on all SMs: wait for the launch in flight
        if self.ttft_order == "deadline":
            view = deadline_view(view, self._rate, self.ctx.ttft_slo_ms)
        budget, why = self.ctx.chunked_prefill_size, "decode-first"
        if self.surge_tokens > budget and len(view.waiting) + len(view.prefilling) > len(view.decoding):
            budget, why = self.surge_tokens, "surge: more requests wait for a first token than decode"
        batch = chunked_batch(view, budget)
        if batch.is_empty():
            return None
        plan = StepPlan(aggregated=batch, reason=f"{why}, budget {budget}")
        pred = predict_ms(self.ctx, view, batch)
        if pred is not None:
            plan.predicted_ms["aggregated"] = pred
        return log_plan(self, plan)
