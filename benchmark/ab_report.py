"""summary.md and the PNG plots of an A/B experiment, from its runs.jsonl records.

Everything here reads records only, so a report can be rebuilt at any time
(`python -m benchmark.ab EXP --report-only`) and tests can compare the table with the JSONL.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from .ab_config import Experiment, rate_key

PLOTS = ("slo_attainment.png", "tbt_cdf.png", "throughput.png")


def read_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by an interrupted write; the pair reruns on --resume
    return out


def latest_by_pair(records: list[dict], exp: Experiment) -> dict[str, list[dict]]:
    """policy name -> its latest record per rate of the experiment, in the experiment's rate order."""
    latest: dict[tuple[str, str], dict] = {}
    for r in records:
        latest[(r.get("policy"), r.get("rate"))] = r  # later lines win (a rerun after --resume)
    out = {}
    for p in exp.policies:
        out[p.name] = [latest[(p.name, rate_key(x))] for x in exp.rates if (p.name, rate_key(x)) in latest]
    return out


def _num(v) -> float:
    return float("inf") if v == "inf" else float(v)


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


@dataclass
class PolicySummary:
    name: str
    status: str
    max_goodput: float | None
    capacity: str  # highest rate meeting the attainment target (interpolated crossing)
    total_tput_at_slo: float | None
    output_tput_at_slo: float | None
    at_rate: dict | None  # the record at the plotted rate


def capacity_of(runs: list[dict], target: float) -> tuple[str, dict | None]:
    """DistServe-style: the rate where SLO attainment crosses `target`, linearly interpolated
    between the last swept rate that meets it and the next that does not; plus the record of
    the highest rate meeting it."""
    pts = [(_num(r["request_rate"]), r) for r in runs
           if r.get("status") == "ok" and r.get("slo_attainment") is not None and not math.isinf(_num(r["request_rate"]))]
    pts.sort(key=lambda x: x[0])
    if not pts:
        return "n/a", None
    best = None
    for i, (rate, r) in enumerate(pts):
        if r["slo_attainment"] >= target:
            best = r
            continue
        if best is None:
            return f"< {rate_key(pts[0][0])}", None
        r0, a0 = _num(best["request_rate"]), best["slo_attainment"]
        a1 = r["slo_attainment"]
        x = r0 + (rate - r0) * (a0 - target) / (a0 - a1) if a0 != a1 else r0
        return f"{x:.2f}", best
    return f">= {rate_key(pts[-1][0])}", best


def summarize(exp: Experiment, by_policy: dict[str, list[dict]]) -> list[PolicySummary]:
    out = []
    plot_key = rate_key(exp.plot_rate)
    for p in exp.policies:
        runs = by_policy.get(p.name, [])
        bad = [r for r in runs if r.get("status") != "ok"]
        if not runs:
            status = "not run"
        elif bad:
            first = bad[0]
            status = {"startup_failed": "startup failed", "server_died": f"server died at rate {first['rate']}"}.get(
                first.get("status"), f"error at rate {first['rate']}")
        else:
            status = "ok"
        ok = [r for r in runs if r.get("status") == "ok"]
        goodputs = [r["goodput"] for r in ok if r.get("goodput") is not None]
        cap, best = capacity_of(runs, exp.attainment_target)
        at = next((r for r in ok if r.get("rate") == plot_key), None)
        out.append(PolicySummary(p.name, status, max(goodputs) if goodputs else None, cap,
                                 best["total_throughput"] if best else None,
                                 best["output_throughput"] if best else None, at))
    return out


RUN_COLUMNS = [  # (header, record key); the table shows fmt(record[key])
    ("completed", "completed"), ("failed", "failed"), ("req/s", "request_throughput"),
    ("out tok/s", "output_throughput"), ("total tok/s", "total_throughput"),
    ("SLO att. TPOT (%)", "slo_attainment_pct"), ("SLO att. max ITL (%)", "itl_slo_attainment_pct"),
    ("goodput (req/s)", "goodput"),
    ("TTFT p50", "median_ttft_ms"), ("TTFT p90", "p90_ttft_ms"), ("TTFT p99", "p99_ttft_ms"),
    ("ITL p50", "median_itl_ms"), ("ITL p90", "p90_itl_ms"), ("ITL p99", "p99_itl_ms"), ("ITL max", "max_itl_ms"),
    ("TPOT p50", "median_tpot_ms"), ("TPOT p99", "p99_tpot_ms"), ("E2E p50", "median_e2e_latency_ms"),
]


