"""Tensor parallelism in the roofline: one forward pass on a group of N GPUs.

Megatron-style TP (what sglang_duet/distributed/ runs): column-parallel QKV and gate/up,
row-parallel o_proj and down, so each GPU does 1/N of every GEMM's FLOPs and reads 1/N of the
weights and KV, then two all-reduces per layer (after o_proj, after down) of the activations,
tokens x hidden x dtype bytes. The group is priced as one GPU with N times the compute, HBM
bandwidth and memory (`scaled_hardware`; SM counts stay per GPU, since each GPU of the group
runs the same partition), plus the communication:

  all-reduce of B bytes over N GPUs (the DuetServe paper's communication operator, a ring):
      t_link(B)   = 2(N-1)·a + 2(N-1)·B / (N·B_link)
    2(N-1) hops (reduce-scatter then all-gather), each paying the per-hop latency a and moving
    one B/N chunk over the link at B_link bytes/s per direction.
  its reduction arithmetic (memory-bound on each GPU):
      t_reduce(B) = 3(N-1)·B / (N·BW_hbm)
    each of the N-1 reduce-scatter steps reads the local and the received B/N chunk and writes
    their sum, at one GPU's achievable HBM bandwidth.
  per forward pass: t_comm = 2·L·(t_link(B) + t_reduce(B)),  B = T·hidden·dtype_bytes.

The all-reduce is serial with the layer's compute (no overlap modelled) and does not depend on
the SM partition (NCCL's few SMs are not taken from the lanes). Link numbers come from the
hardware file (`link_bandwidth`, `link_efficiency`, `link_latency_s`); docs/cost-model.md.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .hardware import Curves, HardwareSpec
from .roofline import CostModel, OpCost


@dataclass(frozen=True)
class LinkSpec:
    """GPU-to-GPU link: all-reduces inside a TP group and KV transfers between instances.

    The defaults (used when a hardware file has no link) are H100/H200 SXM NVLink 4: 900 GB/s per
    GPU both directions together, 450 GB/s each way (NVIDIA datasheet); NCCL reaches ~80% of it
    on large messages (ESTIMATE). The per-hop latency is an ESTIMATE of one ring step (kernel
    handshake + NVLink hop), ~3 us; see docs/cost-model.md."""

    name: str = "nvlink4"
    bandwidth: float = 450e9 * 0.80  # B_link: achievable bytes/s per GPU, one direction
    latency_s: float = 3e-6  # a: per ring hop

    @classmethod
    def from_hardware(cls, hw: HardwareSpec) -> "LinkSpec":
        """The hardware file's link; the defaults where it names none."""
        if hw.link is None:
            return cls()
        return cls(name=hw.link.get("name", cls.name),
                   bandwidth=hw.link.get("bandwidth", cls.bandwidth),
                   latency_s=hw.link.get("latency_s", cls.latency_s))


def allreduce_link_time(nbytes: float, n_gpus: int, link: LinkSpec) -> float:
    """t_link(B) = 2(N-1)·a + 2(N-1)·B / (N·B_link): one ring all-reduce on the link."""
    if n_gpus <= 1:
        return 0.0
    hops = 2 * (n_gpus - 1)
    return hops * link.latency_s + hops * nbytes / (n_gpus * link.bandwidth)


def allreduce_reduce_time(nbytes: float, n_gpus: int, hbm_bandwidth: float) -> float:
    """t_reduce(B) = 3(N-1)·B / (N·BW_hbm): the sums of the reduce-scatter, memory-bound."""
    if n_gpus <= 1:
        return 0.0
    return 3 * (n_gpus - 1) * nbytes / (n_gpus * hbm_bandwidth)


def scaled_hardware(hw: HardwareSpec, tp: int) -> HardwareSpec:
    """tp GPUs as one: tp times the compute, bandwidth and memory (each SM count is per GPU)."""
    if tp == 1:
        return hw
    return dataclasses.replace(
        hw, name=f"{hw.name}x{tp}", peak_flops_bf16=hw.peak_flops_bf16 * tp, peak_bandwidth=hw.peak_bandwidth * tp,
        memory_bytes=hw.memory_bytes * tp,
        curves=Curves(compute=hw.curves.compute.scaled(tp), bandwidth=hw.curves.bandwidth.scaled(tp)))


class TPCostModel(CostModel):
    """The roofline of one forward pass on a tensor-parallel group of `tp` GPUs (tp=1: the plain model)."""

    def __init__(self, model, hw: HardwareSpec, tp: int = 1, link: LinkSpec | None = None, dtype_bytes: int = 2):
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        super().__init__(model, scaled_hardware(hw, tp), dtype_bytes)
        self.tp = tp
        self.link = link or LinkSpec.from_hardware(hw)
        self.base_hw = hw

    @classmethod
    def load(cls, model: str, hardware: str, tp: int = 1, link: LinkSpec | None = None,
             dtype_bytes: int = 2) -> "TPCostModel":
        base = CostModel.load(model, hardware, dtype_bytes)
        return cls(base.model, base.hw, tp, link, dtype_bytes)

    def on_hardware(self, hw: HardwareSpec) -> "TPCostModel":
        """The same TP group on other (per-GPU) hardware: what a truth with its own curves prices with."""
        return TPCostModel(self.model, hw, self.tp, self.link, self.b)

    def allreduce_time(self, tokens: int) -> float:
        """t_comm = 2·L·(t_link(B) + t_reduce(B)), B = tokens·hidden·dtype: two all-reduces per layer."""
        if self.tp == 1:
            return 0.0
        nbytes = tokens * self.h * self.b
        one = (allreduce_link_time(nbytes, self.tp, self.link)
               + allreduce_reduce_time(nbytes, self.tp, self.base_hw.bandwidth()))
        return 2 * self.L * one

    def breakdown(self, reqs, sms=None, bandwidth_share=1.0) -> list[OpCost]:
        ops = super().breakdown(reqs, sms, bandwidth_share)
        if self.tp > 1 and reqs:
            t = self.allreduce_time(sum(q for q, _ in reqs))
            ops.append(OpCost("allreduce", 0.0, 0.0, 0, t, "network"))  # link bytes, not HBM bytes
        return ops

    def batch_time(self, reqs, sms=None, bandwidth_share=1.0) -> float:
        t = super().batch_time(reqs, sms, bandwidth_share)
        return t + (self.allreduce_time(sum(q for q, _ in reqs)) if reqs else 0.0)


def load_tp_cost_model(model: str, hardware: str, tp: int, link: LinkSpec | None = None) -> TPCostModel:
    return TPCostModel.load(model, hardware, tp, link)


__all__ = ["LinkSpec", "TPCostModel", "scaled_hardware", "load_tp_cost_model", "allreduce_link_time",
           "allreduce_reduce_time"]
