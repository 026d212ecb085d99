"""The first minute of a GPU lease: the facts every later phase depends on, each checked alone.

    python scripts/gpu_smoke.py --out /tmp/gpu_work/smoke.json

Each check runs in its own try/except and records what it saw (a value, or the exception text),
so one failure never hides the others. The open risks it answers (shared/gpu.md's [check] items):
  * the toolchain: nvcc's path and version, CUDA_HOME, `import flashinfer` (no compile yet);
  * green contexts through cuda-bindings: one split's granted counts, disjointness;
  * a CUDA event recorded on a green-context stream: does record / query / elapsed_time against
    an event of an ordinary stream work (the two-lane executor's timing rests on it)?
  * a Triton kernel and a CUDA graph launched / replayed on a green-context stream;
  * confinement: a bf16 GEMM on S SMs takes about total/S times the whole GPU's time, eager and
    as a graph replay (and a partition graph replayed on the default stream);
  * the two ceilings every roofline here uses: device-to-device copy bandwidth and bf16 matmul rate.
Timing: device events where they work, else host time around a synchronize (stated per figure).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

FACTS: dict = {}


def check(name):
    """Run fn, store its return value (or the error) under FACTS[name]; never raise."""
    def wrap(fn):
        t = time.perf_counter()
        try:
            FACTS[name] = {"ok": True, "value": fn()}
        except Exception as e:  # noqa: BLE001 - every failure is a fact to record
            FACTS[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                           "trace": traceback.format_exc(limit=4)[-1500:]}
        FACTS[name]["seconds"] = round(time.perf_counter() - t, 3)
        status = "ok" if FACTS[name]["ok"] else "FAILED " + FACTS[name]["error"][:300]
        print(f"[smoke] {name}: {status}  {json.dumps(FACTS[name].get('value'), default=str)[:400]}", flush=True)
        return fn
    return wrap


def host_time(fn, iters: int, stream=None, warmup: int = 2) -> float:
    """Seconds per call: synchronize, run `iters` calls on `stream`, synchronize (host clock)."""
    import torch

    ctx = torch.cuda.stream(stream) if stream is not None else _null()
    with ctx:
        for _ in range(warmup):
            fn()
        _sync(stream)
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(stream)
    return (time.perf_counter() - t) / iters


def _sync(stream) -> None:
    """The stream itself, then the device: whether a device synchronize covers a green context's
    streams is one of the facts this script checks, so never rely on it alone."""
    import torch

    if stream is not None:
        stream.synchronize()
    torch.cuda.synchronize()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_all() -> None:
    import torch

    @check("toolchain")
    def _():
        nvcc = shutil.which("nvcc")
        out = subprocess.run([nvcc or "/usr/local/cuda/bin/nvcc", "--version"], capture_output=True, text=True,
                             timeout=30).stdout.strip().splitlines()
        return {"nvcc": nvcc, "nvcc_version": out[-1] if out else None, "CUDA_HOME": os.environ.get("CUDA_HOME"),
                "cuda_home_nvcc_exists": os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                                     "bin", "nvcc"))}

    @check("device")
    def _():
        p = torch.cuda.get_device_properties(0)
        return {"name": p.name, "sms": p.multi_processor_count, "mem_gib": round(p.total_memory / 2**30, 1),
                "l2_mb": round(getattr(p, "L2_cache_size", 0) / 2**20, 1), "cc": f"{p.major}.{p.minor}",
                "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "driver": torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None}

    @check("import_flashinfer")
    def _():
        import flashinfer

        return {"version": getattr(flashinfer, "__version__", "?"), "file": flashinfer.__file__}

    @check("import_cuda_bindings")
    def _():
        from cuda import bindings
        from cuda.bindings import driver

        return {"version": getattr(bindings, "__version__", "?"),
                "has_split_by_count": hasattr(driver, "cuDevSmResourceSplitByCount"),
                "has_green_ctx_stream": hasattr(driver, "cuGreenCtxStreamCreate")}

    from sglang_duet.cost_model.hardware import HardwareSpec
    from sglang_duet.kernels.sm_partition import SMPartitioner

    hw = "h200" if "H200" in torch.cuda.get_device_name(0) else "h100"
    part_box: dict = {}

    @check("partitioner")
    def _():
        part = SMPartitioner.for_device("cuda", HardwareSpec.load(hw), backend="auto")
        part_box["p"] = part
        sp = part.split(32)
        return {"backend": part.backend, "total": part.total, "grid": part.grid(),
                "split32": {"decode": sp.decode_granted, "prefill": sp.prefill_granted, "disjoint": sp.disjoint},
                "granted_single": {s: part.granted(s) for s in (8, 9, 16, 64)}}

    part = part_box.get("p")
    if part is None or part.backend == "none":
        print("[smoke] no green-context partitioner: the partition checks are skipped", flush=True)
        gstream = None
    else:
        gstream = part.split(32).decode_stream

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    @check("event_on_green_stream")
    def _():
        if gstream is None:
            raise RuntimeError("no green-context stream")
        anchor = torch.cuda.Event(enable_timing=True)
        anchor.record()  # ordinary (default) stream
        torch.cuda.synchronize()
        ev0 = torch.cuda.Event(enable_timing=True)
        ev1 = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(gstream):
            ev0.record()
            for _ in range(10):
                a @ a
            ev1.record()
        t = time.perf_counter()
        while not ev1.query():
            if time.perf_counter() - t > 20:
                raise TimeoutError("event on the green stream never completed")
        host_s = time.perf_counter() - t
        return {"query_ok": True, "gemm10_ms_events": ev0.elapsed_time(ev1),
                "anchor_to_end_ms": anchor.elapsed_time(ev1), "host_wait_ms": host_s * 1e3}

    @check("device_sync_covers_green_stream")
    def _():
        if gstream is None:
            raise RuntimeError("no green-context stream")
        with torch.cuda.stream(gstream):
            for _ in range(200):
                a @ a
            ev = torch.cuda.Event()
            ev.record()
        torch.cuda.synchronize()
        covered = ev.query()
        gstream.synchronize()
        return {"event_done_after_device_sync": covered}

    @check("stream_wait_across_contexts")
    def _():
        if gstream is None:
            raise RuntimeError("no green-context stream")
        other = part.split(32).prefill_stream
        x = torch.zeros(1 << 20, device="cuda")
        with torch.cuda.stream(gstream):
            for _ in range(20):
                a @ a
            x.add_(1)
            ev = torch.cuda.Event()
            ev.record()
        other.wait_event(ev)
        with torch.cuda.stream(other):
            y = x * 2
        torch.cuda.synchronize()
        return {"value_seen_by_other_lane": float(y[0])}  # 2.0 when the wait ordered the lanes

    @check("triton_on_green_stream")
    def _():
        if gstream is None:
            raise RuntimeError("no green-context stream")
        import triton
        import triton.language as tl

        @triton.jit
        def add_one(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1.0, mask=m)

        x = torch.zeros(10000, device="cuda")
        with torch.cuda.stream(gstream):
            add_one[(triton.cdiv(10000, 1024),)](x, 10000, BLOCK=1024)
        torch.cuda.synchronize()
        return {"all_ones": bool((x == 1).all()), "triton": triton.__version__}

    big = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    big2 = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    @check("ceilings")
    def _():
        n = 1 << 30  # 1 GiB each way: far over L2
        src = torch.empty(n, dtype=torch.uint8, device="cuda")
        src.random_(0, 255)
        dst = torch.empty_like(src)
        copy_s = _event_time(lambda: dst.copy_(src), 10)
        mm_s = _event_time(lambda: big @ big2, 10)
        del src, dst
        return {"copy_TBps_read_plus_write": 2 * n / copy_s / 1e12, "bf16_matmul_8192_TFLOPs": 2 * 8192**3 / mm_s / 1e12}

    @check("gemm_confinement")
    def _():
        if part is None or part.backend == "none":
            raise RuntimeError("no partitioner")
        full = host_time(lambda: big @ big2, 10)
        out = {"full_ms": full * 1e3}
        for s in (8, 32, 64, 96):
            t = host_time(lambda: big @ big2, 3 if s <= 8 else 5, stream=part.stream(s))
            out[s] = {"ms": t * 1e3, "ratio": t / full, "expected_total_over_s": part.total / part.granted(s)}
        return out

    @check("graph_on_partition")
    def _():
        if part is None or part.backend == "none":
            raise RuntimeError("no partitioner")
        s8 = part.stream(8)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s8):
            for _ in range(2):
                big @ big2
            g.capture_begin(capture_error_mode="thread_local")
            big @ big2
            g.capture_end()
        torch.cuda.synchronize()
        full = host_time(lambda: big @ big2, 5)
        on_part = host_time(g.replay, 3, stream=s8)
        on_default = host_time(g.replay, 3)
        return {"replay_on_partition_ratio": on_part / full, "replay_on_default_ratio": on_default / full,
                "expected": part.total / part.granted(8)}


def _event_time(fn, iters: int) -> float:
    import torch

    for _ in range(2):
        fn()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        fn()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / 1e3 / iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="smoke.json", help="JSON file for the facts")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device", file=sys.stderr)
        return 2
    t = time.perf_counter()
    try:
        run_all()
    finally:
        FACTS["total_seconds"] = round(time.perf_counter() - t, 2)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(FACTS, indent=2, default=str))
    failed = [k for k, v in FACTS.items() if isinstance(v, dict) and not v.get("ok", True)]
    print(f"[smoke] done in {FACTS['total_seconds']} s; failed: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
