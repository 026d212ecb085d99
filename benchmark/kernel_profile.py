"""What one model step runs on the device: its kernels counted and timed by torch.profiler.

Used by step_latency.py (--profile). A decode step far above its HBM floor is either a few slow kernels
or many small ones; the count and the top kernels by device time say which. On a GPU the events are the
device's (kernels, copies, memsets; also those a CUDA-graph replay launches, where CUPTI reports them);
on a CPU, where there is no device, they are the profiler's CPU ops by self time, so the code path runs
in CI.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def profile_kernels(fn, device: torch.device, top: int = 15) -> dict:
    """Run fn once (after the caller's warm-up) under the profiler. Returns {"events": how many,
    "device_ms": their summed duration, "top": [(name, count, ms)] by total duration}."""
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    if on_gpu:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        if on_gpu:
            torch.cuda.synchronize(device)
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if on_gpu and e.device_type == DeviceType.CUDA:
            by_name[e.name].append(e.time_range.elapsed_us() / 1e3)
        elif not on_gpu and e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0:
            by_name[e.name].append(e.self_cpu_time_total / 1e3)
    rows = sorted(((name, len(ms), sum(ms)) for name, ms in by_name.items()), key=lambda r: -r[2])
    return {"events": sum(r[1] for r in rows), "device_ms": sum(r[2] for r in rows),
            "top": [(name[:120], n, ms) for name, n, ms in rows[:top]]}


def to_markdown(title: str, prof: dict) -> list[str]:
    lines = [f"### {title}: {prof['events']} events, {prof['device_ms']:.3f} ms summed", "",
             "| kernel | count | ms | share |", "|---|---:|---:|---:|"]
    total = prof["device_ms"] or 1.0
    for name, n, ms in prof["top"]:
        lines.append(f"| `{name}` | {n} | {ms:.3f} | {100 * ms / total:.1f}% |")
    return lines + [""]
