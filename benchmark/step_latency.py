"""Step-latency microbenchmark: decode steps and prefills next to their roofline floors.

    python benchmark/step_latency.py                       # Qwen3-8B dummy bf16 on the GPU
    python benchmark/step_latency.py --model-config configs/models/smollm2-135m.json --device cpu --quick

What it does, in order:
1. measures the two ceilings on this device: a large device-to-device copy (bytes read +
   written per second) and a square matmul (bf16 8192^3 on a GPU; smaller in float32 on a CPU);
2. loads the model with dummy weights (same FLOPs and bytes as the real one);
3. times decode steps for each (batch, context) and prefills of N tokens: decode steps go through
   the CUDA-graph runner (static buffers, padded buckets; graphs on a GPU when the backend can be
   captured), prefills through the eager forward of the chosen attention backend;
4. for each: the floor = max(FLOPs / matmul rate, bytes / copy rate), with FLOPs and bytes from
   the cost model's operator inventory (weights, KV reads and writes, activations), the ratio
   measured / floor, the cost model's prediction (configs/hardware/<hw>.yaml curves) and its
   error; the median absolute error summarises how well the cost model predicts this device;
5. writes results.json and results.md under --out.

Decode configurations whose KV cache does not fit in free device memory are reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_REPO))

from sglang_duet.cost_model.hardware import HardwareSpec  # noqa: E402
from sglang_duet.cost_model.roofline import CostModel  # noqa: E402
from sglang_duet.kernels.attention import get_attention_backend, resolve_backend_name  # noqa: E402
from sglang_duet.kernels.attention.base import ForwardBatch  # noqa: E402
from sglang_duet.kernels.cuda_graph import CudaGraphDecodeRunner, supports_graphs  # noqa: E402
from sglang_duet.memory.kv_pool import KVCachePool  # noqa: E402
from sglang_duet.model_loader.loader import load_model  # noqa: E402

sys.path.insert(0, str(_REPO / "benchmark"))
from kernel_profile import profile_kernels, to_markdown as profile_markdown  # noqa: E402

FULL = dict(batches=[1, 8, 32, 128, 256], contexts=[1024, 4096], prefills=[1024, 4096, 8192],
            warmup=3, iters=10, copy_bytes=2 << 30, matmul_n=8192)
# CI smoke test on a shared 2-core CPU: just enough to run every code path once.
QUICK = dict(batches=[1, 2], contexts=[16], prefills=[16], warmup=1, iters=1,
             copy_bytes=8 << 20, matmul_n=128)


@dataclass
class Row:
    kind: str  # decode | prefill
    batch: int
    tokens: int  # decode: context per request; prefill: prompt tokens
    measured_ms: float | None = None
    floor_ms: float | None = None
    bound: str = ""  # which ceiling sets the floor: compute | memory
    ratio: float | None = None  # measured / floor
    predicted_ms: float | None = None  # cost model
    error: float | None = None  # (predicted - measured) / measured
    flops: float = 0.0
    bytes: float = 0.0
    note: str = ""


@dataclass
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    matmul_n: int
    matmul_dtype: str
    copy_bytes: int


@dataclass
class Report:
    device: str
    model: str
    dtype: str
    attention_backend: str
    cuda_graphs: bool
    hardware_file: str
    ceilings: Ceilings
    rows: list[Row] = field(default_factory=list)
    median_abs_error: float | None = None
    median_abs_error_ms: float | None = None
    profiles: dict = field(default_factory=dict)  # --profile: "decode b1 ctx N (graph|eager)", "prefill N" -> kernels


# ---- timing -------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call: wall time of `iters` back-to-back calls after `warmup`, synced at both
    ends (so host overhead between launches counts, as it does when serving)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def measure_ceilings(device: torch.device, copy_bytes: int, matmul_n: int, warmup: int, iters: int) -> Ceilings:
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), device, warmup, max(iters, 3))
    copy_bw = 2 * src.numel() * 4 / t  # read + write
    del src, dst
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    b = torch.randn(matmul_n, matmul_n, device=device, dtype=dtype)
    t = _time(lambda: a @ b, device, warmup, max(iters, 3))
    flops = 2 * matmul_n ** 3 / t
    return Ceilings(copy_bw, flops, matmul_n, str(dtype).removeprefix("torch."), copy_bytes)


# ---- the benchmark --------------------------------------------------------------------------------

def _floor(cm: CostModel, reqs, ceil: Ceilings) -> tuple[float, float, float, str]:
    ops = cm.breakdown(reqs)
    flops = sum(o.flops for o in ops)
    nbytes = sum(o.bytes for o in ops)
    tc, tm = flops / ceil.matmul_flops_per_s, nbytes / ceil.copy_bytes_per_s
    return max(tc, tm), flops, nbytes, ("compute" if tc > tm else "memory")


def _fill(row: Row, measured_s: float, cm: CostModel, reqs, ceil: Ceilings) -> None:
    floor, flops, nbytes, bound = _floor(cm, reqs, ceil)
    pred = cm.batch_time(reqs)
    row.measured_ms = measured_s * 1e3
    row.floor_ms = floor * 1e3
    row.bound = bound
    row.ratio = measured_s / floor
    row.predicted_ms = pred * 1e3
    row.error = (pred - measured_s) / measured_s
    row.flops, row.bytes = flops, nbytes


def run(args) -> Report:
    cfg = FULL if not args.quick else QUICK
    batches = args.batches or cfg["batches"]
    contexts = args.contexts or cfg["contexts"]
    prefills = args.prefills or cfg["prefills"]
    warmup, iters = cfg["warmup"], args.iters or cfg["iters"]
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)

    ceil = measure_ceilings(device, cfg["copy_bytes"], cfg["matmul_n"], warmup, iters)
    loaded = load_model(None, load_format="dummy", model_config_path=args.model_config, dtype=args.dtype,
                        device=str(device))
    model, mcfg = loaded.model, loaded.config
    dtype = loaded.dtype
    backend_name = resolve_backend_name(args.attention_backend, device)
    attn = get_attention_backend(backend_name, mcfg, device)
    hw = args.hardware or _guess_hardware(device)
    cm = CostModel(mcfg, HardwareSpec.load(hw), dtype_bytes=torch.empty((), dtype=dtype).element_size())
    use_graphs = device.type == "cuda" and not args.disable_cuda_graph and supports_graphs(attn)
    report = Report(device=_device_name(device), model=mcfg.name or os.path.basename(args.model_config),
                    dtype=str(dtype).removeprefix("torch."), attention_backend=backend_name, cuda_graphs=use_graphs,
                    hardware_file=hw, ceilings=ceil)

    # One KV pool for the largest decode configuration that fits (and the longest prefill).
    per_slot = KVCachePool.bytes_per_slot(mcfg.num_hidden_layers, mcfg.num_key_value_heads, mcfg.head_dim, dtype)
    want = max([b * (c + 1) for b in batches for c in contexts] + list(prefills)) + 1
    budget = _kv_budget(device, per_slot, want)
    slots = max(2, min(want, budget))
    pool = KVCachePool(mcfg.num_hidden_layers, slots, mcfg.num_key_value_heads, mcfg.head_dim, dtype, device)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.quiet else (lambda *a: None)
    log(f"device {report.device}; copy {ceil.copy_bytes_per_s / 1e9:.0f} GB/s, matmul "
        f"{ceil.matmul_flops_per_s / 1e12:.1f} TFLOP/s; KV pool {slots} slots ({slots * per_slot / 1e9:.1f} GB)")

    runner = CudaGraphDecodeRunner(model, attn, pool, max_bs=max(batches), use_graphs=use_graphs)
    for ctx in contexts:
        for bs in batches:
            row = Row("decode", bs, ctx)
            need = bs * (ctx + 1) + 1
            if need > slots:
                row.note = f"skipped: KV of {need * per_slot / 1e9:.1f} GB does not fit"
                report.rows.append(row)
                log(f"decode bs={bs} ctx={ctx}: {row.note}")
                continue
            table = torch.arange(1, 1 + bs * (ctx + 1), device=device).view(bs, ctx + 1)
            kv = table.reshape(-1)
            out_loc = table[:, ctx]
            ids = torch.randint(0, mcfg.vocab_size, (bs,), device=device)
            positions = [ctx] * bs
            seq = [ctx + 1] * bs

            def step():
                runner.run(ids, positions, out_loc, seq, kv)

            _fill(row, _time(step, device, warmup, iters), cm, [(1, ctx)] * bs, ceil)
            if args.profile and bs == min(batches) and ctx == contexts[0]:
                _profile_decode(report, runner, model, attn, pool, ids, positions, out_loc, seq, kv, device, ctx, bs,
                                use_graphs, log)
            report.rows.append(row)
            log(f"decode bs={bs} ctx={ctx}: {row.measured_ms:.3f} ms (floor {row.floor_ms:.3f}, x{row.ratio:.2f})")
            del table, kv

    for n in prefills:
        row = Row("prefill", 1, n)
        if n + 1 > slots:
            row.note = "skipped: KV does not fit"
            report.rows.append(row)
            continue
        ids = torch.randint(0, mcfg.vocab_size, (n,)).tolist()
        fb = ForwardBatch.build([(ids, 0, list(range(1, n + 1)), True)], device)

        def prefill():
            model(fb, attn, pool)

        _fill(row, _time(prefill, device, warmup, iters), cm, [(n, 0)], ceil)
        if args.profile and n == min(prefills):
            report.profiles[f"prefill {n}"] = _profile(prefill, device, log, f"prefill {n}")
        report.rows.append(row)
        log(f"prefill {n}: {row.measured_ms:.3f} ms (floor {row.floor_ms:.3f}, x{row.ratio:.2f})")

    done = [r for r in report.rows if r.measured_ms is not None]
    if done:
        report.median_abs_error = statistics.median(abs(r.error) for r in done)
        report.median_abs_error_ms = statistics.median(abs(r.predicted_ms - r.measured_ms) for r in done)
    return report


def _profile(fn, device, log, what: str) -> dict:
    """The kernels of one call of fn; a profiler failure is recorded, never fatal (timings come first)."""
    try:
        prof = profile_kernels(fn, device)
    except Exception as e:  # noqa: BLE001 - e.g. CUPTI unavailable on the machine
        log(f"profile {what}: failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"}
    log(f"profile {what}: {prof['events']} device events, {prof['device_ms']:.3f} ms summed")
    return prof


def _profile_decode(report, runner, model, attn, pool, ids, positions, out_loc, seq, kv, device, ctx, bs,
                    use_graphs, log) -> None:
    """One decode step's kernels as timed (the graph replay when graphs are on) and, with graphs on, the
    same step run eagerly (every launch visible to the profiler whatever CUPTI does with graphs)."""
    report.profiles[f"decode b{bs} ctx {ctx} ({'graph' if use_graphs else 'eager'})"] = _profile(
        lambda: runner.run(ids, positions, out_loc, seq, kv), device, log, f"decode b{bs} ctx {ctx}")
    if use_graphs:
        what = f"decode b{bs} ctx {ctx} (eager)"
        try:
            eager = CudaGraphDecodeRunner(model, attn, pool, max_bs=bs, use_graphs=False)
            step = lambda: eager.run(ids, positions, out_loc, seq, kv)  # noqa: E731
            step()  # warm-up: first-call allocations and plans stay out of the profile
        except Exception as e:  # noqa: BLE001 - as in _profile: never costs the timings
            report.profiles[what] = {"error": f"{type(e).__name__}: {e}"}
            return
        report.profiles[what] = _profile(step, device, log, what)


def _kv_budget(device: torch.device, per_slot: int, want: int) -> int:
    if device.type != "cuda":
        return want
    free, _ = torch.cuda.mem_get_info(device)
    # Leave room for activations (an 8k prefill of an 8B model needs a few GB) and graphs.
    return max(2, int((free - (6 << 30)) * 0.9) // per_slot)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _guess_hardware(device: torch.device) -> str:
    if device.type == "cuda" and "H200" in torch.cuda.get_device_name(device):
        return "h200"
    return "h100"


# ---- output -------------------------------------------------------------------------------------------

def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def to_markdown(rep: Report) -> str:
    c = rep.ceilings
    lines = [
        f"# Step latency: {rep.model} ({rep.dtype}) on {rep.device}",
        "",
        f"Attention backend `{rep.attention_backend}`, CUDA graphs {'on' if rep.cuda_graphs else 'off'}, "
        f"cost model hardware file `{rep.hardware_file}`.",
        "",
        f"Measured ceilings: copy {c.copy_bytes_per_s / 1e9:.1f} GB/s (read + write, {c.copy_bytes >> 20} MiB), "
        f"matmul {c.matmul_flops_per_s / 1e12:.2f} TFLOP/s ({c.matmul_dtype} {c.matmul_n}^3).",
        "",
        "Floor = max(FLOPs / matmul rate, bytes / copy rate); ratio = measured / floor; "
        "error = (cost model - measured) / measured.",
        "",
        "| kind | batch | context / tokens | measured ms | floor ms | bound | ratio | cost model ms | error |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rep.rows:
        if r.measured_ms is None:
            lines.append(f"| {r.kind} | {r.batch} | {r.tokens} | {r.note} | | | | | |")
            continue
        lines.append(f"| {r.kind} | {r.batch} | {r.tokens} | {_fmt(r.measured_ms)} | {_fmt(r.floor_ms)} | {r.bound} "
                     f"| {_fmt(r.ratio, '.2f')} | {_fmt(r.predicted_ms)} | {_fmt(100 * r.error, '+.1f')}% |")
    if rep.median_abs_error is not None:
        lines += ["", f"Cost model median absolute error: {100 * rep.median_abs_error:.1f}% "
                      f"({rep.median_abs_error_ms:.3f} ms)."]
    if rep.profiles:
        lines += ["", "## Kernels of one step (`--profile`)", ""]
        for what, prof in rep.profiles.items():
            lines += [f"### {what}: {prof['error']}", ""] if "error" in prof else profile_markdown(what, prof)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-config", default=str(_REPO / "configs" / "models" / "qwen3-8b.json"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: the config's dtype on a GPU (bf16), float32 on a CPU")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--disable-cuda-graph", action="store_true")
    p.add_argument("--hardware", default=None, help="cost model hardware file (default: h200 on an H200, else h100)")
    p.add_argument("--batches", type=int, nargs="*")
    p.add_argument("--contexts", type=int, nargs="*")
    p.add_argument("--prefills", type=int, nargs="*")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke test")
    p.add_argument("--profile", action="store_true",
                   help="also list the kernels of the smallest decode step and prefill (torch.profiler)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=str(_REPO / "results" / "step_latency"))
    args = p.parse_args(argv)
    with torch.inference_mode():
        rep = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(asdict(rep), indent=2, default=_json_default))
    md = to_markdown(rep)
    (out / "results.md").write_text(md)
    print(md)
    return 0


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


if __name__ == "__main__":
    raise SystemExit(main())
