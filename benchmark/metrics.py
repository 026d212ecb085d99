"""Benchmark metrics from per-request outputs, SLO attainment, and SGLang's result table.

Latency statistics are in milliseconds over successful requests; ITL statistics pool every
gap of every request. SLO attainment counts a request only if it succeeded and met every SLO
given; its denominator is every request sent, so failures count against it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .backends import RequestOutput

PERCENTILES = (50, 90, 95, 99)


@dataclass
class LatencyStats:
    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    p90: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0

    @classmethod
    def of_seconds(cls, values) -> "LatencyStats":
        if len(values) == 0:
            return cls()
        ms = np.asarray(values, dtype=float) * 1000.0
        p50, p90, p95, p99 = np.percentile(ms, PERCENTILES)
        return cls(float(ms.mean()), float(p50), float(ms.std()), float(p90), float(p95), float(p99),
                   float(ms.max()))


@dataclass
class BenchmarkMetrics:
    num_requests: int = 0
    completed: int = 0
    failed: int = 0
    duration: float = 0.0  # s
    total_input_tokens: int = 0
    total_output_tokens: int = 0
    total_output_tokens_retokenized: int = 0
    request_throughput: float = 0.0  # req/s
    input_throughput: float = 0.0  # tok/s
    output_throughput: float = 0.0
    total_throughput: float = 0.0
    concurrency: float = 0.0  # mean requests in flight: sum of latencies / duration
    ttft: LatencyStats = field(default_factory=LatencyStats)
    tpot: LatencyStats = field(default_factory=LatencyStats)
    itl: LatencyStats = field(default_factory=LatencyStats)
    e2e_latency: LatencyStats = field(default_factory=LatencyStats)
    ttft_slo_ms: float | None = None
    tbt_slo_ms: float | None = None
    slo_attainment: float | None = None  # TTFT and TPOT within SLO
    itl_slo_attainment: float | None = None  # TTFT and every gap (max ITL) within SLO
    goodput: float | None = None  # req/s meeting TTFT + TPOT SLOs
    itl_goodput: float | None = None  # req/s meeting TTFT + max-ITL SLOs

    def flat(self) -> dict:
        """SGLang-style flat keys: mean_ttft_ms, p99_itl_ms, ..."""
        d = asdict(self)
        for name in ("ttft", "tpot", "itl", "e2e_latency"):
            for stat, v in d.pop(name).items():
                d[f"{stat}_{name}_ms"] = v
        return d


def meets_slo(o: RequestOutput, ttft_slo_ms: float | None, tbt_slo_ms: float | None,
              use_max_itl: bool = False) -> bool:
    """A successful request within both SLOs; TBT is judged by TPOT (DistServe's per-request
    mean) or, with use_max_itl, by its worst gap (a strict per-token TBT)."""
    if not o.success:
        return False
    if ttft_slo_ms is not None and o.ttft * 1000.0 > ttft_slo_ms:
        return False
    if tbt_slo_ms is not None:
        tbt = o.max_itl if use_max_itl else (o.tpot or 0.0)
        if tbt * 1000.0 > tbt_slo_ms:
            return False
    return True


def compute_metrics(outputs: list[RequestOutput], duration: float, retokenize=None,
                    ttft_slo_ms: float | None = None, tbt_slo_ms: float | None = None) -> BenchmarkMetrics:
    """retokenize(text) -> token count, for the retokenized total and for outputs whose
    server sent no token count."""
    ok = [o for o in outputs if o.success]
    for o in ok:
        if not o.server_counts and retokenize is not None:
            o.output_len = retokenize(o.generated_text)
    m = BenchmarkMetrics(num_requests=len(outputs), completed=len(ok), failed=len(outputs) - len(ok),
                         duration=duration)
    m.total_input_tokens = sum(o.prompt_len for o in ok)
    m.total_output_tokens = sum(o.output_len for o in ok)
    m.total_output_tokens_retokenized = (sum(retokenize(o.generated_text) for o in ok)
                                         if retokenize is not None else m.total_output_tokens)
    if duration > 0:
        m.request_throughput = m.completed / duration
        m.input_throughput = m.total_input_tokens / duration
        m.output_throughput = m.total_output_tokens / duration
        m.total_throughput = (m.total_input_tokens + m.total_output_tokens) / duration
        m.concurrency = sum(o.latency for o in ok) / duration
    m.ttft = LatencyStats.of_seconds([o.ttft for o in ok])
    m.tpot = LatencyStats.of_seconds([o.tpot for o in ok if o.tpot is not None])
    m.itl = LatencyStats.of_seconds([g for o in ok for g in o.itl])
    m.e2e_latency = LatencyStats.of_seconds([o.latency for o in ok])
    if ttft_slo_ms is not None or tbt_slo_ms is not None:
        m.ttft_slo_ms, m.tbt_slo_ms = ttft_slo_ms, tbt_slo_ms
        good = sum(meets_slo(o, ttft_slo_ms, tbt_slo_ms) for o in outputs)
        good_itl = sum(meets_slo(o, ttft_slo_ms, tbt_slo_ms, use_max_itl=True) for o in outputs)
        n = max(len(outputs), 1)
        m.slo_attainment, m.itl_slo_attainment = good / n, good_itl / n
        m.goodput = good / duration if duration > 0 else 0.0
        m.itl_goodput = good_itl / duration if duration > 0 else 0.0
    return m


# -- the result table -------------------------------------------------------------------------
WIDTH = 50


def _title(text: str, fill: str) -> str:
    return f"{text:{fill}^{WIDTH}}"


def _row(label: str, value) -> str:
    if isinstance(value, float):
        value = "inf" if math.isinf(value) else f"{value:.2f}"
    return f"{label:<40} {value:<10}"


def _latency_rows(title: str, short: str, s: LatencyStats, p95: bool = False,
                  mx: bool = False) -> list[str]:
    rows = [_title(title, "-"), _row(f"Mean {short} (ms):", s.mean), _row(f"Median {short} (ms):", s.median),
            _row(f"P90 {short} (ms):", s.p90)]
    if p95:
        rows.append(_row(f"P95 {short} (ms):", s.p95))
    rows.append(_row(f"P99 {short} (ms):", s.p99))
    if mx:
        rows.append(_row(f"Max {short} (ms):", s.max))
    return rows


def format_table(m: BenchmarkMetrics, backend: str, request_rate: float, max_concurrency: int | None) -> str:
    lines = [
        _title(" Serving Benchmark Result ", "="),
        _row("Backend:", backend),
        _row("Traffic request rate:", float(request_rate)),
        _row("Max request concurrency:", max_concurrency if max_concurrency else "not set"),
        _row("Successful requests:", m.completed),
        _row("Failed requests:", m.failed),
        _row("Benchmark duration (s):", m.duration),
        _row("Total input tokens:", m.total_input_tokens),
        _row("Total generated tokens:", m.total_output_tokens),
        _row("Total generated tokens (retokenized):", m.total_output_tokens_retokenized),
        _row("Request throughput (req/s):", m.request_throughput),
        _row("Input token throughput (tok/s):", m.input_throughput),
        _row("Output token throughput (tok/s):", m.output_throughput),
        _row("Total token throughput (tok/s):", m.total_throughput),
        _row("Concurrency:", m.concurrency),
    ]
    lines += _latency_rows("End-to-End Latency", "E2E Latency", m.e2e_latency)
    lines += _latency_rows("Time to First Token", "TTFT", m.ttft)
    lines += _latency_rows("Time per Output Token (excl. 1st token)", "TPOT", m.tpot)
    lines += _latency_rows("Inter-Token Latency", "ITL", m.itl, p95=True, mx=True)
    if m.slo_attainment is not None:
        lines += [
            _title("SLO Attainment", "-"),
            _row("TTFT SLO (ms):", "not set" if m.ttft_slo_ms is None else float(m.ttft_slo_ms)),
            _row("TBT SLO (ms):", "not set" if m.tbt_slo_ms is None else float(m.tbt_slo_ms)),
            _row("SLO attainment, TTFT+TPOT (%):", 100.0 * m.slo_attainment),
            _row("SLO attainment, TTFT+max ITL (%):", 100.0 * m.itl_slo_attainment),
            _row("Goodput, TTFT+TPOT (req/s):", m.goodput),
            _row("Goodput, TTFT+max ITL (req/s):", m.itl_goodput),
        ]
    lines.append("=" * WIDTH)
    return "\n".join(lines)