def run_cells(r: dict) -> list[str]:
    v = dict(r)
    for k in ("slo_attainment", "itl_slo_attainment"):
        v[k + "_pct"] = None if r.get(k) is None else 100.0 * r[k]
    return [fmt(v.get(key)) for _h, key in RUN_COLUMNS]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def write_summary(exp: Experiment, by_policy: dict[str, list[dict]], path: str) -> str:
    summ = summarize(exp, by_policy)
    slo = []
    if exp.ttft_slo_ms is not None:
        slo.append(f"TTFT <= {exp.ttft_slo_ms:g} ms")
    if exp.tbt_slo_ms is not None:
        slo.append(f"TBT <= {exp.tbt_slo_ms:g} ms (per request: TPOT; strict: max ITL)")
    pct = f"{100 * exp.attainment_target:g}%"
    R = rate_key(exp.plot_rate)
    lines = [f"# A/B results: {exp.name}", ""]
    if exp.description:
        lines += [exp.description.strip(), ""]
    lines += [f"SLO: {', '.join(slo) or 'none'}; a rate meets it when >= {pct} of requests do. "
              "Goodput: requests meeting TTFT and TPOT SLOs per second. Capacity: the rate where "
              f"attainment crosses {pct} (interpolated). Throughput at SLO: at the highest swept rate meeting it. "
              "Latencies in ms.", "",
              "Files: runs.jsonl (one record per policy x rate), " + ", ".join(PLOTS) + ".", "",
              "## Policies", ""]
    header = ["policy", "status", "max goodput (req/s)", f"capacity at {pct} (req/s)", "total tok/s at SLO",
              "out tok/s at SLO", f"TTFT p50 @{R}", f"TTFT p99 @{R}", f"TBT p50 @{R}", f"TBT p99 @{R}"]
    rows = []
    for s in summ:
        a = s.at_rate or {}
        rows.append([s.name, s.status, fmt(s.max_goodput), s.capacity, fmt(s.total_tput_at_slo),
                     fmt(s.output_tput_at_slo), fmt(a.get("median_ttft_ms")), fmt(a.get("p99_ttft_ms")),
                     fmt(a.get("median_itl_ms")), fmt(a.get("p99_itl_ms"))])
    lines += _md_table(header, rows)
    lines += ["", "## Runs", ""]
    rows = []
    for p in exp.policies:
        for r in by_policy.get(p.name, []):
            rows.append([p.name, r["rate"], r.get("status", "?")] + run_cells(r))
    lines += _md_table(["policy", "rate (req/s)", "status"] + [h for h, _ in RUN_COLUMNS], rows)
    problems = [f"- {p.name} at rate {r['rate']}: {r.get('status')}: {_first_line(r.get('error', ''))}"
                for p in exp.policies for r in by_policy.get(p.name, []) if r.get("status") != "ok"]
    if problems:
        lines += ["", "## Problems", "", *problems, "", "Server logs are in logs/."]
    text = "\n".join(lines) + "\n"
    with open(path, "w") as fh:
        fh.write(text)
    return text


def _first_line(s: str) -> str:
    s = (s or "").strip()
    head = s.splitlines()[0] if s else ""
    return head[:300]


# -- plots ------------------------------------------------------------------------------------
def write_plots(exp: Experiment, by_policy: dict[str, list[dict]], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    paths = []

    def finite_ok(runs):
        return [r for r in runs if r.get("status") == "ok" and not math.isinf(_num(r["request_rate"]))]

    # SLO attainment vs rate.
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, p in enumerate(exp.policies):
        runs = [r for r in finite_ok(by_policy.get(p.name, [])) if r.get("slo_attainment") is not None]
        if not runs:
            continue
        x = [_num(r["request_rate"]) for r in runs]
        line, = ax.plot(x, [100 * r["slo_attainment"] for r in runs], "o-", label=f"{p.name} (TPOT)")
        ax.plot(x, [100 * r["itl_slo_attainment"] for r in runs], "x--", color=line.get_color(),
                label=f"{p.name} (max ITL)")
    ax.axhline(100 * exp.attainment_target, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment (%)", ylim=(-2, 102),
           title=f"{exp.name}: SLO attainment")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir, PLOTS[0]))

    # TBT (ITL) CDF at one rate: the whole distribution, and its tail where the SLO bites.
    fig, (c1, c2) = plt.subplots(1, 2, figsize=(10, 4.2))
    key = rate_key(exp.plot_rate)
    for p in exp.policies:
        r = next((r for r in by_policy.get(p.name, []) if r.get("rate") == key and r.get("status") == "ok"), None)
        if r and r.get("itl_cdf_ms"):
            q = [max(v, 1e-2) for v in r["itl_cdf_ms"]]  # log axis: clip zero gaps
            pct = r.get("itl_cdf_pct") or [100.0 * i / (len(q) - 1) for i in range(len(q))]
            for ax in (c1, c2):
                ax.plot(q, pct, label=p.name)
    for ax, ylim, title in ((c1, (0, 100.5), "all gaps"), (c2, (90, 100.1), "tail")):
        if exp.tbt_slo_ms is not None:
            ax.axvline(exp.tbt_slo_ms, color="grey", lw=0.8, ls=":", label="TBT SLO")
        ax.set_xscale("log")
        # Plain numbers; minor ticks unlabelled (their 3x10^2-style labels overlap).
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="time between tokens (ms)", ylabel="CDF (%)", ylim=ylim, title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"{exp.name}: TBT (ITL) CDF at {key} req/s")
    paths.append(_save(fig, out_dir, PLOTS[1]))

    # Throughput and goodput vs rate.
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    for p in exp.policies:
        runs = finite_ok(by_policy.get(p.name, []))
        if not runs:
            continue
        x = [_num(r["request_rate"]) for r in runs]
        a1.plot(x, [r["output_throughput"] for r in runs], "o-", label=p.name)
        if runs[0].get("goodput") is not None:
            a2.plot(x, [r["goodput"] for r in runs], "o-", label=p.name)
    a1.set(xlabel="request rate (req/s)", ylabel="output tokens/s", title="output throughput")
    a2.set(xlabel="request rate (req/s)", ylabel="req/s meeting SLOs", title="goodput (TTFT + TPOT)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(exp.name)
    paths.append(_save(fig, out_dir, PLOTS[2]))
    return paths


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(exp: Experiment, out_dir: str) -> tuple[str, list[str]]:
    by_policy = latest_by_pair(read_records(os.path.join(out_dir, "runs.jsonl")), exp)
    summary = os.path.join(out_dir, "summary.md")
    write_summary(exp, by_policy, summary)
    return summary, write_plots(exp, by_policy, out_dir)
