"""The GPU A/B's steps, read back from its per-token delivery times, against the model the policies plan with.

    python benchmark/gpu_ab_steps.py benchmark/results/gpu/h200-2026-11-30/lease3/ab-rate20.json.gz \\
        --hardware configs/hardware/h200-calibrated.yaml

A gpu_ab.py results file keeps every request's token delivery times. Tokens delivered at the same
instant came from one step, so the steps can be rebuilt:

- aggregated lane (aggregated, chunked*): a step with no prompt pending and no first token is a
  decode-only step (a CUDA-graph replay); its gap to the previous step is its device time plus the
  host time that overlap did not hide. `host fit`: gap - model = h0 + h1 * rows over those steps
  (least absolute deviations), the measured truth's host_us.
- chunked's mixed steps: the chunks are rebuilt from the policy's rule (decode-first, FCFS chunks of
  the budget minus the decodes); only steps whose rebuilt prompt completions equal the first tokens
  the GPU delivered in that step are kept. `prefill scale`: median of (gap - host fit) / model.
- static-split's decode lane (decode_sms from its settings): steps of the same batch as the step
  before, with a prompt pending (the prefill lane busy beside it) or not; (gap - host fit) / model is
  the decode lane's slowdown.
- occupancy: requests decoding and waiting (arrived, no first token) over the run, TTFT misses.

The model is the planning model (`--hardware`, summed attention): the numbers are what a truth file
(configs/truth/) adds on top of it.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from sglang_duet.cost_model.roofline import CostModel


@dataclass
class Step:
    start: float  # the previous step's delivery (s)
    end: float  # this step's delivery (s)
    rows: list[tuple[int, int]]  # (request index, token index) delivered

    @property
    def gap(self) -> float:
        return self.end - self.start


def load(path: str) -> dict:
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return json.load(f)


def steps_of(detail: list[dict], decode_only_tokens: bool = False) -> list[Step]:
    """Steps = distinct delivery instants (µs); `decode_only_tokens`: leave first tokens out (a split
    run's prefill lane delivers those on its own)."""
    at: dict[float, list] = defaultdict(list)
    for i, r in enumerate(detail):
        for k, t in enumerate(r["delivery_s"]):
            if k > 0 or not decode_only_tokens:
                at[round(t, 6)].append((i, k))
    times = sorted(at)
    return [Step(a, b, at[b]) for a, b in zip(times, times[1:])]


def _pending(detail: list[dict], t0: float, t1: float) -> bool:
    """A prompt arrived by t0 whose first token came after t1 (so a prefill ran during [t0, t1])."""
    return any(r["arrival_s"] <= t0 and r["delivery_s"][0] > t1 + 1e-6 for r in detail)


def _decode_shape(detail, rows) -> list[tuple[int, int]]:
    return [(1, detail[i]["input_len"] + k - 1) for i, k in rows if k > 0]


def lad_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """y ~ a + b x, least absolute deviations (iteratively reweighted least squares)."""
    A = np.c_[np.ones(len(x)), x]
    w = np.ones(len(x))
    sol = np.zeros(2)
    for _ in range(60):
        sol = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)[0]
        w = 1 / np.sqrt(np.maximum(np.abs(y - A @ sol), 1e-6))
    return float(sol[0]), float(sol[1])


def aggregated_steps(run: dict, cm: CostModel):
    """(decode-only [(model s, rows, gap s)], mixed [(model s, rows, gap s)], matched share) of one
    aggregated-lane run; mixed steps only for chunked (its chunk rule is known)."""
    det = run["detail"]
    chunked = run["policy"].startswith("chunked")
    budget = run["chunked_prefill_size"]
    order = sorted(range(len(det)), key=lambda i: det[i]["arrival_s"])
    done = dict.fromkeys(order, 0)
    nxt, queue, dec, mixed, tried = 0, [], [], [], 0
    for s in steps_of(det):
        while nxt < len(order) and det[order[nxt]]["arrival_s"] <= s.start:
            queue.append(order[nxt])
            nxt += 1
        decodes = _decode_shape(det, s.rows)
        if all(k > 0 for _, k in s.rows) and not _pending(det, s.start, s.start):
            dec.append((cm.batch_time(decodes, None), len(decodes), s.gap))
            continue
        if not chunked:
            continue
        left, chunks, completes = budget - len(decodes), [], set()
        for i in list(queue):
            if left <= 0:
                break
            q = min(det[i]["input_len"] - done[i], left)
            chunks.append((q, done[i]))
            done[i] += q
            left -= q
            if done[i] == det[i]["input_len"]:
                completes.add(i)
                queue.remove(i)
        if not chunks:
            continue
        tried += 1
        if completes == {i for i, k in s.rows if k == 0}:
            mixed.append((cm.batch_time(chunks + decodes, None), len(chunks) + len(decodes), s.gap))
    return dec, mixed, (len(mixed) / tried if tried else None)


def split_decode_steps(run: dict, cm: CostModel, host: tuple[float, float]):
    """static-split's decode lane: {'pending': [...], 'idle': [...]} of (gap / model, (gap - host) / model)."""
    det = run["detail"]
    sms = int(run.get("options", {}).get("decode_sms") or 48)
    out = {"pending": [], "idle": []}
    steps = steps_of(det, decode_only_tokens=True)
    for prev, s in zip(steps, steps[1:]):
        if {i for i, _ in prev.rows} != {i for i, _ in s.rows}:
            continue  # a request joined or left: not one batch stepping
        model = cm.batch_time(_decode_shape(det, s.rows), sms)
        h = host[0] + host[1] * len(s.rows)
        key = "pending" if _pending(det, s.start, s.end) else "idle"
        out[key].append((s.gap / model, (s.gap - h) / model))
    return out


