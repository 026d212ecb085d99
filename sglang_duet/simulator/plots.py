"""PNG plots of a sweep (matplotlib, Agg backend, small files)."""
from __future__ import annotations

import os

import numpy as np

FIGSIZE, DPI = (5.5, 3.6), 80  # ~20-40 KB per PNG


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in tests and on servers
    import matplotlib.pyplot as plt

    return plt


def plot_attainment(results, path: str, target: float = 0.9, title: str = "") -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for i, r in enumerate(results):
        rates = sorted(r.runs)
        color = f"C{i}"
        ax.plot(rates, [r.runs[x].attainment for x in rates], "o-", color=color, ms=3, label=f"{r.spec.label}")
        ax.plot(rates, [r.runs[x].attainment_max_tbt for x in rates], "s--", color=color, ms=2, alpha=0.6)
    ax.axhline(target, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title + "\nsolid: TTFT+TPOT (DistServe), dashed: TTFT+max TBT", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_throughput(results, path: str, title: str = "") -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for i, r in enumerate(results):
        rates = sorted(r.runs)
        ax.plot(rates, [r.runs[x].throughput_tok_s for x in rates], "o-", ms=3, color=f"C{i}", label=r.spec.label)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_tbt_cdf(gaps: dict, path: str, rate: float, slo_ms: float, title: str = "") -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    for i, (label, g) in enumerate(gaps.items()):
        if len(g) == 0:
            continue
        x = np.sort(np.asarray(g) * 1e3)
        # Plot at most ~2000 points: enough for a smooth curve, keeps the PNG small.
        idx = np.unique(np.linspace(0, len(x) - 1, min(len(x), 2000)).astype(int))
        ax.plot(x[idx], (idx + 1) / len(x), color=f"C{i}", label=label)
    ax.axvline(slo_ms, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("time between tokens (ms, log)")
    ax.set_ylabel("CDF")
    ax.set_ylim(0.9, 1.001)
    ax.set_title(f"{title}\nTBT tail at {rate:.2f} req/s (y from 0.9)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_all(results, gaps: dict, cdf_rate: float, out_dir: str, slo_ms: float, target: float,
              title: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    return [
        plot_attainment(results, os.path.join(out_dir, "attainment.png"), target, title),
        plot_throughput(results, os.path.join(out_dir, "throughput.png"), title),
        plot_tbt_cdf(gaps, os.path.join(out_dir, "tbt_cdf.png"), cdf_rate, slo_ms, title),
    ]
