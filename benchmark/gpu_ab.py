"""A short, real policy A/B on one device: one model, one KV pool, one two-lane executor, every policy.

    python benchmark/gpu_ab.py --budget-s 130 --out /tmp/gpu_ab               # Qwen3-8B dummy bf16, GPU
    python benchmark/gpu_ab.py --device cpu --model-config configs/models/tiny-overhead.json \\
        --num-requests 6 --rate 20 --max-input 64 --max-output 8 --out /tmp/gpu_ab_cpu

What it does:
1. loads ONE model (dummy weights: same FLOPs and bytes as the real one) and ONE KV pool, and builds
   ONE two-lane executor (`build_duet_executor`): AGGREGATED launches take its all-SM path (CUDA-graph
   decode, eager prefill), split launches its prefill / decode lanes (green-context streams). The
   decode SM sizes the split policies may use are passed as `duet_capture_sms`, so their graphs can
   be captured before anything is timed;
2. for each seed, samples ONE request trace (`Workload.sample`, lengths clipped by --max-input /
   --max-output) with random prompt token ids, and replays it on the wall clock through a fresh
   `SchedulerCore` + policy per policy: request i is added once `monotonic() - t0 >= arrival_i`
   (its arrival time is the scheduled one, so loop lag counts against TTFT), then
   `schedule() -> submit`, `poll -> apply_result`, greedy, `ignore_eos`;
3. times every token when it reaches the host (the monotonic time at which `apply_result` returned
   its update: the honest "delivery" time; the k tokens of a k-step decode launch arrive together),
   and keeps the executor's device-derived `token_times` beside it for comparison;
4. reports per policy: TTFT / TBT percentiles, strict attainment (TTFT and every gap within the SLOs),
   DistServe attainment (TTFT and mean TPOT), goodput (attained requests per second), output tokens/s,
   the executor's launch counts and paths, lane overlap, the core's plan counts, and the agreement of
   the generated tokens with aggregated's (identical in float32; bf16 may flip near-ties);
5. writes <out>/results.json and <out>/results.md after EVERY policy run (the run in progress is
   marked, so a kill at a time limit loses only that run); a failing run is recorded with its error
   and the others go on; --budget-s caps the whole script (runs not started are marked skipped, a run
   in progress at the cap is cut short: arrivals stop, admitted requests are aborted, it is marked
   truncated).

Per-policy settings: --policy-options POLICY:key=value (repeatable; values parsed as YAML scalars or
lists), e.g. `static-split:decode_sms=32`, `duet:decode_sms_grid=16,32,48,64`, `duet:k_max=4`. The key
`chunked_prefill_size` sets that policy's token budget (defaults: aggregated 8192 as SGLang, chunked
--chunk, static-split and duet --split-chunk). Unless overridden, duet searches decode_sms_grid
16,32,48,64 only (each size on the grid costs a green context and a set of decode graphs).
Tuned variants run side by side as the simulator's policy specs, e.g. `--policies aggregated chunked
chunked:2048 static-split+decode_sms=48 duet`: each entry is its own run, labelled as written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_REPO))

from sglang_duet.core.scheduler_core import CoreConfig, SchedulerCore  # noqa: E402
from sglang_duet.cost_model.hardware import HardwareSpec  # noqa: E402
from sglang_duet.cost_model.roofline import CostModel  # noqa: E402
from sglang_duet.executor.duet_executor import DuetStats, build_duet_executor, lane_overlap_s  # noqa: E402
from sglang_duet.kernels.attention import get_attention_backend, resolve_backend_name  # noqa: E402
from sglang_duet.memory.kv_pool import KVCachePool  # noqa: E402
from sglang_duet.model_loader.loader import load_model  # noqa: E402
from sglang_duet.policies.base import PolicyContext, load_policy  # noqa: E402
from sglang_duet.simulator.sweep import PolicySpec  # noqa: E402
from sglang_duet.sampling_params import SamplingParams  # noqa: E402
from sglang_duet.simulator.loop import RequestRecord  # noqa: E402
from sglang_duet.simulator.metrics import request_arrays, summarize  # noqa: E402
from sglang_duet.workloads import Workload  # noqa: E402

DEFAULT_POLICIES = ["aggregated", "chunked", "static-split", "duet"]
# Token budgets per policy, as in configs/experiments/h100-qwen3-8b-azure-conv.yaml (chunked: --chunk).
DEFAULT_BUDGETS = {"aggregated": 8192}
SPLIT_POLICIES = ("static-split", "duet")
DEFAULT_OPTIONS = {"duet": {"decode_sms_grid": "16,32,48,64"}}
SCRIPT_KEYS = ("chunked_prefill_size",)  # --policy-options keys the script consumes itself

GPU_KV_FRACTION = 0.6  # of the free device memory after the weights
GPU_KV_MAX = 200_000
CPU_KV_DEFAULT = 16_384
POLL_MAX_S = 0.05  # the replay loop looks at the clock (arrivals, the budget) at least this often
DRAIN_S = 120.0  # how long to wait for the executor to go idle after a failed run


# ---- the trace -----------------------------------------------------------------------------------

@dataclass
class Req:
    rid: str
    arrival_s: float  # after t0
    prompt: list[int]
    output_len: int
    seed: int


def build_trace(workload: str, n: int, rate: float | None, seed: int, max_input: int, max_output: int,
                vocab: int, context_length: int, kv_capacity: int, prefix: str = "r") -> list[Req]:
    """n requests of the workload (lengths clipped), random prompt ids, sorted by arrival."""
    specs = Workload.load(workload).sample(n, rate, seed)
    rng = np.random.default_rng([seed, 7919])
    lo = min(3, vocab - 1)  # keep clear of the usual special ids (pad, bos, eos)
    out = []
    for i, s in enumerate(specs):
        n_in = max(1, min(s.input_len, max_input, context_length - 2, kv_capacity - 2))
        n_out = max(1, min(s.output_len, max_output, context_length - n_in - 1, kv_capacity - n_in - 1))
        prompt = rng.integers(lo, vocab, size=n_in).tolist()
        out.append(Req(f"{prefix}{i}", float(s.arrival_s), prompt, int(n_out), seed * 100_003 + i))
    out.sort(key=lambda r: r.arrival_s)
    return out


def warmup_trace(workload: str, n: int, seed: int, max_input: int, max_output: int, vocab: int,
                 context_length: int, kv_capacity: int) -> list[Req]:
    """A tiny trace, everything at t=0: prompts of the same workload and limits, outputs of at most 8
    tokens (enough for every lane's first use, and a few prefill sizes, to happen before the timed run)."""
    return build_trace(workload, n, math.inf, seed + 10_000, max_input, min(max_output, 8), vocab,
                       context_length, kv_capacity, prefix="w")


# ---- one replay ------------------------------------------------------------------------------------

@dataclass
class Rec:
    rid: str
    arrival: float  # absolute monotonic (t0 + arrival_s)
    input_len: int
    output_len: int
    added: float | None = None
    delivery: list[float] = field(default_factory=list)  # host time apply_result returned, per token
    device: list[float] = field(default_factory=list)  # the executor's token_times, per token
    tokens: list[int] = field(default_factory=list)
    finished: bool = False  # ran to its end (not aborted)
    aborted: bool = False
    finish_reason: dict | None = None


def _deliver(updates, res, recs: dict[str, Rec], t: float) -> None:
    for u in updates:
        rec = recs.get(u.rid)
        if rec is None:
            continue
        n = len(u.new_token_ids)
        if n:
            rec.tokens.extend(u.new_token_ids)
            rec.delivery.extend([t] * n)
            dev = list((res.token_times.get(u.rid) if res is not None else None) or [])[:n]
            fill = res.finished_at if res is not None and res.finished_at else t
            rec.device.extend(dev + [fill] * (n - len(dev)))
        if u.finished:
            rec.finish_reason = u.finish_reason
            rec.aborted = (u.finish_reason or {}).get("type") == "abort"
            rec.finished = not rec.aborted


def replay(core: SchedulerCore, ex, reqs: list[Req], t0: float, deadline: float | None = None,
           clock=time.monotonic) -> tuple[dict[str, Rec], bool]:
    """Replay `reqs` on the wall clock from t0 until every request finished. Returns (records, cut):
    cut is True when `deadline` (monotonic) passed: arrivals stopped and admitted requests were aborted."""
    recs = {r.rid: Rec(r.rid, t0 + r.arrival_s, len(r.prompt), r.output_len) for r in reqs}
    nxt, n, cut = 0, len(reqs), False
    while True:
        now = clock()
        if deadline is not None and not cut and now >= deadline:
            cut = True
            nxt = n  # requests not added yet never arrive
            for rid in list(core.requests):
                core.abort(rid, "gpu_ab: time budget")
        while nxt < n and now - t0 >= reqs[nxt].arrival_s:
            r = reqs[nxt]
            core.add_request(r.rid, r.prompt, SamplingParams(max_new_tokens=r.output_len, ignore_eos=True,
                                                             temperature=0.0),
                             seed=r.seed, arrival_time=t0 + r.arrival_s)
            recs[r.rid].added = now
            nxt += 1
        _deliver(core.take_updates(), None, recs, clock())
        for launch in core.schedule():
            ex.submit(launch)
        next_at = t0 + reqs[nxt].arrival_s if nxt < n else None
        if core.inflight:
            wait = POLL_MAX_S if next_at is None else min(POLL_MAX_S, max(0.0, next_at - clock()))
            for res in ex.poll(timeout=wait):
                updates = core.apply_result(res)
                _deliver(updates, res, recs, clock())
        elif core.has_unfinished() and next_at is None:
            raise RuntimeError(f"stuck: {core.num_waiting} waiting, {core.num_running} running, nothing in flight, "
                               f"and the policy planned nothing (KV free {core.allocator.available}/"
                               f"{core.allocator.capacity})")
        elif next_at is not None:
            time.sleep(max(0.0, min(POLL_MAX_S, next_at - clock())))
        else:
            return recs, cut


def drain(ex, timeout_s: float = DRAIN_S) -> bool:
    """Wait until the executor has nothing in flight (after a failure); True when it is idle."""
    end = time.monotonic() + timeout_s
    while ex.busy() and time.monotonic() < end:
        try:
            ex.poll(timeout=0.5)
        except Exception:  # noqa: BLE001 - another failed launch of the same broken run
            pass
    return not ex.busy()


# ---- metrics -----------------------------------------------------------------------------------------

def metrics(recs: list[Rec], times: str, span_from: float, rate: float | None, tbt_slo_ms: float,
            ttft_slo_ms: float) -> dict:
    """simulator.metrics.summarize over one kind of token times; attainment counts unfinished requests
    as misses; goodput = attained requests / (first arrival -> last token)."""
    rr = [RequestRecord(r.rid, r.arrival, r.input_len, r.output_len, getattr(r, times)) for r in recs]
    last = max((t[-1] for t in (getattr(r, times) for r in recs) if t), default=span_from)
    span = max(last - span_from, 1e-9)
    cfg = types.SimpleNamespace(rate=rate if rate is not None else float("nan"), tbt_slo_ms=tbt_slo_ms,
                                ttft_slo_ms=ttft_slo_ms)
    with np.errstate(invalid="ignore"):  # a request never served has infinite TTFT (a miss)
        m = summarize(types.SimpleNamespace(config=cfg, records=rr, sim_time_s=span)).to_dict()
    ttft, tpot, max_gap, _ = request_arrays(rr)
    fin = np.array([r.finished for r in recs], dtype=bool)
    ok_ttft = ttft <= ttft_slo_ms / 1e3
    n = max(len(recs), 1)
    strict = int(np.sum(fin & ok_ttft & (max_gap <= tbt_slo_ms / 1e3)))
    dist = int(np.sum(fin & ok_ttft & (tpot <= tbt_slo_ms / 1e3)))
    m.update(attainment=dist / n, attainment_max_tbt=strict / n, ttft_attainment=float(np.sum(fin & ok_ttft)) / n,
             goodput_strict_req_s=strict / span, goodput_distserve_req_s=dist / span, duration_s=span)
    return m


# ---- results -----------------------------------------------------------------------------------------

def _clean(x):
    """JSON-safe: non-finite floats -> None, sets -> sorted lists, enums -> values."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(getattr(k, "value", k)): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, set):
        return sorted(_clean(v) for v in x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return _clean(float(x))
    return x


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def to_markdown(doc: dict) -> str:
    meta = doc["meta"]
    runs = doc["runs"]
    lines = [
        f"# Policy A/B on {meta['device_name']}: {meta['model']} ({meta['dtype']})",
        "",
        f"Workload `{meta['workload']}`, {meta['num_requests']} requests per run at "
        f"{'inf' if meta['rate'] is None else _fmt(meta['rate'], '.2f')} req/s, inputs <= {meta['max_input']}, "
        f"outputs <= {meta['max_output']}, "
        f"seeds {meta['seeds']}. SLOs: TBT {meta['tbt_slo_ms']:g} ms, TTFT {meta['ttft_slo_ms']:g} ms. "
        f"Attention `{meta['attention_backend']}`, SM partitions `{meta['sm_partition_backend']}`, "
        f"cost model `{meta['hardware']}`, KV {meta['kv_tokens']} tokens, CUDA-graph max bs {meta['max_bs']}, "
        f"decode sizes prepared {meta['capture_sms']}.",
        "",
        "Times are host delivery times (when `apply_result` returned the token). Strict: TTFT and every "
        "gap within the SLOs; DistServe: TTFT and mean TPOT. Goodput: attained requests per second "
        "(first arrival to last token). Ratio: strict goodput / aggregated's (same seed).",
    ]
    if doc.get("setup_error"):
        lines += ["", f"**Setup failed, nothing ran:** `{doc['setup_error']}`"]
    if meta.get("sm_partition_backend") == "none" and str(meta.get("device", "")).startswith("cuda"):
        lines += ["", "**Warning: no green contexts: split lanes ran on ordinary streams (not SM-confined).**"]
    lines += [
        "",
        "| policy | seed | status | goodput strict (req/s) | goodput DistServe (req/s) | strict att. | "
        "DistServe att. | TBT p99 ms | TBT max ms | TTFT p99 ms | out tok/s | ratio vs aggregated |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    agg = {r["seed"]: r for r in runs if r["policy"] == "aggregated" and r.get("delivery")}
    for r in runs:
        d = r.get("delivery")
        if not d:
            why = (r.get("error") or r.get("reason") or "").replace("|", "\\|")
            lines.append(f"| {r['policy']} | {r['seed']} | {r['status']} | {why.splitlines()[0][:80] if why else ''} "
                         f"| | | | | | | | |")
            continue
        base = agg.get(r["seed"], {}).get("delivery", {}).get("goodput_strict_req_s")
        ratio = d["goodput_strict_req_s"] / base if base else None
        lines.append(
            f"| {r['policy']} | {r['seed']} | {r['status']} | {_fmt(d['goodput_strict_req_s'], '.3f')} "
            f"| {_fmt(d['goodput_distserve_req_s'], '.3f')} | {_fmt(100 * d['attainment_max_tbt'], '.1f')}% "
            f"| {_fmt(100 * d['attainment'], '.1f')}% | {_fmt(d['tbt_p99_ms'], '.1f')} "
            f"| {_fmt(d['tbt_max_ms'], '.1f')} "
            f"| {_fmt(d['ttft_p99_ms'], '.1f')} | {_fmt(d['throughput_tok_s'], '.1f')} | {_fmt(ratio, '.2f')} |")
    ok = [r for r in runs if r.get("delivery")]
    if len(meta.get("seeds") or []) > 1 and ok:
        lines += ["", "Mean over seeds:", "",
                  "| policy | runs | goodput strict | goodput DistServe | strict att. | DistServe att. | TBT p99 ms "
                  "| TTFT p99 ms | out tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for pol in dict.fromkeys(r["policy"] for r in ok):
            ds = [r["delivery"] for r in ok if r["policy"] == pol]

            def mean(k, ds=ds):
                vals = [d[k] for d in ds if d.get(k) is not None]
                return sum(vals) / len(vals) if vals else None
            lines.append(f"| {pol} | {len(ds)} | {_fmt(mean('goodput_strict_req_s'), '.3f')} "
                         f"| {_fmt(mean('goodput_distserve_req_s'), '.3f')} "
                         f"| {_pct(mean('attainment_max_tbt'))} | {_pct(mean('attainment'))} "
                         f"| {_fmt(mean('tbt_p99_ms'), '.1f')} | {_fmt(mean('ttft_p99_ms'), '.1f')} "
                         f"| {_fmt(mean('throughput_tok_s'), '.1f')} |")
    lines += [
        "",
        "## Executor and scheduler",
        "",
        "| policy | seed | finished / requests | duration s | launches agg / prefill / decode | paths "
        "graph / device / eager / aggregated | plans agg / split | lane overlap s | splits used | retractions "
        "| tokens = aggregated's |",
        "|---|---:|---:|---:|---|---|---|---:|---|---:|---:|",
    ]
    for r in runs:
        if not r.get("delivery"):
            continue
        e, c = r["executor"], r["core"]
        la, pa = e["launches"], e["paths"]
        agree = r.get("token_agreement")
        lines.append(
            f"| {r['policy']} | {r['seed']} | {r['finished']} / {r['requests']} | {_fmt(r['delivery']['duration_s'])} "
            f"| {la.get('aggregated', 0)} / {la.get('prefill', 0)} / {la.get('decode', 0)} "
            f"| {pa.get('graph', 0)} / {pa.get('device', 0)} / {pa.get('eager', 0)} / {pa.get('aggregated', 0)} "
            f"| {c['plans'].get('aggregated', 0)} / {c['plans'].get('split', 0)} | {_fmt(e['lane_overlap_s'], '.3f')} "
            f"| {e['splits_used']} | {c['retractions']} | {_fmt(None if agree is None else 100 * agree, '.1f')}"
            f"{'%' if agree is not None else ''} |")
    lines += [
        "",
        "## Delivery vs device times",
        "",
        "Device: the executor's per-token `token_times` (CUDA events mapped to the host clock).",
        "",
        "| policy | seed | TTFT p50 ms (delivery / device) | TBT p50 ms | TBT p99 ms | strict att. | "
        "mean loop lag ms | max loop lag ms |",
        "|---|---:|---|---|---|---|---:|---:|",
    ]
    for r in runs:
        d, v = r.get("delivery"), r.get("device")
        if not d or not v:
            continue
        lines.append(
            f"| {r['policy']} | {r['seed']} | {_fmt(d['ttft_p50_ms'], '.1f')} / {_fmt(v['ttft_p50_ms'], '.1f')} "
            f"| {_fmt(d['tbt_p50_ms'], '.1f')} / {_fmt(v['tbt_p50_ms'], '.1f')} "
            f"| {_fmt(d['tbt_p99_ms'], '.1f')} / {_fmt(v['tbt_p99_ms'], '.1f')} "
            f"| {_fmt(100 * d['attainment_max_tbt'], '.1f')}% / {_fmt(100 * v['attainment_max_tbt'], '.1f')}% "
            f"| {_fmt(r['admission_lag_ms']['mean'], '.2f')} | {_fmt(r['admission_lag_ms']['max'], '.2f')} |")
    errs = [r for r in runs if r.get("error")]
    if errs:
        lines += ["", "Errors:", ""] + [f"- {r['policy']} (seed {r['seed']}): `{r['error'].splitlines()[0]}`"
                                        for r in errs]
    if doc.get("skipped"):
        lines += ["", "Skipped (budget): " + ", ".join(f"{s['policy']} (seed {s['seed']})" for s in doc["skipped"])]
    if doc.get("in_progress"):
        p = doc["in_progress"]
        lines += ["", f"In progress when written: {p['policy']} (seed {p['seed']})."]
    return "\n".join(lines) + "\n"


class ResultsWriter:
    def __init__(self, out: str | None, meta: dict):
        self.out = Path(out) if out else None
        self.doc = {"meta": meta, "runs": [], "skipped": [], "in_progress": None}
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)

    def write(self) -> None:
        if not self.out:
            return
        doc = _clean(self.doc)
        for name, text in (("results.json", json.dumps(doc, indent=1)), ("results.md", to_markdown(doc))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


# ---- setup -------------------------------------------------------------------------------------------

def parse_policy_options(items: list[str] | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items or []:
        pol, sep, kv = item.partition(":")
        key, eq, value = kv.partition("=")
        if not sep or not eq or not pol or not key.strip():
            raise ValueError(f"--policy-options {item!r}: expected POLICY:key=value")
        out.setdefault(pol.strip(), {})[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def _split_list(values: list[str]) -> list[str]:
    return [p for v in values for p in v.replace(",", " ").split() if p]


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _hardware(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        for tag, hw in (("H200", "h200"), ("H100", "h100"), ("A100", "a100")):
            if tag in gpu:
                return hw
    return "h100"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _kv_slots(args, device: torch.device, per_slot: int) -> int:
    if args.kv_tokens:
        return int(args.kv_tokens) + 1
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(2, min(GPU_KV_MAX, int(free * GPU_KV_FRACTION) // per_slot) + 1)
    return CPU_KV_DEFAULT + 1


def policy_settings(args, label: str, user_opts: dict[str, dict]) -> tuple[str, dict, int]:
    """(the policy's name, its options, its chunked_prefill_size) for one --policies entry: a name, or the
    simulator's spec `NAME:BUDGET+KEY=VALUE...` (a tuned variant, e.g. `chunked:2048`,
    `static-split+decode_sms=48`). Options: the script's defaults for the policy, then --policy-options for
    its name, then the spec's, then --policy-options for the entry's own text."""
    spec = PolicySpec.parse(label)
    name = spec.policy
    opts = dict(DEFAULT_OPTIONS.get(name, {}))
    opts.update(user_opts.get(name, {}))
    opts.update(dict(spec.options))
    if label != name:
        opts.update(user_opts.get(label, {}))
    budget = opts.pop("chunked_prefill_size", None) or spec.chunked_prefill_size
    if budget is None:
        budget = args.chunk if name == "chunked" else (args.split_chunk if name in SPLIT_POLICIES
                                                       else DEFAULT_BUDGETS.get(name, args.split_chunk))
    return name, opts, int(budget)


def capture_sizes(policies: dict[str, object], grid: list[int]) -> list[int]:
    """The decode partition sizes the split policies may ask for (on the executor's grid)."""
    sizes: set[int] = set()
    for pol in policies.values():
        if pol is None:
            continue
        d = getattr(pol, "decode_sms", None)
        if isinstance(d, int):
            sizes.add(d)
        if getattr(pol, "name", "") == "duet":
            sizes.update(int(s) for s in getattr(pol, "grid", []))
    return sorted(s for s in sizes if s in grid)


# ---- main ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    a = p.add_argument
    a("--model-config", default=str(_REPO / "configs" / "models" / "qwen3-8b.json"))
    a("--device", default="auto", help="auto | cuda | cpu")
    a("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    a("--attention-backend", default="auto", help="auto (flashinfer > triton > torch on cuda; torch on cpu)")
    a("--cost-model-config", default=None,
      help="the model the policies' roofline prices (default: --model-config); e.g. plan as Qwen3-8B while a "
           "tiny model runs, to drive duet's split paths on a CPU")
    a("--hardware", default="auto", help="cost model / SM grid: a name in configs/hardware or a YAML path, e.g. a "
                                          "calibration (auto: from the GPU's name; h100 on cpu)")
    a("--sm-partition-backend", default=None, help="auto | cuda | torch | none (default: auto on cuda, none on cpu)")
    a("--max-bs", type=int, default=64, help="CUDA-graph max decode batch (cuda_graph_max_bs)")
    a("--max-running", type=int, default=None, help="max running requests (default: --max-bs, so every decode "
                                                    "batch fits a graph)")
    a("--disable-cuda-graph", action="store_true")
    a("--kv-tokens", type=int, default=None,
      help=f"KV pool size in tokens (cuda default: {GPU_KV_FRACTION * 100:.0f}%% of free memory, at most {GPU_KV_MAX}; "
           f"cpu: {CPU_KV_DEFAULT})")
    a("--capture-sms", default="auto", help="decode SM sizes passed as duet_capture_sms: auto (from the split "
                                            "policies' options), none, or a comma list")
    a("--policies", nargs="+", default=DEFAULT_POLICIES,
      help="names, .py files, or tuned variants NAME:BUDGET+KEY=VALUE (chunked:2048, static-split+decode_sms=48); "
           "space or comma separated")
    a("--policy-options", action="append", default=[], metavar="POLICY:KEY=VALUE")
    a("--chunk", type=int, default=512, help="chunked's chunked_prefill_size")
    a("--split-chunk", type=int, default=2048, help="static-split's and duet's chunked_prefill_size")
    a("--tbt-slo-ms", type=float, default=100.0)
    a("--ttft-slo-ms", type=float, default=1000.0)
    a("--workload", default="azure-conv")
    a("--num-requests", type=int, default=64)
    a("--rate", type=float, default=None, help="req/s (default: the workload's; inf: all at t=0)")
    a("--max-input", type=int, default=4096)
    a("--max-output", type=int, default=256)
    a("--seeds", type=int, default=1, help="how many traces (seeds --seed, --seed+1, ...)")
    a("--seed", type=int, default=0)
    a("--warmup", type=int, default=4, help="warm-up requests per policy run before timing (0: none)")
    a("--budget-s", type=float, default=None, help="wall-clock cap for the whole script")
    a("--run-timeout-s", type=float, default=None, help="cap for one timed replay (then cut short, as at the budget)")
    a("--out", default=None, help="folder for results.json and results.md")
    a("--quiet", action="store_true")
    return p


def setup(args, meta: dict, log) -> types.SimpleNamespace:
    """Model, KV pool, cost model, the policies' settings (validated) and the one executor; fills `meta`."""
    device = _device(args.device)
    policies = meta["policies"]
    user_opts = parse_policy_options(args.policy_options)
    hw_name = _hardware(args.hardware, device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    attn_name = resolve_backend_name(args.attention_backend, device)  # auto: torch on a CPU
    part_backend = args.sm_partition_backend or ("auto" if device.type == "cuda" else "none")
    meta.update(device=str(device), device_name=_device_name(device), hardware=hw_name, attention_backend=attn_name)

    torch.manual_seed(0)
    loaded = load_model(None, load_format="dummy", model_config_path=args.model_config, dtype=dtype,
                        device=str(device))
    model, mcfg = loaded.model, loaded.config
    tdtype = next(model.parameters()).dtype
    per_slot = KVCachePool.bytes_per_slot(mcfg.num_hidden_layers, mcfg.num_key_value_heads, mcfg.head_dim, tdtype)
    slots = _kv_slots(args, device, per_slot)
    pool = KVCachePool(mcfg.num_hidden_layers, slots, mcfg.num_key_value_heads, mcfg.head_dim, tdtype, device)
    meta.update(model=mcfg.name or os.path.basename(args.model_config), dtype=str(tdtype).removeprefix("torch."),
                kv_tokens=slots - 1)
    if args.max_input + args.max_output + 1 > slots - 1:
        log(f"warning: the KV pool ({slots - 1} tokens) is smaller than one longest request "
            f"({args.max_input} + {args.max_output}); lengths are clipped to it")
    hw = HardwareSpec.load(hw_name)
    cm = CostModel.load(args.cost_model_config or args.model_config, hw_name)
    log(f"{meta['device_name']}: {meta['model']} {meta['dtype']}, KV {slots - 1} tokens "
        f"({slots * per_slot / 2**30:.1f} GiB), attention {attn_name}, hardware {hw_name}")

    # The policies first: bad options fail here (recorded per policy), and the split sizes are known.
    settings, probes, errors = {}, {}, {}
    for name in policies:
        try:
            policy, opts, budget = policy_settings(args, name, user_opts)
            settings[name] = (policy, opts, budget)
            probes[name] = load_policy(policy, PolicyContext(chunked_prefill_size=budget, tbt_slo_ms=args.tbt_slo_ms,
                                                           ttft_slo_ms=args.ttft_slo_ms, cost_model=cm, hardware=hw,
                                                           options=dict(opts)))
        except Exception as e:  # noqa: BLE001 - recorded, the other policies still run
            errors[name] = f"{type(e).__name__}: {e}"
            probes[name] = None
    if args.capture_sms == "auto":
        capture = capture_sizes(probes, hw.partition_grid())
    elif args.capture_sms == "none":
        capture = []
    else:
        capture = sorted({int(x) for x in _split_list([args.capture_sms])})
    meta.update(capture_sms=capture,
                policy_settings={k: {"policy": v[0], "options": v[1], "chunked_prefill_size": v[2]}
                                 for k, v in settings.items()})

    attn = get_attention_backend(attn_name, mcfg, device)
    ex_args = types.SimpleNamespace(cuda_graph_max_bs=args.max_bs, hardware=hw_name,
                                    sm_partition_backend=part_backend, duet_capture_sms=capture,
                                    disable_cuda_graph=args.disable_cuda_graph, extra={})
    t = time.monotonic()
    ex = build_duet_executor(model, pool, attn, device, ex_args)
    meta.update(sm_partition_backend=ex.partitioner.backend, executor_setup_s=time.monotonic() - t)
    log(f"executor ready in {meta['executor_setup_s']:.1f}s: partitions {ex.partitioner.backend}, "
        f"decode sizes prepared {capture}")
    return types.SimpleNamespace(ex=ex, cm=cm, hw=hw, vocab=mcfg.vocab_size, ctx_len=mcfg.max_position_embeddings,
                                 slots=slots, settings=settings, errors=errors)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s if args.budget_s else None
    log = (lambda *m: None) if args.quiet else (lambda *m: print("[gpu_ab %6.1fs]" % (time.monotonic() - start),
                                                                *m, file=sys.stderr, flush=True))
    rate = args.rate if args.rate is not None else Workload.load(args.workload).default_rate
    seeds = [args.seed + i for i in range(max(1, args.seeds))]
    meta = dict(
        device=args.device, device_name=args.device, model=os.path.basename(args.model_config),
        model_config=args.model_config, cost_model_config=args.cost_model_config or args.model_config, dtype=None,
        attention_backend=args.attention_backend, sm_partition_backend=None, hardware=args.hardware, kv_tokens=None,
        max_bs=args.max_bs, max_running=args.max_running or args.max_bs, capture_sms=None,
        workload=args.workload, num_requests=args.num_requests, rate=rate, max_input=args.max_input,
        max_output=args.max_output, seeds=seeds, warmup=args.warmup, tbt_slo_ms=args.tbt_slo_ms,
        ttft_slo_ms=args.ttft_slo_ms, budget_s=args.budget_s, policies=_split_list(args.policies),
        argv=list(sys.argv[1:] if argv is None else argv),
    )
    writer = ResultsWriter(args.out, meta)
    try:
        env = setup(args, meta, log)
    except Exception as e:  # noqa: BLE001 - the one failure that stops everything: say so in the results
        writer.doc["setup_error"] = f"{type(e).__name__}: {e}"
        writer.doc["traceback"] = traceback.format_exc()
        meta["elapsed_s"] = time.monotonic() - start
        writer.write()
        log(f"setup failed: {type(e).__name__}: {e}")
        raise
    writer.write()
    ex = env.ex
    core_cfg = dict(kv_slots=env.slots, context_length=env.ctx_len, max_running_requests=meta["max_running"])
    reference: dict[int, dict[str, list[int]]] = {}  # seed -> aggregated's tokens
    failed = bool(env.errors)
    try:
        for seed in seeds:
            trace = build_trace(args.workload, args.num_requests, rate, seed, args.max_input, args.max_output,
                                env.vocab, env.ctx_len, env.slots - 1)
            warm = warmup_trace(args.workload, args.warmup, seed, args.max_input, args.max_output, env.vocab,
                                env.ctx_len, env.slots - 1) if args.warmup > 0 else []
            for name in meta["policies"]:
                run = {"policy": name, "seed": seed, "status": "running", "requests": len(trace)}
                if deadline is not None and time.monotonic() >= deadline:
                    run.update(status="skipped", reason=f"budget of {args.budget_s:g}s spent")
                    writer.doc["runs"].append(run)
                    writer.doc["skipped"].append({"policy": name, "seed": seed})
                    writer.write()
                    log(f"{name} seed {seed}: skipped (budget)")
                    continue
                if name in env.errors:
                    run.update(status="error", error=env.errors[name])
                    writer.doc["runs"].append(run)
                    writer.write()
                    continue
                writer.doc["in_progress"] = {"policy": name, "seed": seed}
                writer.write()
                policy, opts, budget = env.settings[name]
                run.update(options=opts, chunked_prefill_size=budget)
                try:
                    one_run(run, ex, policy, opts, budget, env.cm, env.hw, args, core_cfg, trace, warm, rate,
                            deadline, log)
                    toks = run.pop("_tokens", None)
                    if run["status"] == "skipped":
                        writer.doc["skipped"].append({"policy": name, "seed": seed})
                    elif name == "aggregated":
                        reference[seed] = toks
                    else:
                        ref = reference.get(seed)
                        if ref is not None and toks is not None:
                            same = sum(a == b for rid in ref for a, b in zip(ref[rid], toks.get(rid, [])))
                            total = sum(len(v) for v in ref.values())
                            run["token_agreement"] = same / total if total else None
                except Exception as e:  # noqa: BLE001 - recorded; the next policy still runs
                    failed = True
                    run.pop("_tokens", None)
                    run.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
                    log(f"{name} seed {seed}: ERROR {type(e).__name__}: {e}")
                    if not drain(ex):
                        run["error"] += " (and the executor did not go idle)"
                writer.doc["runs"].append(run)
                writer.doc["in_progress"] = None
                writer.write()
    finally:
        ex.shutdown()
        meta["elapsed_s"] = time.monotonic() - start
        writer.write()
    if not args.quiet and args.out:
        print(to_markdown(_clean(writer.doc)))
    return 1 if failed else 0


def one_run(run: dict, ex, name: str, opts: dict, budget: int, cm, hw, args, core_cfg: dict, trace: list[Req],
            warm: list[Req], rate, deadline, log) -> None:
    """Warm-up replay, then the timed replay of `trace` through a fresh core + policy; fills `run`."""
    def fresh_core():
        pol = load_policy(name, PolicyContext(chunked_prefill_size=budget, tbt_slo_ms=args.tbt_slo_ms,
                                              ttft_slo_ms=args.ttft_slo_ms, cost_model=cm, hardware=hw,
                                              options=dict(opts)))
        return SchedulerCore(CoreConfig(chunked_prefill_size=budget, **core_cfg), pol, clock=time.monotonic)

    if ex.busy():
        raise RuntimeError("the executor still has launches in flight from an earlier run")
    if warm:
        t = time.monotonic()
        core = fresh_core()
        replay(core, ex, warm, time.monotonic(), deadline)
        _check_idle(core, ex, "warm-up")
        run["warmup_s"] = time.monotonic() - t
        if deadline is not None and time.monotonic() >= deadline:
            run.update(status="skipped", reason="budget spent during the warm-up")
            return
    ex.stats = DuetStats()  # per run (nothing in flight: no worker touches it now)
    ex.intervals.clear()
    core = fresh_core()
    log(f"{name} seed {run['seed']}: {len(trace)} requests over {trace[-1].arrival_s if trace else 0:.1f}s")
    t0 = time.monotonic()
    if args.run_timeout_s:
        deadline = t0 + args.run_timeout_s if deadline is None else min(deadline, t0 + args.run_timeout_s)
    recs, cut = replay(core, ex, trace, t0, deadline)
    wall = time.monotonic() - t0
    _check_idle(core, ex, "run", kv=False)  # the KV check comes once the metrics are recorded
    rl = [recs[r.rid] for r in trace]
    dlv = metrics(rl, "delivery", t0, rate, args.tbt_slo_ms, args.ttft_slo_ms)
    dev = metrics(rl, "device", t0, rate, args.tbt_slo_ms, args.ttft_slo_ms)
    lags = [(r.added - r.arrival) * 1e3 for r in rl if r.added is not None]
    s, cs = ex.stats, core.stats
    decisions = {}
    for d in getattr(core.policy, "decisions", []):
        if d.predicted_ms:
            decisions.setdefault(d.lane, []).append(d.actual_ms / d.predicted_ms)
    run.update(
        status="truncated" if cut else "ok",
        finished=sum(r.finished for r in rl), aborted=sum(r.aborted for r in rl),
        never_added=sum(r.added is None for r in rl),
        wall_s=wall, delivery=dlv, device=dev,
        admission_lag_ms={"mean": float(np.mean(lags)) if lags else None, "max": max(lags) if lags else None},
        executor={"launches": dict(s.launches), "paths": dict(s.paths), "max_lanes_in_flight": s.max_lanes_in_flight,
                  "splits_used": sorted(s.splits_used), "lane_overlap_s": lane_overlap_s(ex.intervals)},
        core={"plans": dict(cs.plans), "launches": dict(cs.launches), "retractions": cs.retractions,
              "generated_tokens": cs.generated_tokens, "aborted": cs.aborted},
        measured_over_predicted={lane: {"median": float(np.median(v)), "n": len(v)} for lane, v in decisions.items()},
        kv_free_after=core.allocator.available == core.allocator.capacity,
        detail=[{"rid": r.rid, "arrival_s": r.arrival - t0, "input_len": r.input_len, "output_len": r.output_len,
                 "finished": r.finished, "aborted": r.aborted, "finish_reason": r.finish_reason,
                 "completion_tokens": len(r.tokens),
                 "delivery_s": [round(x - t0, 6) for x in r.delivery],
                 "device_s": [round(x - t0, 6) for x in r.device]} for r in rl],
        _tokens={r.rid: r.tokens for r in rl},
    )
    d = dlv
    log(f"{name} seed {run['seed']}: {run['status']} in {wall:.1f}s; goodput strict {d['goodput_strict_req_s']:.3f} "
        f"req/s (att. {100 * d['attainment_max_tbt']:.0f}%), DistServe {d['goodput_distserve_req_s']:.3f} "
        f"({100 * d['attainment']:.0f}%), TBT p99 {d['tbt_p99_ms']:.1f} ms, TTFT p99 {d['ttft_p99_ms']:.1f} ms, "
        f"{d['throughput_tok_s']:.0f} tok/s; launches {dict(s.launches)}")
    _check_idle(core, ex, "run")  # a KV leak fails the run (recorded as an error, its metrics kept)


def _check_idle(core: SchedulerCore, ex, what: str, kv: bool = True) -> None:
    if core.has_unfinished() or core.inflight:
        raise RuntimeError(f"{what}: the core still has work ({core.num_waiting} waiting, {core.num_running} running)")
    if ex.busy():
        raise RuntimeError(f"{what}: the executor still has launches in flight")
    if kv and core.allocator.available != core.allocator.capacity:
        raise AssertionError(f"{what}: KV leak: {core.allocator.capacity - core.allocator.available} slots "
                             f"still allocated after every request finished")


if __name__ == "__main__":
    raise SystemExit(main())
