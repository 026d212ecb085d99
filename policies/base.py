"""The policy protocol and the pieces every policy shares.

A policy has one job: given a read-only `SchedulerView` of the core, return a `StepPlan` for the
lanes that are idle. It never touches tensors, streams or sockets. Built-ins live beside this
file; `load_policy("path/to/file.py", ctx)` loads a user's own (see docs/policies.md).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections import deque
from dataclasses import dataclass, field

from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, LaunchResult, PrefillChunk, StepPlan
from sglang_duet.core.scheduler_core import SchedulerView

logger = logging.getLogger("sglang_duet.policy")

__all__ = [
    "Policy", "PolicyContext", "SchedulerView", "StepPlan", "LaneBatch", "LaneKind", "PrefillChunk",
    "select_prefills", "load_policy", "BUILTIN_POLICIES",
]


@dataclass
class PolicyContext:
    """What a policy is configured with (from the server args and --policy-config)."""

    chunked_prefill_size: int = 8192
    tbt_slo_ms: float = 100.0
    ttft_slo_ms: float = 1000.0
    cost_model: object | None = None  # sglang_duet.cost_model.CostModel, when one is configured
    hardware: object | None = None  # sglang_duet.cost_model.HardwareSpec
    options: dict = field(default_factory=dict)


@dataclass
class Decision:
    """One plan's prediction next to what the lanes measured (for logs and metrics)."""

    mode: str
    lane: str
    predicted_ms: float | None
    actual_ms: float
    sms: int | None
    steps: int
    num_tokens: int


class Policy:
    name = "base"

    def __init__(self, ctx: PolicyContext | None = None):
        self.ctx = ctx or PolicyContext()
        self.options = dict(self.ctx.options)
        self.decisions: deque[Decision] = deque(maxlen=1024)

    def plan(self, view: SchedulerView) -> StepPlan | None:
        raise NotImplementedError

    def on_result(self, launch: Launch, result: LaunchResult) -> None:
        """Record predicted vs measured latency of a finished launch."""
        actual_ms = (result.finished_at - result.started_at) * 1e3
        predicted = launch.predicted_ms.get(launch.lane.value)
        d = Decision(
            mode="aggregated" if launch.lane == LaneKind.AGGREGATED else "split", lane=launch.lane.value,
            predicted_ms=predicted, actual_ms=actual_ms, sms=launch.sms, steps=launch.batch.steps,
            num_tokens=launch.batch.num_tokens,
        )
        self.decisions.append(d)
        if predicted is not None:
            logger.debug("%s lane=%s sms=%s k=%d tokens=%d predicted=%.2fms actual=%.2fms", self.name, d.lane,
                         d.sms, d.steps, d.num_tokens, predicted, actual_ms)

    def describe(self) -> dict:
        return {"name": self.name, "tbt_slo_ms": self.ctx.tbt_slo_ms, "ttft_slo_ms": self.ctx.ttft_slo_ms,
                "chunked_prefill_size": self.ctx.chunked_prefill_size, "options": self.options}

    def __repr__(self) -> str:
        return f"<policy {self.name}>"


def select_prefills(view: SchedulerView, token_budget: int, kv_reserved: int = 0) -> list[PrefillChunk]:
    """Prefill chunks up to `token_budget` tokens: unfinished prefills first, then the waiting queue (FCFS).

    The last request taken may be chunked. A waiting request is admitted only if its whole remaining
    prefill fits in the free KV (after `kv_reserved` slots kept for this step's decodes), so a started
    prefill can always finish; running requests that outgrow KV are retracted by the core.
    """
    chunks: list[PrefillChunk] = []
    budget = token_budget
    kv_free = view.kv_free - kv_reserved
    running = view.num_running
    for r in view.prefilling:
        if budget <= 0 or kv_free <= 0:
            return chunks
        n = min(r.remaining_prefill, budget, kv_free)
        chunks.append(PrefillChunk(r.rid, r.num_computed, n))
        budget -= n
        kv_free -= n
    for r in view.waiting:
        if budget <= 0 or running >= view.config.max_running_requests:
            break
        need = r.remaining_prefill
        if need + 1 > kv_free:
            break  # FCFS: do not let later (shorter) requests overtake the head of the queue
        n = min(need, budget)
        chunks.append(PrefillChunk(r.rid, r.num_computed, n))
        budget -= n
        kv_free -= n
        running += 1
    return chunks


BUILTIN_POLICIES = {
    "aggregated": "sglang_duet.policies.aggregated",
    "chunked": "sglang_duet.policies.chunked",
    "duet": "sglang_duet.policies.duet",
    "static-split": "sglang_duet.policies.static_split",
}


def load_policy(name_or_path: str, ctx: PolicyContext | None = None) -> Policy:
    """A built-in policy by name, or the Policy subclass defined in a user's .py file."""
    if name_or_path in BUILTIN_POLICIES:
        module = importlib.import_module(BUILTIN_POLICIES[name_or_path])
    elif name_or_path.endswith(".py"):
        if not os.path.isfile(name_or_path):
            raise ValueError(f"--policy: no such policy file {name_or_path!r}")
        spec = importlib.util.spec_from_file_location(f"sglang_duet_user_policy_{abs(hash(name_or_path))}", name_or_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        known = ", ".join(sorted(BUILTIN_POLICIES))
        raise ValueError(f"--policy: unknown policy {name_or_path!r}; use one of {known} or a path to a .py file")
    classes = [
        v for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, Policy) and v is not Policy and v.__module__ == module.__name__
    ]
    if len(classes) != 1:
        raise ValueError(f"--policy: {name_or_path!r} must define exactly one Policy subclass, found {len(classes)}")
    return classes[0](ctx or PolicyContext())
