"""The experiment file of the policy A/B harness (configs/experiments/*.yaml).

Schema (documented with examples in docs/benchmarking.md):

    name: cpu-smollm2                 # default: the file name
    description: free text
    server: {flag: value, ...}        # launch_server flags for every policy (python or dashed
                                      # names; true = a bare flag; false/null = left out)
    env: {OMP_NUM_THREADS: 1}         # environment of the server processes (added to ours)
    startup_timeout_s: 600            # /health must answer 200 within this
    policies:                         # one server per entry, in this order
      - name: chunked-256             # label in tables and plots (default: policy)
        policy: chunked               # --policy (default: name)
        server: {chunked_prefill_size: 256}   # per-policy flags over `server`
    benchmark: {option: value, ...}   # bench_serving options (python names), same for all
    rates: [0.5, 1, 2, inf]           # --request-rate sweep, req/s
    slo: {ttft_ms: 2000, tbt_ms: 250} # or {preset: duetserve}; also passed to the server
    attainment_target: 0.9            # a rate "meets the SLO" when attainment >= this
    cdf_rate: 1                       # rate of the TBT CDF plot (default: the middle rate)
    quick: {rates: [...], benchmark: {...}, policies: [names], server: {...}}  # --quick overrides
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ExperimentError(ValueError):
    pass


@dataclass
class PolicySpec:
    name: str
    policy: str
    server: dict = field(default_factory=dict)


@dataclass
class Experiment:
    name: str
    policies: list[PolicySpec]
    rates: list[float]
    benchmark: dict = field(default_factory=dict)
    server: dict = field(default_factory=dict)
    ttft_slo_ms: float | None = None
    tbt_slo_ms: float | None = None
    attainment_target: float = 0.9
    cdf_rate: float | None = None
    startup_timeout_s: float = 600.0
    description: str = ""
    env: dict = field(default_factory=dict)

    @property
    def plot_rate(self) -> float:
        """The rate whose TBT distribution is plotted."""
        if self.cdf_rate is None:
            return self.rates[(len(self.rates) - 1) // 2]
        # The swept rate nearest the asked one (a --quick sweep may not include it).
        return min(self.rates, key=lambda r: (abs(r - self.cdf_rate) if not math.isinf(r) else math.inf, r))


def _rate(v) -> float:
    r = float(v)  # accepts "inf"
    if not r > 0:
        raise ExperimentError(f"request rates must be > 0 or inf, got {v!r}")
    return r


def rate_key(rate: float) -> str:
    """The rate as written in records and tables: 'inf' or a short decimal."""
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _slo(d: dict | None) -> tuple[float | None, float | None]:
    d = dict(d or {})
    ttft, tbt = d.pop("ttft_ms", None), d.pop("tbt_ms", None)
    preset = d.pop("preset", None)
    if d:
        raise ExperimentError(f"unknown slo keys {sorted(d)} (ttft_ms, tbt_ms, preset)")
    if preset:
        from sglang_duet.workloads import load_slo

        p = load_slo(preset)
        if ttft is None and p.ttft_s is not None:
            ttft = p.ttft_s * 1000.0
        per_token = p.tpot_s if p.tpot_s is not None else p.tbt_s
        if tbt is None and per_token is not None:
            tbt = per_token * 1000.0
    return (None if ttft is None else float(ttft)), (None if tbt is None else float(tbt))


def experiment_from_dict(d: dict, default_name: str = "experiment", quick: bool = False) -> Experiment:
    d = dict(d)
    if quick:
        q = dict(d.get("quick") or {})
        for key in ("benchmark", "server", "env"):
            if key in q:
                d[key] = {**(d.get(key) or {}), **q.pop(key)}
        only = q.pop("policies", None)
        d.update(q)
        if only is not None:
            d["policies"] = [p for p in d.get("policies") or []
                             if (p.get("name") or p.get("policy") if isinstance(p, dict) else p) in only]
    pols = []
    for p in d.get("policies") or []:
        if isinstance(p, str):
            p = {"policy": p}
        name = p.get("name") or p.get("policy")
        if not name:
            raise ExperimentError(f"policy entry needs a name or policy: {p}")
        pols.append(PolicySpec(name=str(name), policy=str(p.get("policy") or name), server=dict(p.get("server") or {})))
    if not pols:
        raise ExperimentError("an experiment needs at least one policy")
    if len({p.name for p in pols}) != len(pols):
        raise ExperimentError("policy names must be unique")
    rates = [_rate(r) for r in d.get("rates") or []]
    if not rates:
        raise ExperimentError("an experiment needs at least one rate")
    ttft, tbt = _slo(d.get("slo"))
    known = {"name", "description", "server", "env", "startup_timeout_s", "policies", "benchmark", "rates", "slo",
             "attainment_target", "cdf_rate", "quick"}
    unknown = set(d) - known
    if unknown:
        raise ExperimentError(f"unknown experiment keys {sorted(unknown)}; known: {sorted(known)}")
    return Experiment(name=str(d.get("name") or default_name), policies=pols, rates=rates,
                      benchmark=dict(d.get("benchmark") or {}), server=dict(d.get("server") or {}),
                      ttft_slo_ms=ttft, tbt_slo_ms=tbt, attainment_target=float(d.get("attainment_target", 0.9)),
                      cdf_rate=None if d.get("cdf_rate") is None else _rate(d["cdf_rate"]),
                      startup_timeout_s=float(d.get("startup_timeout_s", 600.0)),
                      description=str(d.get("description") or ""),
                      env={str(k): str(v) for k, v in (d.get("env") or {}).items()})


def load_experiment(path: str | Path, quick: bool = False) -> Experiment:
    p = Path(path)
    if not p.exists() and p.suffix not in (".yaml", ".yml"):
        p = Path("configs/experiments") / f"{path}.yaml"
    with open(p) as fh:
        d = yaml.safe_load(fh) or {}
    return experiment_from_dict(d, default_name=p.stem, quick=quick)


def server_flags(flags: dict) -> list[str]:
    """{'chunked_prefill_size': 256, 'skip_warmup': True} -> ['--chunked-prefill-size', '256',
    '--skip-warmup']."""
    out: list[str] = []
    for k, v in flags.items():
        if v is None or v is False:
            continue
        flag = "--" + str(k).lstrip("-").replace("_", "-")
        if v is True:
            out.append(flag)
        elif isinstance(v, (list, tuple)):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out
