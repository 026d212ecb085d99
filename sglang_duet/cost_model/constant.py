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

    def weight_bytes(self) -> int:
        return int(self.model.num_params() * self.b)

    def describe(self) -> str:
        return f"constant {self.step_s * 1e3:g} ms per step"


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

