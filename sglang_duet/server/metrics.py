"""Prometheus metrics of the main process (SGLang's `sglang:` names plus per-policy series).

Request-level series (TTFT, inter-token latency, e2e) are measured here, where the client sees the
tokens, so they include the IPC and detokenizer path. Scheduler-level series come from the periodic
SchedulerStats message; its counters are cumulative, so they are applied as deltas.

Inter-token latency is a gap between two deliveries: tokens that arrive together count as one gap
(the wait for the first of them) plus zero gaps for the rest, not as the wait spread evenly over
them. (SGLang divides a chunk's interval by its token count, which turns one 400 ms stall before
an 8-token burst into eight 50 ms gaps.) Count and sum are unchanged, so the mean is still TPOT.
"""
from __future__ import annotations

import bisect

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily

from sglang_duet.server.io_struct import SchedulerStats

_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8,
                    1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06,
                0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        disable_created_metrics()  # no `*_created` series: they double the output and nobody scrapes them
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.model = model_name
        lab = ["model_name"]
        self.num_running = Gauge("sglang:num_running_reqs", "Requests holding KV in the scheduler", lab, registry=r)
        self.num_queue = Gauge("sglang:num_queue_reqs", "Requests waiting in the scheduler", lab, registry=r)
        self.token_usage = Gauge("sglang:token_usage", "Fraction of KV slots in use", lab, registry=r)
        self.prompt_tokens = Counter("sglang:prompt_tokens", "Prompt tokens of finished requests", lab, registry=r)
        self.gen_tokens = Counter("sglang:generation_tokens", "Generated tokens", lab, registry=r)
        self.num_requests = Counter("sglang:num_requests", "Finished requests", lab, registry=r)
        self.ttft = Histogram("sglang:time_to_first_token_seconds", "Time to first token (as streamed)", lab,
                              buckets=_LATENCY_BUCKETS, registry=r)
        # Observed once per token, possibly thousands of times per step: a plain list of bucket
        # counts (one bisect per output, however many tokens it carries), exported at scrape time.
        self.itl = _TokenHistogram("sglang:inter_token_latency_seconds", "Time between tokens (TBT) as streamed",
                                   model_name, _ITL_BUCKETS)
        r.register(self.itl)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds", "End-to-end request latency", lab,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.policy_steps = Counter("sglang:policy_steps", "Plans the policy made, by mode",
                                    lab + ["mode"], registry=r)
        self.lane_launches = Counter("sglang:policy_lane_launches", "Launches per lane", lab + ["lane"], registry=r)
        self.sm_split = Gauge("sglang:policy_sm_split", "SMs of the last split plan per lane", lab + ["lane"],
                              registry=r)
        self.retractions = Counter("sglang:num_retractions", "Requests retracted to free KV", lab, registry=r)
        for mode in ("aggregated", "split"):
            self.policy_steps.labels(model_name=model_name, mode=mode)
        for lane in ("aggregated", "prefill", "decode"):
            self.lane_launches.labels(model_name=model_name, lane=lane)
        for lane in ("prefill", "decode"):
            self.sm_split.labels(model_name=model_name, lane=lane).set(0)
        self._last: SchedulerStats | None = None
        # Per-token hot path: bind the labelled children once (labels() costs a lock and a dict
        # lookup; it showed up in profiles at 256 streams).
        self._ttft = self.ttft.labels(model_name)
        self._gen = self.gen_tokens.labels(model_name)
        self._prompt = self.prompt_tokens.labels(model_name)
        self._reqs = self.num_requests.labels(model_name)
        self._e2e = self.e2e.labels(model_name)

    def on_first_token(self, ttft: float) -> None:
        self._ttft.observe(ttft)

    def on_tokens(self, n: int, interval: float | None) -> None:
        """n new tokens arrived `interval` seconds after the previous ones (None: the first ones)."""
        self._gen.inc(n)
        if interval is not None and n > 0:
            self.itl.observe_tokens(interval, n)

    def on_itl(self, interval: float, n: int) -> None:
        """n tokens of one request arrived `interval` s after its previous ones (counted apart: add_tokens)."""
        self.itl.observe_tokens(interval, n)

    def add_tokens(self, n: int) -> None:
        self._gen.inc(n)

    def on_finish(self, prompt_tokens: int, e2e: float) -> None:
        self._prompt.inc(prompt_tokens)
        self._reqs.inc()
        self._e2e.observe(e2e)

    def on_stats(self, s: SchedulerStats) -> None:
        m = self.model
        self.num_running.labels(m).set(s.num_running)
        self.num_queue.labels(m).set(s.num_waiting)
        self.token_usage.labels(m).set(s.kv_used / s.kv_total if s.kv_total else 0.0)
        prev = self._last
        for mode, v in s.plans.items():
            d = v - (prev.plans.get(mode, 0) if prev else 0)
            if d > 0:
                self.policy_steps.labels(model_name=m, mode=mode).inc(d)
        for lane, v in s.launches.items():
            d = v - (prev.launches.get(lane, 0) if prev else 0)
            if d > 0:
                self.lane_launches.labels(model_name=m, lane=lane).inc(d)
        for lane, sms in s.last_sms.items():
            self.sm_split.labels(model_name=m, lane=lane).set(sms)
        d = s.retractions - (prev.retractions if prev else 0)
        if d > 0:
            self.retractions.labels(m).inc(d)
        self._last = s

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _TokenHistogram:
    """A Prometheus histogram (one label, model_name) fed per output: `observe_tokens(interval, n)`
    counts the n tokens one output delivered `interval` seconds after the request's previous one
    as one gap of `interval` and n - 1 gaps of 0 (they reached the user together: streaming may
    deliver several tokens at once, e.g. a --stream-interval's or a slow main process's)."""

    def __init__(self, name: str, doc: str, model: str, buckets: tuple[float, ...]):
        self.name, self.doc, self.model = name, doc, model
        self.bounds = list(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last: +Inf
        self.sum = 0.0

    def observe_tokens(self, interval: float, n: int) -> None:
        # The user waited `interval` for the first of these tokens and nothing for the others: a
        # burst is one real gap plus n - 1 zero gaps, never n gaps of interval / n (which would hide
        # a stall behind a k-step burst). Sum and count still give the mean TPOT.
        self.counts[bisect.bisect_left(self.bounds, interval)] += 1
        if n > 1:
            self.counts[0] += n - 1
        self.sum += interval

    def collect(self):
        fam = HistogramMetricFamily(self.name, self.doc, labels=["model_name"])
        acc, buckets = 0, []
        for b, c in zip(self.bounds + [float("inf")], self.counts):
            acc += c
            buckets.append(("+Inf" if b == float("inf") else repr(float(b)), acc))
        fam.add_metric([self.model], buckets, self.sum)
        return [fam]

    def describe(self):
        return [HistogramMetricFamily(self.name, self.doc, labels=["model_name"])]
