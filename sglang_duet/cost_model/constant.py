"""A device that costs exactly a fixed time per step, whatever the batch.

`ConstantCostModel` has the interface the emulated executor and the policies use of
`roofline.CostModel` (`breakdown`, `batch_time`, `decode_time`, `prefill_time`, `model`, `hw`,
`b`) but prices every forward pass at `step_s`: one decode step of 1 or 1024 requests, a prefill
chunk of 16 or 8192 tokens, on any number of SMs. It reports no HBM bytes, so the emulator's
bandwidth-contention model never slows it down.

What it is for: measuring the host side (scheduler loop, IPC, detokenizer, HTTP) against a
known physical limit. With a step of S seconds, a batch of B decoding requests can get at most
B / S tokens/s out of the device; whatever a client receives below that is host overhead
(`benchmark/host_overhead.py`). Selected with `--executor emulated --emulated-step-ms MS`.
"""
from __future__ import annotations

from typing import Sequence

from .roofline import OpCost
from .truth import LaunchCost, work_columns


class ConstantCostModel:
    def __init__(self, step_s: float, model, hw, dtype_bytes: int = 2):
        if not step_s > 0:
            raise ValueError(f"the constant step time must be positive, got {step_s!r} s")
        self.step_s = float(step_s)
        self.model, self.hw, self.b = model, hw, dtype_bytes

    @classmethod
    def like(cls, base, step_s: float) -> "ConstantCostModel":
        """The same model and hardware description as `base` (a CostModel), at a fixed step time."""
        return cls(step_s, base.model, base.hw, getattr(base, "b", 2))

    def breakdown(self, reqs: Sequence[tuple[int, int]], sms: int | None = None,
                  bandwidth_share: float = 1.0) -> list[OpCost]:
        if not reqs:
            return []
        return [OpCost("step", 0.0, 0.0, 0, self.step_s, "constant")]

    def batch_time(self, reqs: Sequence[tuple[int, int]], sms: int | None = None,
                   bandwidth_share: float = 1.0) -> float:
        return self.step_s if reqs else 0.0

    def decode_time(self, batch: int, ctx=None, sms: int | None = None, bandwidth_share: float = 1.0) -> float:
        return self.step_s if batch else 0.0

    def prefill_time(self, tokens: int, sms: int | None = None, cached: int = 0,
                     bandwidth_share: float = 1.0) -> float:
        return self.step_s if tokens else 0.0

    def truth_pricer(self) -> "ConstantPricer":
        """The emulated executor's pricer of this device (truth.make_pricer asks for it)."""
        return ConstantPricer(self)

    def weight_bytes(self) -> int:
        return int(self.model.num_params() * self.b)

    def describe(self) -> str:
        return f"constant {self.step_s * 1e3:g} ms per step"


class ConstantPricer:
    """Prices launches on a ConstantCostModel for the emulated executor: what truth.BreakdownPricer
    makes of its one-operator `breakdown` (each step costs `step_s`, fixed time: no HBM bytes for
    contention to stretch), without building each step's shape: only how many rows step, never
    what they hold, changes the cost."""

    def __init__(self, cm: ConstantCostModel):
        self.cm = cm

    def price(self, work, sms) -> LaunchCost:
        return self.price_rows(*work_columns(work), sms)

    def price_rows(self, q: list[int], c: list[int], s: list[int], sms) -> LaunchCost:
        lc = LaunchCost()
        step = self.cm.step_s
        for j in range(max(s)):
            rows = len(s) if j == 0 else sum(map(j.__lt__, s))  # rows still stepping: s > j
            lc.fixed += step
            lc.step_s.append(step)
            lc.step_reqs.append(rows)
        return lc


def install_constant_device(engine, step_ms: float) -> ConstantCostModel:
    """Make an EngineCore's emulated executor (and its policy's cost model) cost `step_ms` per launch.

    Also turns off what would make a launch cost anything but the fixed step: the emulator's
    truth model (noise, host time per step, partition-switch cost), HBM contention between lanes
    and time scaling. The emulated executor is built by `executor/emulated.build_emulated`; this
    swaps its cost model and truth afterwards (both are settable there for this purpose).
    """
    ex = engine.executor
    if not hasattr(ex, "cm"):
        raise ValueError("--emulated-step-ms needs --executor emulated")
    cm = ConstantCostModel.like(ex.cm, step_ms / 1e3)
    if hasattr(ex, "truth"):
        from sglang_duet.cost_model.truth import TruthConfig

        ex.truth = TruthConfig.exact(contention="none")
    ex.cm = cm
    if hasattr(ex, "contention"):
        ex.contention = "none"
    if hasattr(ex, "time_scale"):
        ex.time_scale = 1.0
    policy = getattr(engine, "policy", None)
    ctx = getattr(policy, "ctx", None)
    if ctx is not None and getattr(ctx, "cost_model", None) is not None:
        # Predictions agree with the device. A policy reads its cost model when it is built (duet
        # fits its pricer and search tables then), so it is built again on the constant one.
        ctx.cost_model = cm
        fresh = type(policy)(ctx)
        engine.policy = fresh
        core = getattr(engine, "core", None)
        if core is not None and getattr(core, "policy", None) is policy:
            core.policy = fresh
    engine.device = f"emulated:{cm.describe()}"
    return cm

