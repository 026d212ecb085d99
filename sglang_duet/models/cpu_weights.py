"""Products with a small float32 model's weights on a CPU, by the row count of the step (issue 18).

One weight, up to three forms, each the fastest somewhere (SmolLM2-135M's shapes on the 2-core AVX2 EPYC
test machine, torch 2.13.0+cpu, microseconds per product; `benchmark/results/cpu_decode-cpu2.md`):

  * as nn.Linear keeps it, [out, in]: MKL's GEMM (F.linear). The best from ~128 rows (prefill chunks):
    oneDNN's blocked GEMM below is 8-13% slower there, at one thread and at two.
  * an [in, out] copy (x @ w_t), mapped from the serving file (model_loader/prepared.py): MKL's axpy-style
    gemv. For ONE row MKL's [out, in] dot-product gemv streamed the weights at 13-14 GB/s, the copy at
    18-24 GB/s (LM head 8.8 -> 4.8 ms at one thread); at 2 and 3 rows MKL's [out, in] path makes about
    one more pass over the weights per row (q/k/v + o + gate/up of 30 layers plus the LM head 76 / 101 ms
    against 39 / 53 ms with the copies). down_proj (in > out) gains nothing and has no copy.
  * oneDNN's blocked ("prepacked") layout (torch.ops.mkldnn._reorder_linear_weight): private to the process
    (an opaque tensor, not mappable), as vLLM's CPU build multiplies its weights (onednn_mm). From 2 rows it
    beats both MKL forms, most of all with two threads, where MKL's small-row GEMM hardly parallelises:
      rows            2        4        16       64
      gate_up  1 thr  325/203  450/314  919/819  2721/2897   ([out, in] / blocked)
               2 thr  326/120  456/189  697/447  2132/1442
      LM head  1 thr  16933/6891  18085/8717  26615/17516  58842/49820
               2 thr  18358/3672  18107/4526  23373/8917   39970/25470

Those are single products, the weights in cache. In a step, the weights stream from memory, and the
ranking moves (PackedRows.for_threads): a small float32 model on a CPU multiplies with the blocked weights
from one row (two threads or more; from two rows at one thread, where the copies serve one-row steps) up to
128 rows (32 at one thread), the LM head, which sees only the sampled rows, at every count from there, and
with MKL's GEMM above. Bigger models would pay too much memory (GEMV_COPY_MAX_BYTES each form).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Models whose copies (and whose blocked weights) take more bytes than this get neither.
GEMV_COPY_MAX_BYTES = 1 << 30
# Steps of up to this many rows multiply with the [in, out] copies when the model has no blocked weights
# (with them, only one-row steps do: see the module's table).
GEMV_MAX_ROWS = 3
# Without blocked weights, the LM head on a CPU runs as GEMMs over this many vocabulary rows at a time: for
# a few rows one MKL GEMM over SmolLM2's 49152 x 576 head ran 15-25% slower than 1024-row pieces (one AVX2
# core: 28.8 vs 22.6 ms at 16 rows, CPU time), and every logit is the same dot product, bit for bit.
LM_HEAD_CPU_ROWS = 1024


@dataclass(frozen=True)
class PackedRows:
    """The row counts whose products run against the blocked weights (`rows in packed_rows`)."""

    lo: int
    hi: int

    def __contains__(self, rows: int) -> bool:
        return self.lo <= rows <= self.hi

    @classmethod
    def for_threads(cls, threads: int) -> "PackedRows":
        """Measured with weights streamed from memory (30 layers' worth, as in a step): at one thread the
        copies win one-row products (22.1 vs 25.9 ms for the layers) and the blocked GEMM is even with
        MKL's up to ~32 rows, 3-8% slower at 64; at two threads the blocked weights win from one row (18.1
        vs 22.3 ms: MKL's gemv runs on one thread) and are 1.5x faster at 64 rows, 1.07x at 128, 0.92x at 512."""
        return cls(1, 128) if threads >= 2 else cls(2, 32)

    def for_lm_head(self) -> "PackedRows":
        """The LM head sees only the sampled rows: blocked from the same first row count, with no top."""
        return PackedRows(self.lo, 1 << 62)


NO_PACKED_ROWS = PackedRows(1, 0)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack(w: torch.Tensor) -> torch.Tensor:
    """w ([out, in], float32) in oneDNN's blocked layout, for x [rows, in] -> [rows, out] products. The
    batch-size hint only picks the block shape; 16 measured as fast as 1 or 64 at every row count."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), 16)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def transposed(w: torch.Tensor) -> torch.Tensor:
    return w.detach().t().contiguous()


def _chunked_linear(x: torch.Tensor, w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([F.linear(x, w[s:s + rows]) for s in range(0, w.shape[0], rows)], dim=1)


def linear_rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, w_t: torch.Tensor | None = None,
                packed: torch.Tensor | None = None, packed_rows: PackedRows = NO_PACKED_ROWS) -> torch.Tensor:
    """F.linear(x, w, b), computed against the form that is fastest for x's row count: the blocked weight
    `packed` for `packed_rows`, else the [in, out] copy w_t up to GEMV_MAX_ROWS rows, else w itself. The
    same products summed in another order: last-bit differences."""
    rows = x.shape[0]
    if packed is not None and rows in packed_rows:
        return packed_linear(x, packed, b)
    if w_t is not None and rows <= GEMV_MAX_ROWS:
        return torch.mm(x, w_t) if b is None else torch.addmm(b, x, w_t)
    return F.linear(x, w, b)


def lm_head_rows(x: torch.Tensor, w: torch.Tensor, w_t: torch.Tensor | None = None,
                 packed: torch.Tensor | None = None, packed_rows: PackedRows = NO_PACKED_ROWS) -> torch.Tensor:
    """Logits x @ w.T (not yet float32) of one rank's whole vocabulary."""
    rows, head_rows = x.shape[0], packed_rows.for_lm_head()
    if (packed is not None and rows in head_rows) or (w_t is not None and rows <= GEMV_MAX_ROWS):
        return linear_rows(x, w, None, w_t, packed, head_rows)
    if x.device.type == "cpu" and rows > 1 and w.shape[0] > LM_HEAD_CPU_ROWS:
        return _chunked_linear(x, w, LM_HEAD_CPU_ROWS)
    return F.linear(x, w)
