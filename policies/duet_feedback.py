"""What duet learns while it runs (policies/duet.py): how far each lane kind's launches are off the
model (`Calibration`) and what the arrivals ask of the decodes (`Demand`)."""
from __future__ import annotations

import math
from collections import deque

import numpy as np

from sglang_duet.policies.base import SchedulerView


class Calibration:
    """How much longer than the model a lane's compute (a) and memory traffic (b) take on the device.

    Fitted to measured launches by exponentially weighted least squares (weight `weight` per
    launch) on  measured ms = a * (ms of the launch's compute-bound operators) + b * (ms of its
    memory-bound operators, kernel overheads included), with a weak prior at (1, 1) so that a lane
    that only ever runs one kind (a decode lane: memory-bound) keeps the other at 1. Predictions
    are then the roofline with compute time times a and memory time times b, operator by operator:
    the model of a device whose compute and bandwidth curves are off by 1/a and 1/b. Host time per
    step and contention between the lanes end up in b, where they behave alike."""

    def __init__(self, weight: float):
        self.weight = weight
        self.a = self.b = 1.0
        self._s = np.zeros(5)  # sums of c*c, c*m, m*m, c*y, m*y

    def update(self, comp: float, mem: float, measured: float) -> None:
        if self.weight <= 0 or measured <= 0 or comp + mem <= 0:
            return
        self._s *= 1.0 - self.weight
        self._s += self.weight * np.array([comp * comp, comp * mem, mem * mem, comp * measured, mem * measured])
        scc, scm, smm, scy, smy = self._s
        lam = 0.01 * (scc + smm)  # the prior's weight
        det = (scc + lam) * (smm + lam) - scm * scm
        if det <= 0:
            return
        a = ((scy + lam) * (smm + lam) - scm * (smy + lam)) / det
        b = ((scc + lam) * (smy + lam) - scm * (scy + lam)) / det
        self.a, self.b = min(2.0, max(0.5, a)), min(2.0, max(0.5, b))


class Demand:
    """What the arrivals ask of the decodes, from the requests seen arriving (a sliding window).

    Little's law: a request holds KV for about (prompt + output / 2) tokens over output * tau ms
    when decode steps take tau, and a batch slot for output * tau. For the arrival rate lambda seen
    in the window, the pool stays below `kv_target` of its slots, and the batch below
    `running_target` of max_running_requests, when

        tau <= kv_target * KV slots / (lambda * mean((prompt + output / 2) * output))
        tau <= running_target * max_running / (lambda * mean(output))

    The batch's target is lower: the running count is a mean over the window, a burst brings more
    at once, and a full batch stops admission outright (every prompt then waits out whole decodes),
    where a pool near kv_target still admits what fits.

    Output lengths are the requests' max_new_tokens (an upper bound in real serving: the target is
    then conservative, decodes faster than they need). Fewer than 20 arrivals seen: no target.

    `rate_from="admitted"` (a prototype, off by default): lambda is the lower of the arrival rate
    and the rate at which requests left the waiting queue over the window. Requests hold KV and a
    batch slot from their admission, so that is Little's lambda; the two agree unless the queue
    grows. Under overload they do not: on the H200 A/B at 30 req/s (max_running 64) the arrival
    rate asked for 9 ms decode steps no step could reach, and the decode term then outbid the
    prefill that the waiting prompts needed (benchmark/results/gpu/h200-2026-11-30/lease3/
    emulator-vs-gpu.md). Admissions are counted as arrivals seen minus the waiting queue's length
    (a retracted request back in the queue counts as one admission fewer until it is re-admitted)."""

    RATE_FROM = ("arrivals", "admitted")

    def __init__(self, window_s: float, kv_target: float, running_target: float | None = None,
                 rate_from: str = "arrivals"):
        if rate_from not in self.RATE_FROM:
            raise ValueError(f"duet: demand_rate must be one of {self.RATE_FROM}, got {rate_from!r}")
        self.window_s = window_s
        self.kv_target = kv_target
        self.running_target = kv_target if running_target is None else running_target
        self.rate_from = rate_from
        self._arrived = 0  # arrivals seen, ever (rate_from="admitted")
        self._admitted: deque = deque()  # (time, arrivals seen - waiting) per observation, over the window
        self._seen: deque = deque()  # (arrival time, kv token-steps, output tokens)
        self._kv_sum = 0.0
        self._out_sum = 0.0
        self._last = -math.inf
        self._first = None

    def observe(self, view: SchedulerView) -> None:
        ctx_len = view.config.context_length
        new = []
        for r in reversed(view.waiting):
            if r.arrival_time <= self._last:
                break
            if r.num_retractions:
                continue
            p = len(r.prompt_ids)
            out = r.max_new_tokens if r.max_new_tokens is not None else ctx_len - p
            out = max(1, min(out, ctx_len - p))
            new.append((r.arrival_time, (p + out / 2) * out, out))
        for item in reversed(new):
            self._seen.append(item)
            self._kv_sum += item[1]
            self._out_sum += item[2]
            self._last = max(self._last, item[0])
            if self._first is None:
                self._first = item[0]
        horizon = view.now - self.window_s
        while self._seen and self._seen[0][0] < horizon:
            _, kv, out = self._seen.popleft()
            self._kv_sum -= kv
            self._out_sum -= out
        if self.rate_from == "admitted":
            self._arrived += len(new)
            adm = self._admitted
            adm.append((view.now, self._arrived - len(view.waiting)))
            while len(adm) > 1 and adm[1][0] <= horizon:  # keep one observation at or before the horizon
                adm.popleft()

    def rate(self, now: float) -> float:
        """Arrivals per second over the window (or since the first arrival, if shorter); with
        rate_from="admitted", no more than the admissions per second over the same span."""
        if self._first is None or len(self._seen) < 20:
            return 0.0
        span = min(self.window_s, max(now - self._first, 1e-3))
        lam = len(self._seen) / span
        if self.rate_from == "admitted" and self._admitted:
            t0, a0 = self._admitted[0]
            t1, a1 = self._admitted[-1]
            if t1 - t0 > 0:
                lam = min(lam, max(0.0, a1 - a0) / (t1 - t0))
        return lam

    def target_ms(self, view: SchedulerView, ceiling: float) -> float:
        lam = self.rate(view.now)
        if lam <= 0:
            return ceiling
        n = len(self._seen)
        tau_kv = self.kv_target * view.kv_total / (lam * self._kv_sum / n) * 1e3
        tau_n = self.running_target * view.config.max_running_requests / (lam * self._out_sum / n) * 1e3
        return min(ceiling, tau_kv, tau_n)
