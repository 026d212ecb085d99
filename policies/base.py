"""The policy protocol and the pieces every policy shares.

A policy has one job: given a read-only `SchedulerView` of the core, return a `StepPlan` for the
lanes that are idle. It never touches tensors, streams or sockets. Built-ins live beside this
file; `load_policy("path/to/file.py", ctx)` loads a user's own (see docs/policies.md).
"""
from __future__ import annotations

import importlib
import heapq
import importlib.util
import logging
import math
import os
import sys
from collections import deque
from dataclasses import dataclass, field

from sglang_duet.core.plan import LaneBatch, LaneKind, Launch, LaunchResult, PrefillChunk, StepPlan
from sglang_duet.core.scheduler_core import SchedulerView
from sglang_duet.policies import search_kernels_loader as search_kernels
from sglang_duet.policies.pricing import Priced, Summary, SummaryPricer, prefill_summary  # re-exported

logger = logging.getLogger("sglang_duet.policy")

__all__ = [
    "Policy", "PolicyContext", "SchedulerView", "StepPlan", "LaneBatch", "LaneKind", "PrefillChunk",
    "select_prefills", "load_policy", "BUILTIN_POLICIES", "require_cost_model", "decode_ids", "chunked_batch",
    "batch_shape", "remaining_tokens", "useful_decode_tokens", "lookahead_cap", "LatencyModel", "steps_ms",
    "predict_ms", "log_plan", "decode_sms_grid", "Summary", "SummaryPricer", "prefill_summary", "deadline_order",
    "deadline_view", "ttft_order_option", "prefill_rate", "Priced",
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
    # Lanes the executor can run at once: 2 (split plans' lanes side by side) or 1 (a CPU's model
    # executor: a split's two lanes would run one after the other, so a policy must not price them
    # as concurrent).
    lanes: int = 2


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


def select_prefills(view: SchedulerView, token_budget: int, kv_reserved: int = 0,
                    remaining: list[int] | None = None) -> list[PrefillChunk]:
    """Prefill chunks up to `token_budget` tokens: unfinished prefills first, then the waiting queue (FCFS).

    The last request taken may be chunked. A waiting request is admitted only if its whole remaining
    prefill fits in the free KV (after `kv_reserved` slots kept for this step's decodes), so a started
    prefill can always finish; running requests that outgrow KV are retracted by the core.

    With the prefix cache, a waiting request's `num_computed` is its cached prefix while the core
    plans: its chunk starts there (the cost model then prices the cached context, not the prefix
    again), the budget pays only for the uncached tokens, and its KV need adds `prefix_pin` (cached
    slots that count as free until it is admitted and locks them).

    `remaining`: a list to append each chunk's request's remaining prefill to (a chunk that covers
    it completes the request), read in the same pass (duet's search needs it every plan).
    """
    chunks: list[PrefillChunk] = []
    budget = token_budget
    kv_free = view.kv_free - kv_reserved
    running = view.num_running
    for r in view.prefilling:
        if budget <= 0 or kv_free <= 0:
            return chunks
        need = r.remaining_prefill
        n = min(need, budget, kv_free)
        chunks.append(PrefillChunk(r.rid, r.num_computed, n))
        if remaining is not None:
            remaining.append(need)
        budget -= n
        kv_free -= n
    for r in view.waiting:
        if budget <= 0 or running >= view.config.max_running_requests:
            break
        need = r.remaining_prefill
        pin = r.prefix_pin
        if need + pin + 1 > kv_free:
            break  # FCFS: do not let later (shorter) requests overtake the head of the queue
        n = min(need, budget)
        chunks.append(PrefillChunk(r.rid, r.num_computed, n))
        if remaining is not None:
            remaining.append(need)
        budget -= n
        kv_free -= n + pin
        running += 1
    return chunks


BUILTIN_POLICIES = {
    "aggregated": "sglang_duet.policies.aggregated",
    "chunked": "sglang_duet.policies.chunked",
    "duet": "sglang_duet.policies.duet",
    "duet-paper": "sglang_duet.policies.duet_paper",
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
        sys.modules[spec.name] = module  # dataclasses (and pickling) look the module up while it runs
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


# ---- shared helpers for the built-in policies (and users' own) --------------------------------
#
# Everything a policy needs twice lives here, so chunked, duet and static-split stay short and
# agree on what a "chunked plan", a batch's shape or a look-ahead limit is.


def require_cost_model(ctx: PolicyContext, policy_name: str, need_model: bool = True) -> None:
    """Fail at construction (not at the first long prompt) when a policy needs the roofline."""
    if ctx.hardware is None or (need_model and ctx.cost_model is None):
        what = "a cost model" if need_model else "a hardware spec"
        raise ValueError(
            f"policy {policy_name!r} needs {what}: pass --hardware (e.g. h100, or a calibration YAML) "
            f"and a model the cost model can describe (--model-config for dummy weights or the emulated "
            f"executor); no cost model is configured"
        )


def decode_ids(view: SchedulerView) -> list[str]:
    return [r.rid for r in view.decoding]


def chunked_batch(view: SchedulerView, token_budget: int) -> LaneBatch:
    """Decode-first mixed batch (Sarathi-Serve / vLLM v1 / SGLang --enable-mixed-chunk).

    Every ready decode gets its token; prefill chunks fill what is left of `token_budget`.
    Each decode reserves one KV slot before any prefill is admitted."""
    decodes = decode_ids(view)
    prefills = select_prefills(view, token_budget - len(decodes), kv_reserved=len(decodes))
    return LaneBatch(prefill=prefills, decode=decodes)


# ---- queue order under TTFT pressure --------------------------------------------------------------


def deadline_order(view: SchedulerView, tokens_per_ms: float, ttft_slo_ms: float,
                   defer_limit_ms: float | None = None) -> list:
    """The waiting queue with the requests that can still meet the TTFT SLO first (FCFS among them),
    then those that cannot (FCFS): the order that lets the most requests meet it.

    Moore-Hodgson on one server: walk the queue in deadline order (arrival order, the SLO being the
    same for all), accumulating prefill time at `tokens_per_ms` after what is already prefilling;
    whenever the request just added would finish past its deadline, set aside the longest request
    taken so far. Retracted requests (their first token already out) keep their place at the front,
    and so does a request that has waited longer than `defer_limit_ms` (default 4 TTFT SLOs), so
    that nothing is deferred for ever. Returns `view.waiting` itself when the order is FCFS (nothing
    set aside, or only the last requests)."""
    waiting = view.waiting
    if len(waiting) < 2:
        return waiting
    now = view.now * 1e3
    limit = 4 * ttft_slo_ms if defer_limit_ms is None else defer_limit_ms
    t = start = now + sum(r.remaining_prefill for r in view.prefilling) / tokens_per_ms
    cols = view.waiting_columns
    if cols is not None and search_kernels.AVAILABLE:  # the same walk, compiled, over the core's columns
        aside, fcfs_ok = search_kernels.kernels().deadline_walk(
            cols.arrival, cols.seq_len, cols.out_len, cols.computed, start, now, limit, tokens_per_ms, ttft_slo_ms)
        return waiting if fcfs_ok else _set_aside(waiting, aside.tolist())
    # One pass over the queue (this runs every plan, and a queue's requests are cold in the cache):
    # Moore-Hodgson, and the sums that say whether everyone makes it in FCFS order anyway (then its
    # answer is not needed). The heap holds the longest request taken first, ties to the earliest:
    # the key -n * size + i orders as the pair (-n, i) does (0 <= i < size), one int per request.
    size = len(waiting)
    heap: list[int] = []
    late: list[int] = []
    push, pushpop = heapq.heappush, heapq.heappushpop
    total, first = 0, math.inf
    for i, r in enumerate(waiting):
        out = len(r.output_ids)
        n = r.prompt_len + out - r.num_computed  # remaining_prefill inlined (prompt_len: the prompt list is cold)
        total += n
        a = r.arrival_time
        if a < first:
            first = a
        n += r.pending
        t += n / tokens_per_ms
        a *= 1e3
        if out or now - a > limit:
            continue  # retracted (its first token is out), or deferred long enough: keeps its place
        if t > a + ttft_slo_ms:  # late: take it and set the longest taken aside, in one heap operation
            key = pushpop(heap, -n * size + i)
            j = key % size
            late.append(j)
            t += (key - j) // size / tokens_per_ms  # -n of the request set aside
        else:
            push(heap, -n * size + i)
    if start + total / tokens_per_ms <= first * 1e3 + ttft_slo_ms:
        return waiting  # everyone makes it in FCFS order
    return _set_aside(waiting, late)


def _set_aside(waiting: list, late: list[int]) -> list:
    """The queue with the requests at indices `late` moved to its end, in queue order."""
    late.sort()
    if not late or late[0] == len(waiting) - len(late):
        return waiting  # nothing set aside, or only the last ones: the order stays FCFS
    aside = set(late)
    return [r for i, r in enumerate(waiting) if i not in aside] + [waiting[j] for j in late]


def deadline_view(view: SchedulerView, tokens_per_ms: float, ttft_slo_ms: float) -> SchedulerView:
    """`view` with its waiting queue in `deadline_order` (the same view when the order is FCFS)."""
    order = deadline_order(view, tokens_per_ms, ttft_slo_ms)
    if order is view.waiting:
        return view
    # dataclasses.replace, without its per-call look-up of the fields (a view has no init=False ones);
    # the columns follow the core's order, not this one
    return type(view)(**{**view.__dict__, "waiting": order, "waiting_columns": None})


def ttft_order_option(options: dict, default: str, who: str) -> str:
    """The `ttft_order` option: "fcfs" (the core's order) or "deadline" (`deadline_order`)."""
    v = str(options.get("ttft_order", default))
    if v not in ("fcfs", "deadline"):
        raise ValueError(f"{who}: ttft_order must be 'fcfs' or 'deadline', got {v!r}")
    return v


def prefill_rate(ctx: PolicyContext, tokens: int = 4096) -> float:
    """Prefill tokens per ms of a fresh `tokens`-token chunk on the whole GPU (by the cost model);
    a fixed guess (40 tokens/ms) without one."""
    if ctx.cost_model is None:
        return 40.0
    return tokens / (ctx.cost_model.batch_time([(tokens, 0)]) * 1e3)


def batch_shape(view: SchedulerView, batch: LaneBatch) -> list[tuple[int, int]]:
    """The cost model's (new tokens, cached tokens) per request for one step of `batch`."""
    shape = [(c.length, c.start) for c in batch.prefill]
    if batch.decode:
        ctx = {r.rid: r.num_computed for r in view.decoding}
        shape.extend((1, ctx[rid]) for rid in batch.decode)
    return shape


def remaining_tokens(r, context_length: int) -> int:
    """Tokens a decoding request may still emit (max_new_tokens, then the context length)."""
    left = context_length - r.seq_len
    if r.max_new_tokens is not None:
        left = min(left, r.max_new_tokens - len(r.output_ids))
    return max(1, left)


def useful_decode_tokens(remaining: list[int], k: int) -> int:
    """Tokens a k-step decode launch really delivers: a request that finishes after m < k
    steps contributes m (its later steps are wasted rows of the launch)."""
    return sum(min(k, m) for m in remaining)


def lookahead_cap(view: SchedulerView, remaining: list[int], k_max: int, kv_reserved: int = 0) -> int:
    """Largest useful look-ahead: at most k_max, no more steps than the longest remaining
    request needs, and k * batch KV slots must fit after `kv_reserved` (this step's prefills)."""
    return lookahead_cap_of(view, len(remaining), max(remaining, default=1), k_max, kv_reserved)


def lookahead_cap_of(view: SchedulerView, n: int, longest: int, k_max: int, kv_reserved: int = 0) -> int:
    """`lookahead_cap` from the batch size n and the longest remaining output (what a policy that
    summarises its decodes keeps instead of the list)."""
    if n <= 0:
        return 1
    kv_k = (view.kv_free - kv_reserved) // n
    return max(1, min(k_max, longest, kv_k))


class LatencyModel:
    """The cost model as policies use it: milliseconds for a plan's lane batches.

    A k-step decode launch's steps see growing contexts; step time is (nearly) linear in the
    context, so the first and the k_ref-th step are priced and the steps in between
    interpolated: two roofline calls per SM count instead of k."""

    def __init__(self, cost_model, k_ref: int = 8):
        self.cm = cost_model
        self.k_ref = max(2, k_ref)

    def step_ms(self, shape, sms: int | None = None) -> float:
        return self.cm.batch_time(shape, sms) * 1e3 if shape else 0.0

    def decode_steps_ms(self, shape, sms: int | None, k: int) -> tuple[float, float]:
        """(total ms of k back-to-back decode steps, ms of the slowest (last) step)."""
        return steps_ms(*self.decode_curve(shape, sms), k)

    def decode_curve(self, shape, sms: int | None) -> tuple[float, float]:
        """(first step ms, growth per step ms): decode_steps_ms for every k from two calls."""
        first = self.step_ms(shape, sms)
        later = self.step_ms([(q, c + self.k_ref - 1) for q, c in shape], sms)
        return first, (later - first) / (self.k_ref - 1)


def steps_ms(first: float, slope: float, k: int) -> tuple[float, float]:
    """(total, last step) ms of k decode steps on a linear step-time curve."""
    return k * first + slope * k * (k - 1) / 2, first + slope * (k - 1)


def predict_ms(ctx: PolicyContext, view: SchedulerView, batch: LaneBatch, sms: int | None = None) -> float | None:
    """Predicted ms of one step of `batch`, or None without a cost model (prediction is optional
    for policies that decide without one; it feeds the predicted-vs-actual log)."""
    if ctx.cost_model is None or batch.is_empty():
        return None
    return ctx.cost_model.batch_time(batch_shape(view, batch), sms) * 1e3


def log_plan(policy: Policy, plan: StepPlan) -> StepPlan:
    """Debug log of every decision; predicted vs actual follows in on_result."""
    if logger.isEnabledFor(logging.DEBUG):
        lanes = ", ".join(
            f"{lane.value}: {len(b.prefill)}p/{b.prefill_tokens}t + {len(b.decode)}d x{b.steps}"
            for lane, b in plan.lane_batches()
        )
        pred = ", ".join(f"{k}={v:.1f}ms" for k, v in plan.predicted_ms.items())
        logger.debug("%s plan %s [%s] sms=(p=%s, d=%s) predicted(%s): %s", policy.name, plan.mode, lanes,
                     plan.prefill_sms, plan.decode_sms, pred, plan.reason)
    return plan


def _sm_count(x) -> int:
    """An SM count from an int, an integral float or a decimal string (bools are not counts)."""
    if isinstance(x, bool) or (isinstance(x, float) and not x.is_integer()):
        raise ValueError(x)
    return int(x) if isinstance(x, (int, float)) else int(str(x).strip())


def decode_sms_grid(hw, value, who: str = "duet") -> list[int]:
    """The `decode_sms_grid` option: sorted distinct decode-partition sizes on the hardware's
    partition grid (None: all of it). Accepts a list of ints or a comma string ("16,32,48")."""
    grid = hw.partition_grid()
    if value is None:
        return grid
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, (int, float)):
        items = [items]
    try:
        sizes = sorted({_sm_count(x) for x in items if str(x).strip() != ""})
    except (TypeError, ValueError):
        raise ValueError(f"{who}: decode_sms_grid must be a list of SM counts or a comma string, got {value!r}") \
            from None
    if not sizes:
        raise ValueError(f"{who}: decode_sms_grid must name at least one SM count, got {value!r}")
    bad = [s for s in sizes if s not in grid]
    if bad:
        raise ValueError(f"{who}: decode_sms_grid has {bad}, not on the partition grid of {hw.name}: {grid}")
    return sizes
