"""Compile FlashInfer's kernels for the shapes a lease uses, before anything is timed.

    python scripts/gpu_prewarm.py --out /tmp/gpu_work/prewarm.json [--so-tar $OUT/flashinfer_so.tgz]

FlashInfer JIT-compiles each (dtype, head dim, variant) module with nvcc on first use; a lease
must not pay that inside a test's timeout or a measurement. This runs the repository's own
FlashInfer backend once per path, at head dim 128 (Qwen3-8B, Llama-3-8B: GQA 4, tensor-core
decode) in bf16: an extend (prefill wrapper, FA2), a decode (tensor cores, which builds the same
FA2 module), and a CUDA-graph decode wrapper. Each path is timed; the built .so files are listed
and, with --so-tar, packed so a later lease can place them under flashinfer/data/aot/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
import traceback
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def _paths(H: int, H_kv: int, D: int) -> dict:
    import torch

    from sglang_duet.kernels.attention.base import ForwardBatch
    from sglang_duet.kernels.attention.flashinfer_backend import FlashInferAttentionBackend
    from sglang_duet.memory.kv_pool import KVCachePool

    dev = torch.device("cuda")
    pool = KVCachePool(1, 4096, H_kv, D, torch.bfloat16, dev)
    results = {}

    def run(name, fb, backend):
        t = time.perf_counter()
        try:
            T = fb.num_tokens
            q = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(T, H_kv, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(T, H_kv, D, device=dev, dtype=torch.bfloat16)
            backend.plan(fb)
            out = backend.run(0, q, k, v, pool)
            torch.cuda.synchronize()
            results[name] = {"ok": bool(torch.isfinite(out).all()), "seconds": round(time.perf_counter() - t, 1)}
        except Exception as e:  # noqa: BLE001
            results[name] = {"ok": False, "seconds": round(time.perf_counter() - t, 1),
                             "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=5)[-2000:]}
        print(f"[prewarm] {name} H={H} H_kv={H_kv} D={D}: {results[name]}", flush=True)

    fi = FlashInferAttentionBackend(H, H_kv, D, dev)
    # an extend: 2 requests, one with a cached prefix (prefill wrapper, causal)
    run("extend", ForwardBatch.build([(list(range(40)), 0, list(range(1, 41)), True),
                                      (list(range(8)), 30, list(range(100, 138)), True)], dev), fi)
    # a decode batch (decode wrapper: tensor cores when H / H_kv >= 4)
    run("decode", ForwardBatch.build([([5], 63, list(range(200, 264)), True),
                                      ([6], 10, list(range(300, 311)), True)], dev), fi)
    # the CUDA-graph decode wrapper (same module, fixed batch size), planned eagerly here
    t = time.perf_counter()
    try:
        state = fi.graph_state(2, 4096)
        fb = ForwardBatch.build([([5], 63, list(range(200, 264)), True), ([6], 10, list(range(300, 311)), True)], dev)
        fi.plan_graph(state, fb, torch.bfloat16, torch.bfloat16)
        q = torch.randn(2, H, D, device=dev, dtype=torch.bfloat16)
        kv = torch.randn(2, H_kv, D, device=dev, dtype=torch.bfloat16)
        out = fi.run(0, q, kv, kv, pool)
        torch.cuda.synchronize()
        results["graph_decode"] = {"ok": bool(torch.isfinite(out).all()), "seconds": round(time.perf_counter() - t, 1)}
    except Exception as e:  # noqa: BLE001
        results["graph_decode"] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                   "trace": traceback.format_exc(limit=5)[-2000:]}
    print(f"[prewarm] graph_decode: {results['graph_decode']}", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="prewarm.json")
    p.add_argument("--shapes", default="32,8,128", help="H,H_kv,D triples separated by ';' (default Qwen3-8B's)")
    p.add_argument("--so-tar", default=None, help="pack the built .so files into this .tgz")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_prewarm: no CUDA device", file=sys.stderr)
        return 2
    report = {"env": {k: os.environ.get(k) for k in ("CUDA_HOME", "FLASHINFER_WORKSPACE_BASE", "MAX_JOBS")}}
    ok = True
    for triple in args.shapes.split(";"):
        H, H_kv, D = (int(x) for x in triple.split(","))
        res = _paths(H, H_kv, D)
        report[triple] = res
        ok = ok and all(r.get("ok") for r in res.values())
    base = Path(os.environ.get("FLASHINFER_WORKSPACE_BASE", str(Path.home())))
    sos = sorted(base.rglob("*.so"))
    report["built"] = [{"path": str(s.relative_to(base)), "mb": round(s.stat().st_size / 2**20, 1)} for s in sos]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"[prewarm] {len(sos)} .so files, {sum(s.stat().st_size for s in sos) / 2**20:.1f} MiB", flush=True)
    if args.so_tar and sos:
        with tarfile.open(args.so_tar, "w:gz") as tar:
            for s in sos:
                tar.add(s, arcname=str(s.relative_to(base)))
        print(f"[prewarm] packed into {args.so_tar}: {os.path.getsize(args.so_tar) / 2**20:.1f} MiB", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
