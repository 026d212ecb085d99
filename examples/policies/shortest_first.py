"""Shortest-prompt-first: a complete user policy (see docs/policies.md).

Run it with `--policy examples/policies/shortest_first.py`. Each step runs every ready decode
plus prefill chunks up to the token budget, like `chunked`, but admits waiting requests
shortest prompt first instead of first-come-first-served: short prompts get their first token
sooner, at the risk of starving long ones under sustained load.
"""
from __future__ import annotations

import dataclasses

from sglang_duet.policies.base import (
    LaneBatch, Policy, SchedulerView, StepPlan, decode_ids, log_plan, predict_ms, select_prefills,
)


class ShortestFirstPolicy(Policy):
    name = "shortest-first"

    def plan(self, view: SchedulerView) -> StepPlan | None:
        if not view.all_idle:
            return None  # aggregated only: one launch on all SMs at a time
        decodes = decode_ids(view)
        # select_prefills admits in the order of view.waiting: hand it the queue sorted by length.
        by_length = dataclasses.replace(view, waiting=sorted(view.waiting, key=lambda r: r.remaining_prefill))
        prefills = select_prefills(by_length, self.ctx.chunked_prefill_size - len(decodes), kv_reserved=len(decodes))
        batch = LaneBatch(prefill=prefills, decode=decodes)
        if batch.is_empty():
            return None
        plan = StepPlan(aggregated=batch, reason="shortest prompt first")
        pred = predict_ms(self.ctx, view, batch)  # None without a cost model: prediction is optional
        if pred is not None:
            plan.predicted_ms["aggregated"] = pred
        return log_plan(self, plan)
