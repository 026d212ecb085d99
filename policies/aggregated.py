"""Prefill-first continuous batching (SGLang's default behaviour).

When prompts wait and KV allows, run a prefill-only batch of up to `chunked_prefill_size` tokens
(the last prompt may be chunked); otherwise run one decode step for every running request.
Prefill and decode never share a batch, so a long prompt stalls every running stream for the
whole prefill: the TBT spikes that chunked and duet exist to remove.
"""
from __future__ import annotations

from sglang_duet.policies.base import LaneBatch, Policy, SchedulerView, StepPlan, select_prefills


class AggregatedPolicy(Policy):
    name = "aggregated"
    # Plans only aggregated batches from the view it is given: the next step can be planned while
    # one runs (overlap scheduling, SchedulerCore's CoreConfig.overlap).
    supports_overlap = True

    def plan(self, view: SchedulerView) -> StepPlan | None:
        if not view.all_idle:
            return None  # one lane on all SMs: wait for the launch in flight
        prefills = select_prefills(view, self.ctx.chunked_prefill_size)
        if prefills:
            return StepPlan(aggregated=LaneBatch(prefill=prefills), reason="prefill-first")
        if view.decoding:
            return StepPlan(aggregated=LaneBatch(decode=[r.rid for r in view.decoding]), reason="decode")
        return None