def occupancy(run: dict) -> dict:
    det = run["detail"]
    end = max(r["delivery_s"][-1] for r in det)
    ts = np.linspace(0, end, 2000)[:, None]
    arr = np.array([r["arrival_s"] for r in det])[None, :]
    first = np.array([r["delivery_s"][0] for r in det])[None, :]
    last = np.array([r["delivery_s"][-1] for r in det])[None, :]
    waiting = ((arr <= ts) & (first > ts)).sum(1)
    running = ((first <= ts) & (last > ts)).sum(1)
    busy = (waiting + running) > 0
    ttft = (first - arr)[0]
    gaps = np.concatenate([np.diff(r["delivery_s"]) for r in det])
    return {"running_mean": float(running[busy].mean()), "running_max": int(running.max()),
            "waiting_mean": float(waiting[busy].mean()), "waiting_max": int(waiting.max()),
            "ttft_p50_ms": 1e3 * float(np.median(ttft)), "ttft_miss": float(np.mean(ttft > run["_ttft_slo_s"])),
            "tbt_p50_ms": 1e3 * float(np.median(gaps)), "tbt_p90_ms": 1e3 * float(np.percentile(gaps, 90))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", help="a gpu_ab.py results.json (or .json.gz)")
    p.add_argument("--hardware", default="configs/hardware/h200-calibrated.yaml", help="the planning model's hardware")
    p.add_argument("--mixed-seeds", default=None,
                   help="seeds whose chunked mixed steps the prefill scale is fitted on (comma list; default all)")
    a = p.parse_args(argv)
    doc = load(a.results)
    meta = doc["meta"]
    cm = CostModel.load(meta.get("cost_model_config", meta["model"]).rsplit("/", 1)[-1].removesuffix(".json"), a.hardware)
    mixed_seeds = None if a.mixed_seeds is None else {int(s) for s in a.mixed_seeds.split(",")}
    runs = [r for r in doc["runs"] if r.get("status") == "ok"]
    for r in runs:
        r["_ttft_slo_s"] = meta["ttft_slo_ms"] / 1e3
    print(f"# Steps of {a.results}: {meta['num_requests']} requests at {meta['rate']} req/s, model `{a.hardware}`\n")
    dec_all, mixed_all = [], []
    print("| policy | seed | decode-only steps | gap / model p50 | excess p50 ms | mixed steps (matched) | mixed gap / model p50 |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for r in runs:
        if r["policy"] != "aggregated" and not r["policy"].startswith("chunked"):
            continue
        dec, mixed, matched = aggregated_steps(r, cm)
        dec_all += dec
        if mixed_seeds is None or r["seed"] in mixed_seeds:
            mixed_all += mixed
        ratio = [g / m for m, _, g in dec]
        mr = [g / m for m, _, g in mixed]
        print(f"| {r['policy']} | {r['seed']} | {len(dec)} | {statistics.median(ratio):.3f} | "
              f"{1e3 * statistics.median(g - m for m, _, g in dec):.2f} | "
              + (f"{len(mixed)} ({matched:.0%}) | {statistics.median(mr):.3f} |" if mixed else "- | - |"))
    host = (0.0, 0.0)
    if dec_all:
        d = np.array(dec_all)
        host = lad_fit(d[:, 1], d[:, 2] - d[:, 0])
        err = np.median(np.abs(d[:, 0] + host[0] + host[1] * d[:, 1] - d[:, 2]) / d[:, 2])
        print(f"\nHost fit over {len(d)} decode-only steps: gap - model = {1e3 * host[0]:.3f} ms + "
              f"{1e6 * host[1]:.1f} us x rows (median error {100 * err:.1f}%)")
    if mixed_all:
        m = np.array(mixed_all)
        scale = (m[:, 2] - host[0] - host[1] * m[:, 1]) / m[:, 0]
        print(f"Prefill scale over {len(m)} mixed steps (host fit removed): median {np.median(scale):.3f} "
              f"(p25 {np.percentile(scale, 25):.3f}, p75 {np.percentile(scale, 75):.3f})")
    split = [r for r in runs if r["policy"].startswith("static-split")]
    if split:
        print("\n| static-split seed | decode steps beside a prefill | gap / model | (gap - host) / model | "
              "steps alone | gap / model | (gap - host) / model |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        pend = []
        for r in split:
            s = split_decode_steps(r, cm, host)
            pend += [x for _, x in s["pending"]]
            cells = []
            for key in ("pending", "idle"):
                v = s[key]
                cells.append(f"{len(v)} | {statistics.median(x for x, _ in v):.3f} | {statistics.median(x for _, x in v):.3f}"
                             if v else "0 | - | -")
            print(f"| {r['seed']} | " + " | ".join(cells) + " |")
        if pend:
            print(f"\nDecode lane beside a prefill, host fit removed: median {statistics.median(pend):.3f} over {len(pend)} steps")
    print("\n| policy | seed | decoding mean / max | waiting mean / max | TTFT p50 ms | TTFT misses | TBT p50 / p90 ms |")
    print("|---|---:|---|---|---:|---:|---|")
    for r in runs:
        o = occupancy(r)
        print(f"| {r['policy']} | {r['seed']} | {o['running_mean']:.1f} / {o['running_max']} | "
              f"{o['waiting_mean']:.1f} / {o['waiting_max']} | {o['ttft_p50_ms']:.0f} | {100 * o['ttft_miss']:.0f}% | "
              f"{o['tbt_p50_ms']:.1f} / {o['tbt_p90_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
