"""Calibrate the cost model's per-SM-count curves on this GPU's green-context partitions.

    python -m sglang_duet.calibrate --model-config configs/models/qwen3-8b.json --hardware h100 \\
        --out configs/hardware/h100-calibrated.yaml [--quick]
    python -m sglang_duet.calibrate --device cpu --quick --model-config configs/models/smollm2-135m.json \\
        --out /tmp/cal.yaml                      # smoke test of the same code path on a CPU

On every partition size of the grid (8, 16, ..., 120 SMs on an H100) and on the whole GPU:
1. compute(S): a bf16 GEMM sweep on a stream confined to S SMs; the best FLOP/s of the sweep;
2. bandwidth(S): a large device-to-device copy, bytes read + written per second;
3. real steps of the dummy model (decode steps through the partition's CUDA graphs, eager
   prefills) on some sizes: the cost model's step terms (GEMM efficiency and padding rows, GEMM
   streaming rate, attention efficiency, activation traffic, launch overhead) are fitted to them
   (cost_model/fit.py), and a validation table gives the prediction before calibration (the
   shipped estimates), after (in sample) and held out (leave-one-SM-count-out and
   leave-one-shape-out refits), each with its median absolute error.
It writes the calibration file in the documented format (`hardware.write_calibration`: measured
absolute curves on the granted SM counts, `base:` the shipped file) and a report beside it
(<out>.report.md / .json, and the sweep's points in <out>.points.json). On a CPU it refuses unless
`--device cpu --quick`, which runs the same code with the `none` partitioner on tiny sizes and
writes a file `HardwareSpec.load` accepts (its numbers describe the CPU, not a GPU: never ship it).

The fit reruns offline, without a GPU, from the saved measurements (`--refit`):

    python -m sglang_duet.calibrate --refit <out>.points.json --rows <out>.report.json \
        [--step-latency step_latency/results.json] --out configs/hardware/h200-calibrated.yaml \
        [--report calibration.md]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sglang_duet.calibrate_report import (  # noqa: F401 - SizePoint, Row, curves: also this API
    CalibrationRefused, Row, SizePoint, base_ref, extra_rows_report, row_dict, step_latency_rows, curves,
    fit_rows, predict, refit, report_markdown)
from sglang_duet.cost_model import fit as step_fit
from sglang_duet.cost_model.hardware import HardwareSpec, configs_dir, write_calibration

logger = logging.getLogger("sglang_duet.calibrate")


@dataclass(frozen=True)
class Settings:
    gemm_shapes: tuple  # (M, N, K) per sweep point
    copy_bytes: int  # bytes of one buffer (the copy moves twice this)
    decode: tuple  # (batch, context) rows of the validation table
    prefill: tuple  # prompt lengths
    warmup: int
    iters: int
    prefill_iters: int  # long prefills on few SMs take seconds: fewer repetitions
    validate_points: int  # how many sizes (spread over the grid, whole GPU included) get model rows


FULL = Settings(gemm_shapes=((4096, 4096, 4096), (8192, 8192, 8192), (16384, 4096, 4096)), copy_bytes=1 << 30,
                # (32, 4096): a KV-heavy decode row per size, so the fit tells attention's bytes from the
                # GEMMs' small-M compute (the pool it needs is no larger than (128, 1024)'s); the 8192
                # prefill: attention's FLOPs a fifth of the step, so its efficiency is fitted on every
                # size (~15 s more on an H200, mostly on the smallest partitions)
                decode=((1, 1024), (32, 1024), (128, 1024), (32, 4096)), prefill=(1024, 4096, 8192), warmup=2,
                iters=5, prefill_iters=2, validate_points=6)
QUICK_GPU = Settings(gemm_shapes=((4096, 4096, 4096),), copy_bytes=256 << 20, decode=((1, 256), (8, 256)),
                     prefill=(512,), warmup=1, iters=3, prefill_iters=2, validate_points=3)
QUICK_CPU = Settings(gemm_shapes=((64, 64, 64), (128, 128, 128)), copy_bytes=4 << 20, decode=((1, 16), (2, 16)),
                     prefill=(16,), warmup=1, iters=1, prefill_iters=1, validate_points=2)


# ---- timing on one partition ----------------------------------------------------------------------

_EVENTS_OK = True  # cleared if CUDA events cannot be recorded on a partition's stream


def time_on(stream, fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call of fn() issued on `stream` (None: the current stream), back to back.

    On a GPU: CUDA events around the calls on that stream; should events fail on a green-context
    stream (a [check] of gpu.md), a device synchronisation around them instead."""
    global _EVENTS_OK
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters
    ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with ctx:
        for _ in range(warmup):
            fn()
        if _EVENTS_OK:
            try:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1e3 / iters
            except RuntimeError as e:
                logger.warning("CUDA events failed on this stream (%s): timing with device synchronisation", e)
                _EVENTS_OK = False
        _sync(stream, device)
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(stream, device)
        return (time.perf_counter() - t) / iters


