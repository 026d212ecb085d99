"""Discrete-event simulator: SchedulerCore + policies + the emulated GPU on a virtual clock."""
from sglang_duet.simulator.loop import LaunchRecord, RequestRecord, SimConfig, SimResult, simulate
from sglang_duet.simulator.metrics import RunMetrics, summarize

__all__ = ["SimConfig", "SimResult", "RequestRecord", "LaunchRecord", "simulate", "summarize", "RunMetrics"]
