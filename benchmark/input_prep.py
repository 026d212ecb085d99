"""Host time of a decode step's input preparation: slot lists vs the req-to-token table.

    python benchmark/input_prep.py                          # batch 64/256 x context 1k/4k on the CPU
    python benchmark/input_prep.py --device cuda --batches 64 256 --contexts 1024 4096

Only the inputs are timed, never a forward: each step appends one slot per request (as the core
does for a decode), then builds that step's inputs the two ways the executors can:

* eager (ModelExecutor, prefill/mixed fallbacks): `ForwardBatch.build` from the slot lists (before)
  vs `ReqToTokenTable.sync` (the step's new slots) + `forward_batch` (after);
* graph (GPUModelExecutor / two-lane decode, the CUDA-graph runner's static buffers): the lists
  flattened in Python and copied (before) vs the table's device gathers (after); the runner's
  attention plan and forward are stubbed out.

The host time is the wall time of the calls (on a GPU, followed by a synchronize, so the device work
queued by them is included: an upper bound of the host's share). Reports the median over --steps
steps, best of --repeats repeats (the machine may be shared and noisy).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(_REPO))

from sglang_duet.core.plan import ReqWork  # noqa: E402
from sglang_duet.kernels.attention.base import ForwardBatch  # noqa: E402
from sglang_duet.kernels.cuda_graph import CudaGraphDecodeRunner  # noqa: E402
from sglang_duet.memory.kv_pool import KVCachePool  # noqa: E402
from sglang_duet.memory.req_to_token import ReqToTokenTable  # noqa: E402


class _Cfg:
    vocab_size = 16


class _Stub(torch.nn.Module):
    """What the runner needs of a model (config, parameter dtype); never called."""

    def __init__(self):
        super().__init__()
        self.config = _Cfg()
        self.w = torch.nn.Parameter(torch.zeros(1))


class _InputsOnly(CudaGraphDecodeRunner):
    """The runner's static-buffer path without the attention plan and the forward."""

    def _plan(self, bucket, fb):
        pass

    def _forward(self, fb, st, mode):
        return self.logits[:fb.num_requests], self.ids[:fb.num_requests]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logits = torch.zeros(self.max_bs, 1, device=self.device)
        self.ids = torch.zeros(self.max_bs, dtype=torch.long, device=self.device)


def _setup(batch: int, context: int, steps: int, device: str):
    slots_per = context + steps + 1
    pool = KVCachePool(1, batch * slots_per + 2, 1, 1, torch.float32, device)
    lists = [list(range(1 + i * slots_per, 1 + i * slots_per + context)) for i in range(batch)]
    table = ReqToTokenTable(2 * batch + 2, slots_per + 1, device)
    work = [ReqWork(f"r{i}", [7], context - 1, s, True, table_row=2 * i) for i, s in enumerate(lists)]
    table.sync(work)  # the prefill's slots: on the device before the decode steps
    return pool, lists, table


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(batch: int, context: int, steps: int, device: str) -> dict[str, float]:
    """Median ms per decode step for each way of building the inputs."""
    out = {}
    for path in ("eager-lists", "eager-table", "graph-lists", "graph-table"):
        pool, lists, table = _setup(batch, context, steps, device)
        runner = _InputsOnly(_Stub(), None, pool, max_bs=batch, use_graphs=False) if path.startswith("graph") else None
        times = []
        for step in range(steps):
            pos = context - 1 + step
            for i, s in enumerate(lists):  # the core's append for this decode step (not timed)
                s.append(s[-1] + 1)
            _sync(device)
            t0 = time.perf_counter()
            if path == "eager-lists":
                ForwardBatch.build([([7], pos, s, True) for s in lists], device)
            elif path == "eager-table":
                work = [ReqWork(f"r{i}", [7], pos, s, True, table_row=2 * i) for i, s in enumerate(lists)]
                table.sync(work)
                table.forward_batch([([7], pos, 2 * i, True) for i in range(batch)])
            elif path == "graph-lists":  # as graph_decode_steps builds them
                positions = [pos] * batch
                seq = [p + 1 for p in positions]
                out_loc = [s[p] for s, p in zip(lists, positions)]
                kv = [x for s, n in zip(lists, seq) for x in s[:n]]
                runner.run([7] * batch, positions, out_loc, seq, kv)
            else:
                work = [ReqWork(f"r{i}", [7], pos, s, True, table_row=2 * i) for i, s in enumerate(lists)]
                table.sync(work)
                positions = [pos] * batch
                runner.run([7] * batch, positions, None, [p + 1 for p in positions], None, table=table,
                           rows=[2 * i for i in range(batch)])
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        out[path] = statistics.median(times[1:] if len(times) > 2 else times)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: the host's own work; on a shared, oversubscribed "
                         "CPU a parallel op can wait a whole scheduler time slice for its second thread)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    try:
        if a.threads:
            torch.set_num_threads(a.threads)
        torch.set_grad_enabled(False)
        _run(a)
    finally:  # the caller's settings back (tests call main in-process)
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)


def _run(a) -> None:
    rows = []
    print(f"{'batch':>5} {'ctx':>5} | {'eager lists':>11} {'eager table':>11} {'x':>5} | "
          f"{'graph lists':>11} {'graph table':>11} {'x':>5}   (ms per decode step, best of medians)")
    for b in a.batches:
        for c in a.contexts:
            runs = [bench(b, c, a.steps, a.device) for _ in range(a.repeats)]
            best = {k: min(r[k] for r in runs) for k in runs[0]}
            rows.append({"batch": b, "context": c, **best, "runs": runs})
            print(f"{b:>5} {c:>5} | {best['eager-lists']:>11.2f} {best['eager-table']:>11.2f} "
                  f"{best['eager-lists'] / best['eager-table']:>5.1f} | {best['graph-lists']:>11.2f} "
                  f"{best['graph-table']:>11.2f} {best['graph-lists'] / best['graph-table']:>5.1f}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"device": a.device, "threads": torch.get_num_threads(), "rows": rows},
                                          indent=1))


if __name__ == "__main__":
    main()