def _sync(stream, device: torch.device) -> None:
    """The stream itself, then the device: a device synchronisation alone may not wait for the
    streams of a green context (scripts/gpu_smoke.py checks it)."""
    if stream is not None:
        stream.synchronize()
    torch.cuda.synchronize(device)


def measure_size(part, sms: int, s: Settings, device: torch.device, dtype: torch.dtype) -> SizePoint:
    stream = part.stream(sms)
    granted = part.granted(sms)
    gemm = []
    for m, n, k in s.gemm_shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = time_on(stream, lambda: a @ b, device, s.warmup, s.iters)
        gemm.append((m, n, k, 2.0 * m * n * k / t))
        del a, b
    src = torch.empty(s.copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_on(stream, lambda: dst.copy_(src), device, s.warmup, max(s.iters, 3))
    del src, dst
    return SizePoint(sms, granted, max(g[3] for g in gemm), 2.0 * s.copy_bytes / t, gemm)


# ---- model steps ---------------------------------------------------------------------------------------

def spread(sizes: list[int], n: int) -> list[int]:
    """n sizes spread over the list, both ends included."""
    if n >= len(sizes):
        return list(sizes)
    if n <= 1:
        return [sizes[-1]]
    idx = sorted({round(i * (len(sizes) - 1) / (n - 1)) for i in range(n)})
    return [sizes[i] for i in idx]


@dataclass
class LoadedModel:
    model: object
    cfg: object
    dtype: torch.dtype


def load_dummy(args, device: torch.device) -> LoadedModel:
    from sglang_duet.model_loader.loader import load_model

    loaded = load_model(None, load_format="dummy", model_config_path=args.model_config, dtype=args.dtype,
                        device=str(device))
    return LoadedModel(loaded.model, loaded.config, loaded.dtype)


def measure_model(args, part, sizes: list[int], s: Settings, device: torch.device, lm: LoadedModel):
    """Validation rows: decode steps (the partition's CUDA graphs) and eager prefills, per size."""
    from sglang_duet.executor.duet_executor import PartitionedDecodeRunner
    from sglang_duet.kernels.attention import get_attention_backend, resolve_backend_name
    from sglang_duet.kernels.attention.base import ForwardBatch
    from sglang_duet.kernels.cuda_graph import supports_graphs
    from sglang_duet.memory.kv_pool import KVCachePool

    model, cfg, dtype = lm.model, lm.cfg, lm.dtype
    attn = get_attention_backend(resolve_backend_name(args.attention_backend, device), cfg, device)
    want = max([b * (c + 1) for b, c in s.decode] + list(s.prefill)) + 1
    pool = KVCachePool(cfg.num_hidden_layers, want, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
    graphs = device.type == "cuda" and supports_graphs(attn)
    max_bs = max(b for b, _ in s.decode)
    runner = PartitionedDecodeRunner(model, attn, pool, max_bs=max_bs, use_graphs=graphs, max_kv_tokens=want + max_bs)
    rows: list[Row] = []
    for sms in sizes:
        stream = part.stream(sms)
        granted = part.granted(sms)
        whole = granted >= part.total
        runner.select(None if whole else ("single", granted), stream)
        for bs, ctx in s.decode:
            step = _decode_step(runner, cfg, bs, ctx, device)
            t = time_on(stream, step, device, s.warmup, s.iters)
            rows.append(Row("decode", granted, bs, ctx, t * 1e3))
            logger.info("decode bs=%d ctx=%d on %d SMs: %.3f ms", bs, ctx, granted, t * 1e3)
        for n in s.prefill:
            prompt = torch.randint(0, cfg.vocab_size, (n,)).tolist()
            fb = ForwardBatch.build([(prompt, 0, list(range(1, n + 1)), True)], device)
            t = time_on(stream, lambda: model(fb, attn, pool), device, 1, s.prefill_iters)
            rows.append(Row("prefill", granted, 1, n, t * 1e3))
            logger.info("prefill %d on %d SMs: %.3f ms", n, granted, t * 1e3)
    runner.select(None)
    return rows, cfg, torch.empty((), dtype=dtype).element_size()


def _decode_step(runner, cfg, bs: int, ctx: int, device: torch.device, first_slot: int = 1):
    """One decode step of `bs` requests with `ctx` cached tokens each, slots from `first_slot` on."""
    table = torch.arange(first_slot, first_slot + bs * (ctx + 1), device=device).view(bs, ctx + 1)
    kv, out_loc = table.reshape(-1), table[:, ctx]
    ids = torch.randint(0, cfg.vocab_size, (bs,), device=device)
    pos, seq = [ctx] * bs, [ctx + 1] * bs
    return lambda: runner.run(ids, pos, out_loc, seq, kv)


# ---- the two lanes at once: what HBM and L2 sharing costs ------------------------------------------

def measure_contention(args, part, device: torch.device, lm: LoadedModel, splits=(32, 64),
                       decode=(32, 1024), prefill_len: int = 4096, decode_steps: int = 20) -> list[dict]:
    """Per split: a decode lane's step time on S_d SMs alone and while prefills run on the other
    SMs, and the prefill's time alone and beside the decoding lane (partitions split SMs, not
    HBM bandwidth or L2: the emulator's contention term is a guess until this is measured).

    Prefills are queued on the prefill stream first (enough to outlast the decode window), then the
    decode steps are timed with events on their own stream while the prefills run."""
    from sglang_duet.executor.duet_executor import PartitionedDecodeRunner
    from sglang_duet.kernels.attention import get_attention_backend, resolve_backend_name
    from sglang_duet.kernels.attention.base import ForwardBatch
    from sglang_duet.kernels.cuda_graph import supports_graphs
    from sglang_duet.memory.kv_pool import KVCachePool

    if device.type != "cuda":
        return []
    model, cfg, dtype = lm.model, lm.cfg, lm.dtype
    name = resolve_backend_name(args.attention_backend, device)
    attn_d, attn_p = get_attention_backend(name, cfg, device), get_attention_backend(name, cfg, device)
    bs, ctx = decode
    decode_slots = bs * (ctx + 1)
    pool = KVCachePool(cfg.num_hidden_layers, decode_slots + prefill_len + 2, cfg.num_key_value_heads, cfg.head_dim,
                       dtype, device)
    runner = PartitionedDecodeRunner(model, attn_d, pool, max_bs=bs, use_graphs=supports_graphs(attn_d),
                                     max_kv_tokens=decode_slots + bs)
    step = _decode_step(runner, cfg, bs, ctx, device)
    prompt = torch.randint(0, cfg.vocab_size, (prefill_len,)).tolist()
    fb = ForwardBatch.build([(prompt, 0, list(range(decode_slots + 1, decode_slots + 1 + prefill_len)), True)], device)
    out = []
    for sd in splits:
        sp = part.split(sd)
        runner.select(("split", sp.decode_sms), sp.decode_stream)
        d_alone = time_on(sp.decode_stream, step, device, 2, decode_steps)
        p_alone = time_on(sp.prefill_stream, lambda: model(fb, attn_p, pool), device, 1, 2)
        n_prefill = max(2, int(decode_steps * d_alone / p_alone) + 2)
        with torch.cuda.stream(sp.prefill_stream):
            p0 = torch.cuda.Event(enable_timing=True)
            p1 = torch.cuda.Event(enable_timing=True)
            p0.record()
            for _ in range(n_prefill):
                model(fb, attn_p, pool)
            p1.record()
        with torch.cuda.stream(sp.decode_stream):
            d0 = torch.cuda.Event(enable_timing=True)
            d1 = torch.cuda.Event(enable_timing=True)
            d0.record()
            for _ in range(decode_steps):
                step()
            d1.record()
        d1.synchronize()
        decode_done_first = not p1.query()  # the whole decode window ran beside prefills
        p1.synchronize()
        d_with = d0.elapsed_time(d1) / 1e3 / decode_steps
        p_with = p0.elapsed_time(p1) / 1e3 / n_prefill
        row = {"decode_sms": sp.decode_granted, "prefill_sms": sp.prefill_granted, "decode_batch": bs,
               "decode_context": ctx, "prefill_tokens": prefill_len, "decode_alone_ms": d_alone * 1e3,
               "decode_beside_prefill_ms": d_with * 1e3, "decode_slowdown": d_with / d_alone,
               "prefill_alone_ms": p_alone * 1e3, "prefill_beside_decode_ms": p_with * 1e3,
               "prefill_slowdown": p_with / p_alone, "decode_window_inside_prefills": decode_done_first}
        out.append(row)
        logger.info("contention S_d=%d: decode %.3f -> %.3f ms (x%.2f), prefill %.1f -> %.1f ms", sp.decode_granted,
                    row["decode_alone_ms"], row["decode_beside_prefill_ms"], row["decode_slowdown"],
                    row["prefill_alone_ms"], row["prefill_beside_decode_ms"])
    runner.select(None)
    return out


def _driver_version() -> str | None:
    try:
        from cuda.bindings import driver

        err, v = driver.cuDriverGetVersion()
        return f"{v // 1000}.{(v % 1000) // 10}" if err == driver.CUresult.CUDA_SUCCESS else None
    except Exception:  # noqa: BLE001 - metadata only
        return None


def _device_step_latency_rows(args, spec: HardwareSpec) -> list:
    """--step-latency's rows for a device run: a missing or unreadable file (its benchmark failed)
    costs the fit those rows, not the run's measurements."""
    try:
        return step_latency_rows(args.step_latency, spec.total_sms)
    except (CalibrationRefused, KeyError, TypeError, ValueError) as e:
        logger.warning("--step-latency %s not used: %s", args.step_latency, getattr(e, "code", e))
        return []


def run(args) -> dict:
    want_cpu = args.device == "cpu"
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CalibrationRefused("calibrate: --device cuda but no CUDA device is visible")
    if device.type != "cuda" and not (want_cpu and args.quick):
        raise CalibrationRefused(
            "calibrate: calibration measures a GPU's SM partitions (green contexts) and needs a CUDA device; "
            "none is visible. On a CPU only the smoke mode runs: add --device cpu --quick "
            "(it writes numbers that describe the CPU, not a GPU).")
    from sglang_duet.kernels.sm_partition import SMPartitioner

    spec = HardwareSpec.load(args.hardware)
    backend = args.backend if device.type == "cuda" else "none"
    part = SMPartitioner.for_device(device, spec, backend)
    s = FULL if not args.quick else (QUICK_GPU if device.type == "cuda" else QUICK_CPU)
    sizes = args.sizes or (part.sizes() if not args.quick else spread(part.sizes(), 3))
    gemm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.perf_counter()

    points = []
    for sms in sizes:
        p = measure_size(part, sms, s, device, gemm_dtype)
        points.append(p)
        logger.info("%d SMs (granted %d): %.1f TFLOP/s, %.0f GB/s", sms, p.granted, p.flops / 1e12, p.bandwidth / 1e9)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    compute_curve, bandwidth_curve = curves(points)

    measured = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "driver": _driver_version(),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "partition_backend": part.backend,
        "exact_grants": part.exact_grants,
        "granted": {int(p.requested): int(p.granted) for p in points},
        "method": (f"{gemm_dtype} GEMM sweep {[list(g) for g in s.gemm_shapes]} (best FLOP/s) and a "
                   f"{s.copy_bytes >> 20} MiB device copy (read + write), on a stream of each partition size "
                   f"({part.backend} partitions)"),
        "quick": bool(args.quick),
    }
    base = base_ref(args.hardware, out)
    write_calibration(out, base, compute_curve, bandwidth_curve, measured)
    # The curves are on disk before the (long) model steps: a run cut short still leaves them.
    Path(f"{out.with_suffix('')}.points.json").write_text(json.dumps([asdict(p) for p in points], indent=2))

    vsizes = args.validate_sizes or spread(sizes, s.validate_points)
    lm = None if args.skip_model else load_dummy(args, device)
    rows, cfg, dtype_bytes = measure_model(args, part, vsizes, s, device, lm) if lm else ([], None, 2)
    contention = []
    if lm is not None and args.contention and device.type == "cuda":
        try:
            contention = measure_contention(args, part, device, lm)
        except Exception as e:  # noqa: BLE001 - the curves and rows above are worth keeping
            logger.warning("contention measurement failed: %r", e)
            contention = [{"error": repr(e)}]

    params, fit_rep, extra_rows = {}, {}, []
    if rows:
        cal = HardwareSpec.load(out)
        if not args.no_fit_overhead:
            try:
                ev = fit_rows(rows, cfg, spec, cal, dtype_bytes, _device_step_latency_rows(args, spec))
                params = ev.fit.params
                fit_rep = {"params": params, "summary": ev.summary, "step_latency": args.step_latency}
                extra_rows = extra_rows_report(ev, len(rows))
            except Exception as e:  # noqa: BLE001 - the measurements are worth keeping: refit them offline
                logger.warning("step-term fit failed (%r): the curves only; refit with --refit", e)
                fit_rep = {"error": repr(e)}
        if not params:  # the curves only: the base file's terms stay
            predict(rows, cfg, spec, dtype_bytes, "before_ms")
            predict(rows, cfg, cal, dtype_bytes, "after_ms")
        measured["validation"] = {"rows": len(rows), "model": cfg.name,
                                  "median_abs_error_before": step_fit.median_abs(r.before_err for r in rows),
                                  "median_abs_error_after": step_fit.median_abs(r.after_err for r in rows),
                                  **({"fit": fit_rep["summary"]} if params else {})}
        write_calibration(out, base, compute_curve, bandwidth_curve, measured, **params)
    HardwareSpec.load(out)  # what we wrote must load
    rep = {
        "out": str(out), "base": base, "quick": bool(args.quick), "device": measured["device"],
        "partition_backend": part.backend, "partitioner": part.describe(), "measured": measured,
        "sizes": [asdict(p) for p in points],
        "compute_curve": compute_curve, "bandwidth_curve": bandwidth_curve,
        "launch_overhead_s": params.get("launch_overhead_s"),
        "fit": fit_rep,
        "contention": contention,
        "rows": [row_dict(r) for r in rows],
        "extra_rows": extra_rows,
        "median_abs_error_before": step_fit.median_abs(r.before_err for r in rows),
        "median_abs_error_after": step_fit.median_abs(r.after_err for r in rows),
        "seconds": time.perf_counter() - started,
    }
    stem = out.with_suffix("")
    Path(f"{stem}.report.json").write_text(json.dumps(rep, indent=2, default=str))
    Path(f"{stem}.report.md").write_text(report_markdown(rep))
    return rep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sglang_duet.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--model-config", default=str(configs_dir() / "models" / "qwen3-8b.json"),
                   help="model config for the dummy-weight validation steps")
    p.add_argument("--hardware", default=None,
                   help="shipped hardware file (name or path) the calibration extends (default h100; with --refit: "
                        "the report's base)")
    p.add_argument("--out", required=True, help="calibration file to write (YAML)")
    p.add_argument("--quick", action="store_true", help="few sizes, small shapes (a smoke run)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (cpu only with --quick)")
    p.add_argument("--backend", default="auto", help="SM partition backend: auto | cuda | torch | none")
    p.add_argument("--dtype", default="auto", help="model dtype (auto: bf16 on a GPU, float32 on a CPU)")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--sizes", type=int, nargs="*", help="SM counts to measure (default: the grid + the whole GPU)")
    p.add_argument("--validate-sizes", type=int, nargs="*", help="SM counts for the model-step validation rows")
    p.add_argument("--skip-model", action="store_true", help="curves only, no validation table")
    p.add_argument("--no-fit-overhead", action="store_true",
                   help="fit nothing to the model steps: keep the base file's step terms and launch overhead")
    p.add_argument("--no-contention", dest="contention", action="store_false",
                   help="skip the two-lane contention rows (decode beside a prefill, per split)")
    p.add_argument("--step-latency", help="benchmark/step_latency.py results.json: its whole-GPU rows join the fit")
    p.add_argument("--refit", metavar="POINTS_JSON",
                   help="no measurement: refit from a device run's <out>.points.json and --rows <out>.report.json")
    p.add_argument("--rows", metavar="REPORT_JSON", help="with --refit: the device run's report (model-step rows)")
    p.add_argument("--dtype-bytes", type=int, default=2, help="with --refit: bytes per weight of the measured model")
    p.add_argument("--report", help="also write the report's markdown here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if bool(args.refit) != bool(args.rows):
        p.error("--refit and --rows go together (the sweep's points.json and the report.json of one device run)")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        if args.refit:
            rep = refit(args.refit, args.rows, args.out, args.model_config, args.hardware, args.step_latency,
                        args.dtype_bytes)
        else:
            args.hardware = args.hardware or "h100"
            with torch.inference_mode():
                rep = run(args)
    except CalibrationRefused as e:
        print(str(e.code), file=sys.stderr)
        return 2
    md = report_markdown(rep)
    if args.report:
        Path(args.report).write_text(md)
    if not args.quiet:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
