"""Request arrival times for the load generator.

Offsets are computed up front (first request at t=0) and the client sends each request at
start + offset, so a slow event loop never stretches the schedule cumulatively.
Semantics follow SGLang's / vLLM's bench_serving: `--request-rate inf` sends everything at
once; otherwise inter-arrival gaps are gamma with shape = burstiness and mean 1/rate, which is
Poisson (exponential gaps) at burstiness 1, burstier below 1 and more regular above.
"""
from __future__ import annotations

import math

import numpy as np


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """n send times in seconds from the start of the run, non-decreasing, the first at 0."""
    if n <= 0:
        return []
    if request_rate <= 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {request_rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    # Gamma(shape=k, scale=1/(rate*k)) has mean 1/rate and CV 1/sqrt(k).
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()
