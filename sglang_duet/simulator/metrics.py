"""Per-request latency metrics and SLO attainment of a simulated (or measured) run.

SLO attainment, two definitions, both reported:

- `attainment` (DistServe's, the one goodput uses by default): a request attains the SLO when
  TTFT <= the TTFT SLO and its TPOT, the mean gap between its output tokens
  ((last token - first token) / (tokens - 1)), is <= the TBT SLO.
- `attainment_max_tbt` (strict, what a TBT-constrained service like DuetServe's promises): TTFT
  within its SLO and every single gap between consecutive tokens within the TBT SLO.

The mean hides stalls: a request that waits 300 ms once behind a long prefill but otherwise
decodes every 15 ms still has a small TPOT. The strict variant counts that request as a miss,
which is the difference between aggregated and chunked/duet scheduling that matters here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class RunMetrics:
    num_requests: int
    rate: float  # offered req/s
    sim_time_s: float
    throughput_req_s: float
    throughput_tok_s: float  # output tokens per second
    total_tok_s: float  # prompt + output tokens per second
    ttft_p50_ms: float
    ttft_p99_ms: float
    tbt_p50_ms: float  # over all token gaps of all requests
    tbt_p99_ms: float
    tbt_max_ms: float
    tpot_mean_ms: float
    tpot_p99_ms: float
    e2e_p50_s: float
    e2e_p99_s: float
    attainment: float  # DistServe: TTFT and TPOT within SLO
    attainment_max_tbt: float  # TTFT and every gap within SLO
    ttft_attainment: float
    tbt_slo_ms: float
    ttft_slo_ms: float

    def to_dict(self) -> dict:
        return asdict(self)


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if a.size else 0.0


def request_arrays(records) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ttft_s, tpot_s, max_gap_s, e2e_s) per request, and every gap in `all_gaps(records)`."""
    n = len(records)
    ttft, tpot, max_gap, e2e = (np.zeros(n) for _ in range(4))
    for i, r in enumerate(records):
        t = r.token_times
        if not t:
            ttft[i] = tpot[i] = max_gap[i] = e2e[i] = np.inf  # never served: misses every SLO
            continue
        ttft[i] = t[0] - r.arrival
        e2e[i] = t[-1] - r.arrival
        if len(t) > 1:
            tpot[i] = (t[-1] - t[0]) / (len(t) - 1)
            max_gap[i] = max(b - a for a, b in zip(t, t[1:]))
    return ttft, tpot, max_gap, e2e


def all_gaps(records) -> np.ndarray:
    """Every gap between consecutive output tokens of every request, seconds."""
    parts = [np.diff(np.asarray(r.token_times)) for r in records if len(r.token_times) > 1]
    return np.concatenate(parts) if parts else np.zeros(0)


def summarize(result, tbt_slo_ms: float | None = None, ttft_slo_ms: float | None = None) -> RunMetrics:
    cfg = result.config
    tbt_slo = (tbt_slo_ms or cfg.tbt_slo_ms) / 1e3
    ttft_slo = (ttft_slo_ms or cfg.ttft_slo_ms) / 1e3
    recs = result.records
    ttft, tpot, max_gap, e2e = request_arrays(recs)
    gaps = all_gaps(recs)
    span = max(result.sim_time_s, 1e-9)
    out_tokens = sum(len(r.token_times) for r in recs)
    in_tokens = sum(r.input_len for r in recs)
    ok_ttft = ttft <= ttft_slo
    n = max(len(recs), 1)
    return RunMetrics(
        num_requests=len(recs), rate=cfg.rate, sim_time_s=result.sim_time_s,
        throughput_req_s=len(recs) / span, throughput_tok_s=out_tokens / span,
        total_tok_s=(out_tokens + in_tokens) / span,
        ttft_p50_ms=_pct(ttft, 50) * 1e3, ttft_p99_ms=_pct(ttft, 99) * 1e3,
        tbt_p50_ms=_pct(gaps, 50) * 1e3, tbt_p99_ms=_pct(gaps, 99) * 1e3,
        tbt_max_ms=float(gaps.max()) * 1e3 if gaps.size else 0.0,
        tpot_mean_ms=float(tpot.mean()) * 1e3 if len(recs) else 0.0, tpot_p99_ms=_pct(tpot, 99) * 1e3,
        e2e_p50_s=_pct(e2e, 50), e2e_p99_s=_pct(e2e, 99),
        attainment=float(np.sum(ok_ttft & (tpot <= tbt_slo))) / n,
        attainment_max_tbt=float(np.sum(ok_ttft & (max_gap <= tbt_slo))) / n,
        ttft_attainment=float(np.sum(ok_ttft)) / n,
        tbt_slo_ms=tbt_slo * 1e3, ttft_slo_ms=ttft_slo * 1e3,
    )
